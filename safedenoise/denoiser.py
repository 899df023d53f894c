"""Training-free safe denoisers (Kim et al., arXiv 2502.08011) in two forms.

Both forms correct a step's x0-prediction so that it moves away from a negation set
{z_1 … z_N}. Conventions, shared by every function here: the sample is
``x_t = α_t·x0 + σ_t·ε`` (α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) for VP schedulers; the hook
converts Euler-type samples to this convention), x0_pred and sample are (B, *sample_shape),
and per-sample statistics are (B,).

* :class:`PaperSafeDenoiser` is the paper's estimator: a kernel posterior mean E_unsafe and
  a kernel density β, combined by the exact identity E_safe = E_data + β*·(E_data − E_unsafe)
  with β* ≈ η·β.
* :class:`ReferenceSafeDenoiser` is the form of the authors' released code, which produced the
  published numbers: a fixed-bandwidth kernel at the x0-prediction with a plain (not squared)
  distance, x0_safe = x0̂ − s·E_unsafe, then re-noising of the sample at the same timestep.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .kernels import log_gaussian_kernel, log_mean_exp, softmax_weighted_mean, squared_distances
from .negation_bank import NegationBank
from .schedules import as_float, noise_levels

__all__ = [
    "SafeDenoiserOutput",
    "SafeDenoiser",
    "PaperSafeDenoiser",
    "ReferenceSafeDenoiser",
    "GateCalibration",
    "calibrate_reference_gate",
    "safe_posterior_mean",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def safe_posterior_mean(e_data: Tensor, e_unsafe: Tensor, beta: Tensor | float) -> Tensor:
    """Return E_safe = E_data + β·(E_data − E_unsafe), the exact identity.

    Args:
        e_data: (B, *shape) posterior mean of the full data distribution.
        e_unsafe: (B, *shape) posterior mean of the unsafe part.
        beta: (B,) or scalar β*(x_t) = Z_unsafe·p_unsafe,t(x_t) / (Z_safe·p_safe,t(x_t)).

    The identity is exact but ill-conditioned where β ≫ 1: there E_data ≈ E_unsafe, the difference
    cancels, and β multiplies the rounding error.
    """
    if isinstance(beta, Tensor) and beta.ndim == 1:
        beta = beta.reshape((-1,) + (1,) * (e_data.ndim - 1))
    return e_data + beta * (e_data - e_unsafe)


@dataclass(frozen=True)
class SafeDenoiserOutput:
    """Result of one correction.

    Attributes:
        x0_pred: (B, *shape) corrected x0-prediction (equal to the input where not applied).
        sample: (B, *shape) VP-convention sample, replaced by a re-noised one where the form
            re-noises (reference form), otherwise the input sample.
        applied: (B,) bool, where the correction was applied.
        sample_replaced: True when ``sample`` differs from the input for the applied rows.
        stats: per-sample (B,) statistics; the keys are listed on each form. Rows outside the
            timestep window are NaN because the kernel is not computed there.
    """

    x0_pred: Tensor
    sample: Tensor
    applied: Tensor
    sample_replaced: bool = False
    stats: Mapping[str, Tensor] = field(default_factory=dict)


def _as_bank(bank: NegationBank | Tensor) -> NegationBank:
    if isinstance(bank, NegationBank):
        return bank
    if isinstance(bank, Tensor):
        return NegationBank.from_tensor(bank)
    raise TypeError(f"bank must be a NegationBank or a (N, *sample_shape) tensor, got {type(bank).__name__}")


def _work_dtype(tensor: Tensor, accumulate_float64: bool) -> torch.dtype:
    return torch.float64 if accumulate_float64 or tensor.dtype == torch.float64 else torch.float32


class SafeDenoiser(abc.ABC):
    """Interface shared by both forms.

    Attributes:
        bank: the negation set.
        t_min, t_max: the timestep window [t_min, t_max] (t_max None: no upper bound), in the
            scheduler's timestep units (0 … num_train_timesteps − 1 for SD).
    """

    bank: NegationBank
    t_min: float
    t_max: float | None
    # Whether the correction replaces the sample (re-noising) rather than the model output.
    replaces_sample: bool = False

    def in_window(self, timestep: float | Tensor) -> bool:
        """Return whether ``timestep`` lies in [t_min, t_max]."""
        t = as_float(timestep)
        return t >= self.t_min and (self.t_max is None or t <= self.t_max)

    def _check_inputs(self, x0_pred: Tensor, sample: Tensor) -> None:
        if x0_pred.shape != sample.shape:
            raise ValueError(
                f"x0_pred {tuple(x0_pred.shape)} and sample {tuple(sample.shape)} must have the same shape"
            )
        if tuple(x0_pred.shape[1:]) != tuple(self.bank.sample_shape):
            raise ValueError(
                f"samples have shape {tuple(x0_pred.shape[1:])} but the negation bank contains "
                f"{tuple(self.bank.sample_shape)}; build the bank at the generation resolution"
            )

    def unchanged_output(self, x0_pred: Tensor, sample: Tensor) -> SafeDenoiserOutput:
        """Return the output of a step outside the window: inputs unchanged, stats NaN."""
        keys = getattr(self, "STATS_KEYS", ())
        batch = x0_pred.shape[0]
        nan = torch.full((batch,), math.nan, device=x0_pred.device)
        applied = torch.zeros(batch, dtype=torch.bool, device=x0_pred.device)
        return SafeDenoiserOutput(x0_pred, sample, applied, False, {k: nan for k in keys})

    @abc.abstractmethod
    def correct(
        self,
        x0_pred: Tensor,
        sample: Tensor,
        timestep: float | Tensor,
        alpha_t: float,
        sigma_t: float,
        *,
        generator: GeneratorArg = None,
    ) -> SafeDenoiserOutput:
        """Correct a batch of x0-predictions at one timestep.

        Args:
            x0_pred: (B, *sample_shape) the model's x0-prediction E_data[x0 | x_t].
            sample: (B, *sample_shape) x_t = α_t·x0 + σ_t·ε.
            timestep: the scheduler timestep, compared with the window.
            alpha_t, sigma_t: the noise level of ``sample`` (dimensionless).
            generator: randomness for forms that draw fresh noise: one generator, or one per sample.
        """


class PaperSafeDenoiser(SafeDenoiser):
    """The paper's safe denoiser: x0_safe = x0 + η·β·(x0 − E_unsafe).

    E_unsafe = Σ_n w_n z_n with w = softmax_n(log N(x_t; α_t z_n, (k·σ_t)² I)), and
    β = (1/N) Σ_n N(x_t; α_t z_n, (k·σ_t)² I) is a kernel density (full Gaussian normaliser,
    so its unit is 1/volume of the sample space) that stands for p_unsafe,t(x_t); k is
    ``kernel_scale``. β is kept as log β throughout.

    The factor η·β is clamped at ``max_weight``. The identity it approximates is exact but
    ill-conditioned where β* ≫ 1: there x0 ≈ E_unsafe, so the difference is dominated by the
    model's error, and an unbounded factor multiplies that error into the sample.

    In D dimensions log β carries the normaliser −(D/2)·log(2π·σ_t²), about −1.4·D at high noise
    (−23,000 for SD latents at 512×512). η and the threshold can therefore be given in log space
    (``log_eta``, ``log_beta_threshold``), since such values underflow a float.

    Stats keys: ``log_beta`` (log β), ``weight`` (η·β after clamping, 0 where not applied),
    ``clamped`` (1.0 where η·β exceeded ``max_weight``), ``correction_norm`` (‖x0_safe − x0‖₂).
    """

    STATS_KEYS = ("log_beta", "weight", "clamped", "correction_norm")

    def __init__(
        self,
        bank: NegationBank | Tensor,
        eta: float | None,
        t_min: float,
        t_max: float | None = None,
        beta_threshold: float | None = None,
        max_weight: float = 10.0,
        kernel_scale: float = 1.0,
        *,
        log_eta: float | None = None,
        log_beta_threshold: float | None = None,
        accumulate_float64: bool = False,
    ) -> None:
        self.bank = _as_bank(bank)
        if (eta is None) == (log_eta is None):
            raise ValueError(f"give exactly one of eta and log_eta, got eta={eta!r}, log_eta={log_eta!r}")
        if eta is not None and eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        if beta_threshold is not None and log_beta_threshold is not None:
            raise ValueError("give at most one of beta_threshold and log_beta_threshold")
        if beta_threshold is not None and beta_threshold < 0:
            raise ValueError(f"beta_threshold must be ≥ 0, got {beta_threshold}")
        if not max_weight > 0:
            raise ValueError(f"max_weight must be positive (math.inf disables the clamp), got {max_weight}")
        if not kernel_scale > 0:
            raise ValueError(f"kernel_scale must be positive, got {kernel_scale}")
        if t_max is not None and t_max < t_min:
            raise ValueError(f"the window [t_min, t_max] = [{t_min}, {t_max}] is empty")

        self.eta = eta  # None when given as log_eta
        if log_eta is None:
            log_eta = math.log(eta) if eta > 0 else -math.inf
        self.log_eta = log_eta
        if log_beta_threshold is None and beta_threshold is not None:
            log_beta_threshold = math.log(beta_threshold) if beta_threshold > 0 else -math.inf
        self.log_beta_threshold = log_beta_threshold
        self.t_min = float(t_min)
        self.t_max = None if t_max is None else float(t_max)
        self.max_weight = float(max_weight)
        self.kernel_scale = float(kernel_scale)
        self.accumulate_float64 = accumulate_float64
        self._bank_sq_norms: dict[tuple[str, torch.dtype], Tensor] = {}

    def _bank(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        bank = self.bank.flat(device, dtype)
        key = (str(device), dtype)
        if key not in self._bank_sq_norms:
            self._bank_sq_norms[key] = (bank * bank).sum(dim=1)
        return bank, self._bank_sq_norms[key]

    def estimate(self, sample: Tensor, alpha_t: float, sigma_t: float) -> tuple[Tensor, Tensor]:
        """Estimate E_unsafe and log β at ``sample``.

        Args:
            sample: (B, *sample_shape) x_t.
            alpha_t, sigma_t: the noise level of ``sample``.

        Returns:
            e_unsafe: (B, *sample_shape), in the work dtype (float64 for float64 input or
            ``accumulate_float64``, else float32), and log_beta: (B,) in the same dtype.
        """
        if not sigma_t > 0:
            raise ValueError(f"the paper form needs σ_t > 0, got sigma_t={sigma_t}")
        dtype = _work_dtype(sample, self.accumulate_float64)
        queries = sample.reshape(sample.shape[0], -1).to(dtype)
        bank, bank_sq = self._bank(queries.device, dtype)
        distances = squared_distances(
            queries, bank, bank_scale=float(alpha_t), bank_sq_norms=bank_sq, accumulate_float64=dtype == torch.float64
        )
        log_kernel = log_gaussian_kernel(distances, self.kernel_scale * float(sigma_t), queries.shape[1])
        log_beta = log_mean_exp(log_kernel, dim=1)
        e_unsafe = softmax_weighted_mean(log_kernel, bank)
        return e_unsafe.reshape(sample.shape), log_beta

    def correct(
        self,
        x0_pred: Tensor,
        sample: Tensor,
        timestep: float | Tensor,
        alpha_t: float,
        sigma_t: float,
        *,
        generator: GeneratorArg = None,
    ) -> SafeDenoiserOutput:
        """Apply x0_safe = x0 + min(η·β, max_weight)·(x0 − E_unsafe) inside the window.

        ``generator`` is accepted for the shared interface and not used: this form draws no noise.
        """
        self._check_inputs(x0_pred, sample)
        if not self.in_window(timestep):
            return self.unchanged_output(x0_pred, sample)

        e_unsafe, log_beta = self.estimate(sample, alpha_t, sigma_t)
        dtype = log_beta.dtype
        x0 = x0_pred.to(dtype)

        applied = torch.ones_like(log_beta, dtype=torch.bool)
        if self.log_beta_threshold is not None:
            applied &= log_beta >= self.log_beta_threshold
        log_weight = self.log_eta + log_beta
        log_max = math.log(self.max_weight) if math.isfinite(self.max_weight) else math.inf
        clamped = (log_weight > log_max) & applied
        weight = torch.exp(log_weight.clamp(max=log_max))
        weight = torch.where(applied, weight, torch.zeros_like(weight))

        x0_safe = safe_posterior_mean(x0, e_unsafe, weight)
        correction_norm = (x0_safe - x0).reshape(x0.shape[0], -1).norm(dim=1)
        stats = {
            "log_beta": log_beta,
            "weight": weight,
            "clamped": clamped.to(dtype),
            "correction_norm": correction_norm,
        }
        return SafeDenoiserOutput(x0_safe.to(x0_pred.dtype), sample, applied, False, stats)


class ReferenceSafeDenoiser(SafeDenoiser):
    """The released code's form: kernel at the x0-prediction, subtract, re-noise.

    k_n = exp(−‖x0̂ − z_n‖₂ / (2σ²)) with the plain Euclidean distance and a fixed ``bandwidth`` σ
    (in the units of the bank, e.g. channel-normalised SD latents), S = Σ_n k_n,
    E_unsafe = Σ_n k_n z_n / S, x0_safe = x0̂ − s·E_unsafe, and where applied the sample is
    replaced by α_t·x0_safe + σ_t·ξ with fresh noise ξ. The scheduler step then runs on the new
    sample with the unchanged noise prediction. S is kept as log S (log-sum-exp), so distances in
    the hundreds give a finite E_unsafe instead of 0/0.

    Defects of the released code that this class does not reproduce:
    * its CoPro and SD3 paths never pass the configured σ, so they run with σ = 1.0; here
      ``bandwidth`` is always used, so pass 1.0 to match those published runs;
    * one of its branches returns E_unsafe in place of the corrected x0; here x0_safe is always
      returned;
    * its kernel repeats an N×(D+1) tensor per sample, so memory grows as N·D per image. Here the
      distances come from the ‖q‖² + ‖z‖² − 2q·zᵀ expansion, O(B·N + N·D) in total.

    Stats keys: ``log_kernel_sum`` (log S), ``gate_passed`` (1.0 where S > gate_threshold),
    ``min_distance`` (min_n ‖x0̂ − z_n‖₂), ``weight`` (s where applied, else 0),
    ``correction_norm`` (‖x0_safe − x0̂‖₂).
    """

    replaces_sample = True

    STATS_KEYS = ("log_kernel_sum", "gate_passed", "min_distance", "weight", "correction_norm")

    def __init__(
        self,
        bank: NegationBank | Tensor,
        bandwidth: float = 3.15,
        scale: float = 0.33,
        t_min: float = 780,
        gate_threshold: float | GateCalibration | None = None,
        *,
        t_max: float | None = None,
        accumulate_float64: bool = False,
    ) -> None:
        self.bank = _as_bank(bank)
        if isinstance(gate_threshold, GateCalibration):
            gate_threshold = gate_threshold.threshold
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        if t_max is not None and t_max < t_min:
            raise ValueError(f"the window [t_min, t_max] = [{t_min}, {t_max}] is empty")
        self.bandwidth = float(bandwidth)
        self.scale = float(scale)
        self.t_min = float(t_min)
        self.t_max = None if t_max is None else float(t_max)
        self.gate_threshold = gate_threshold
        self.accumulate_float64 = accumulate_float64
        self._bank_sq_norms: dict[tuple[str, torch.dtype], Tensor] = {}

    def kernel_terms(self, x0_pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Compute the kernel at each x0-prediction.

        Args:
            x0_pred: (B, *sample_shape).

        Returns:
            e_unsafe (B, *sample_shape), log S (B,) and min_n ‖x0̂ − z_n‖₂ (B,), in the work dtype.
        """
        dtype = _work_dtype(x0_pred, self.accumulate_float64)
        queries = x0_pred.reshape(x0_pred.shape[0], -1).to(dtype)
        bank = self.bank.flat(queries.device, dtype)
        key = (str(queries.device), dtype)
        if key not in self._bank_sq_norms:
            self._bank_sq_norms[key] = (bank * bank).sum(dim=1)
        sq = squared_distances(
            queries, bank, bank_sq_norms=self._bank_sq_norms[key], accumulate_float64=dtype == torch.float64
        )
        distances = sq.sqrt()
        log_kernel = -distances / (2.0 * self.bandwidth**2)
        log_sum = torch.logsumexp(log_kernel, dim=1)
        e_unsafe = softmax_weighted_mean(log_kernel, bank)
        return e_unsafe.reshape(x0_pred.shape), log_sum, distances.min(dim=1).values

    def gate(self, log_kernel_sum: Tensor) -> Tensor:
        """Return the (B,) bool mask S > gate_threshold; a threshold ≤ 0 or None always passes."""
        if self.gate_threshold is None or self.gate_threshold <= 0:
            return torch.ones_like(log_kernel_sum, dtype=torch.bool)
        return log_kernel_sum > math.log(self.gate_threshold)

    def correct(
        self,
        x0_pred: Tensor,
        sample: Tensor,
        timestep: float | Tensor,
        alpha_t: float,
        sigma_t: float,
        *,
        generator: GeneratorArg = None,
    ) -> SafeDenoiserOutput:
        """Apply x0_safe = x0̂ − s·E_unsafe where the gate passes, and re-noise those samples.

        Fresh noise is drawn for the whole batch at every step inside the window, gated or not, so
        the random stream of each generator does not depend on which samples pass the gate.
        """
        self._check_inputs(x0_pred, sample)
        if not self.in_window(timestep):
            return self.unchanged_output(x0_pred, sample)

        e_unsafe, log_sum, min_distance = self.kernel_terms(x0_pred)
        dtype = log_sum.dtype
        applied = self.gate(log_sum)
        mask = applied.reshape((-1,) + (1,) * (x0_pred.ndim - 1))

        x0 = x0_pred.to(dtype)
        x0_safe = torch.where(mask, x0 - self.scale * e_unsafe, x0)
        noise = _draw_noise(sample.shape, generator, sample.device, dtype)
        renoised = float(alpha_t) * x0_safe + float(sigma_t) * noise
        new_sample = torch.where(mask, renoised, sample.to(dtype))

        weight = torch.where(applied, torch.full_like(log_sum, self.scale), torch.zeros_like(log_sum))
        stats = {
            "log_kernel_sum": log_sum,
            "gate_passed": applied.to(dtype),
            "min_distance": min_distance,
            "weight": weight,
            "correction_norm": (x0_safe - x0).reshape(x0.shape[0], -1).norm(dim=1),
        }
        return SafeDenoiserOutput(
            x0_safe.to(x0_pred.dtype), new_sample.to(sample.dtype), applied, bool(applied.any()), stats
        )


def _draw_noise(shape: torch.Size, generator: GeneratorArg, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Draw standard normal noise of ``shape``: one generator for the batch, or one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per sample")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack([row.to(device) for row in rows]).to(dtype)


@dataclass(frozen=True)
class GateCalibration:
    """Result of :func:`calibrate_reference_gate`.

    Attributes:
        threshold: min S at the last inference timestep minus the margin; ≤ 0 means the gate
            always passes.
        timesteps: the inference timesteps, in sampling order.
        min_log_kernel_sum: min over the noised bank of log S at each timestep (NaN where not
            computed).
        margin: the margin subtracted.
    """

    threshold: float
    timesteps: tuple[float, ...]
    min_log_kernel_sum: tuple[float, ...]
    margin: float


def calibrate_reference_gate(
    bank: NegationBank | Tensor,
    scheduler: Any,
    num_inference_steps: int,
    bandwidth: float,
    margin: float = 1.6,
    seed: int = 42,
    *,
    all_timesteps: bool = True,
) -> GateCalibration:
    """Calibrate the reference form's gate S > threshold as the released code does.

    The negation latents are noised at every inference timestep with noise from one generator
    seeded ``seed``, drawn in sampling order as one (N, *sample_shape) draw per timestep. S is
    computed for each noised latent against the clean bank. The threshold is the minimum S at
    the last inference timestep minus ``margin``. The noise levels are the VP ones of
    :mod:`safedenoise.schedules`. A copy of ``scheduler`` is used, so the caller's is unchanged.

    Args:
        all_timesteps: compute S at every timestep (reported in the result); False computes only
            the last one, which sets the threshold, and still draws every timestep's noise so the
            threshold is the same.
    """
    bank = _as_bank(bank)
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = list(scheduler.timesteps)
    levels = noise_levels(scheduler, scheduler.timesteps)
    reference = ReferenceSafeDenoiser(bank, bandwidth=bandwidth, scale=0.0, t_min=0)
    generator = torch.Generator().manual_seed(seed)

    minima: list[float] = []
    for position, level in enumerate(levels):
        noise = torch.randn(bank.latents.shape, generator=generator)
        if not all_timesteps and position != len(levels) - 1:
            minima.append(math.nan)
            continue
        noised = level.alpha * bank.latents + level.sigma * noise
        _, log_sum, _ = reference.kernel_terms(noised)
        minima.append(float(log_sum.min()))

    threshold = math.exp(minima[-1]) - margin
    return GateCalibration(
        threshold=threshold,
        timesteps=tuple(float(t) for t in timesteps),
        min_log_kernel_sum=tuple(minima),
        margin=margin,
    )
