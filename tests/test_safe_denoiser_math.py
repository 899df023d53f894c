"""Mathematical tests of the safe denoisers on Gaussian mixtures, where every posterior mean is analytic.

A mixture Σ_k π_k N(μ_k, s_k² I) noised as x_t = α·x0 + σ·ε has components
N(α μ_k, (α² s_k² + σ²) I) and per-component posterior means
μ_k + α s_k² / (α² s_k² + σ²) · (x_t − α μ_k), so E_data, E_safe, E_unsafe and β* are exact.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from safedenoise import (
    NegationBank,
    PaperSafeDenoiser,
    ReferenceSafeDenoiser,
    calibrate_reference_gate,
    safe_posterior_mean,
)
from safedenoise.kernels import squared_distances
from tiny_models import make_scheduler


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run on one thread: these tensors are tiny, and on a shared 2-core machine intra-op threads
    made a 4-step tiny-pipeline generation take 5 s instead of 0.05 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture with a safe/unsafe split of its components (float64)."""

    means: Tensor  # (K, D)
    stds: Tensor  # (K,)
    weights: Tensor  # (K,), sums to 1
    unsafe: Tensor  # (K,) bool

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_joint(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """(B, K) log π_k N(x; α μ_k, (α² s_k² + σ²) I)."""
        variance = alpha**2 * self.stds**2 + sigma**2
        sq = ((x[:, None, :] - alpha * self.means[None]) ** 2).sum(-1)
        return torch.log(self.weights) - sq / (2 * variance) - 0.5 * self.dim * torch.log(2 * math.pi * variance)

    def component_means(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """(B, K, D) E[x0 | x_t, component k]."""
        gain = alpha * self.stds**2 / (alpha**2 * self.stds**2 + sigma**2)
        return self.means[None] + gain[None, :, None] * (x[:, None, :] - alpha * self.means[None])

    def posterior_mean(self, x: Tensor, alpha: float, sigma: float, part: str = "data") -> Tensor:
        """(B, D) posterior mean of the whole mixture ("data") or of its "safe" or "unsafe" part."""
        log_joint = self.log_joint(x, alpha, sigma)
        if part != "data":
            keep = self.unsafe if part == "unsafe" else ~self.unsafe
            log_joint = log_joint.masked_fill(~keep[None], -math.inf)
        responsibilities = torch.softmax(log_joint, dim=1)
        return (responsibilities[:, :, None] * self.component_means(x, alpha, sigma)).sum(1)

    def log_beta_star(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """(B,) log β* = log Z_unsafe p_unsafe,t(x) − log Z_safe p_safe,t(x)."""
        log_joint = self.log_joint(x, alpha, sigma)
        unsafe = torch.logsumexp(log_joint[:, self.unsafe], dim=1)
        safe = torch.logsumexp(log_joint[:, ~self.unsafe], dim=1)
        return unsafe - safe

    def sample_noised(self, count: int, alpha: float, sigma: float, generator: torch.Generator) -> Tensor:
        """(count, D) draws of x_t from the noised mixture."""
        components = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        x0 = self.means[components] + self.stds[components, None] * torch.randn(
            count, self.dim, generator=generator, dtype=torch.float64
        )
        return alpha * x0 + sigma * torch.randn(count, self.dim, generator=generator, dtype=torch.float64)


def _mixture(dim: int, generator: torch.Generator) -> GaussianMixture:
    means = 1.5 * torch.randn(4, dim, generator=generator, dtype=torch.float64)
    return GaussianMixture(
        means=means,
        stds=torch.tensor([0.6, 0.9, 0.5, 0.8], dtype=torch.float64),
        weights=torch.tensor([0.3, 0.3, 0.25, 0.15], dtype=torch.float64),
        unsafe=torch.tensor([False, False, True, True]),
    )


def _two_blobs() -> GaussianMixture:
    """2-D mixture: safe N((−2, 0), 0.5² I) with weight 0.6, unsafe N((2, 0), 0.5² I) with weight 0.4."""
    return GaussianMixture(
        means=torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
        stds=torch.tensor([0.5, 0.5], dtype=torch.float64),
        weights=torch.tensor([0.6, 0.4], dtype=torch.float64),
        unsafe=torch.tensor([False, True]),
    )


@pytest.mark.parametrize("dim", [2, 16, 64])
@pytest.mark.parametrize("alpha", [0.95, 0.7, 0.3])
def test_identity_exact_on_mixture(dim: int, alpha: float) -> None:
    generator = torch.Generator().manual_seed(dim)
    mixture = _mixture(dim, generator)
    sigma = math.sqrt(1 - alpha**2)
    # Queries on segments between noised safe and unsafe means sweep β* through moderate values.
    # Random draws in 64 dimensions almost always give β* beyond 1e±4.
    fractions = torch.linspace(0, 1, 401, dtype=torch.float64)[:, None]
    segments = []
    for safe_index, unsafe_index in [(0, 2), (1, 3), (0, 3)]:
        start, end = alpha * mixture.means[safe_index], alpha * mixture.means[unsafe_index]
        segments.append(start + fractions * (end - start))
    x = torch.cat(segments) + 0.1 * sigma * torch.randn(3 * 401, dim, generator=generator, dtype=torch.float64)

    log_beta_star = mixture.log_beta_star(x, alpha, sigma)
    moderate = log_beta_star.abs() < math.log(1e4)
    assert int(moderate.sum()) >= 20, "too few points with moderate β* to test the identity"
    x = x[moderate]
    beta_star = log_beta_star[moderate].exp()

    e_data = mixture.posterior_mean(x, alpha, sigma, "data")
    e_unsafe = mixture.posterior_mean(x, alpha, sigma, "unsafe")
    e_safe = mixture.posterior_mean(x, alpha, sigma, "safe")

    predicted = safe_posterior_mean(e_data, e_unsafe, beta_star)
    assert torch.allclose(predicted, e_safe, atol=1e-6, rtol=0)


def test_paper_estimate_converges_to_unsafe_posterior() -> None:
    """E_unsafe and β from N samples of one Gaussian approach its analytic posterior mean and density."""
    dim, alpha = 4, 0.7
    sigma = math.sqrt(1 - alpha**2)
    unsafe = GaussianMixture(
        means=torch.full((1, dim), 1.0, dtype=torch.float64),
        stds=torch.tensor([0.7], dtype=torch.float64),
        weights=torch.tensor([1.0], dtype=torch.float64),
        unsafe=torch.tensor([True]),
    )
    queries = unsafe.sample_noised(64, alpha, sigma, torch.Generator().manual_seed(0))
    exact_mean = unsafe.posterior_mean(queries, alpha, sigma)
    exact_log_density = unsafe.log_joint(queries, alpha, sigma)[:, 0]

    mean_errors, density_errors = [], []
    for count in (16, 256, 4096):
        mean_error, density_error = 0.0, 0.0
        for seed in range(3):
            bank = unsafe.means[0] + unsafe.stds[0] * torch.randn(
                count, dim, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64
            )
            denoiser = PaperSafeDenoiser(bank, eta=1.0, t_min=0)
            e_unsafe, log_beta = denoiser.estimate(queries, alpha, sigma)
            mean_error += float((e_unsafe - exact_mean).norm(dim=1).mean()) / 3
            density_error += float((log_beta.exp() / exact_log_density.exp() - 1).abs().mean()) / 3
        mean_errors.append(mean_error)
        density_errors.append(density_error)

    assert mean_errors[0] > mean_errors[1] > mean_errors[2], mean_errors
    assert mean_errors[2] < 0.05, mean_errors
    assert density_errors[0] > density_errors[2], density_errors
    assert density_errors[2] < 0.1, density_errors


def _sample_ddim(mixture: GaussianMixture, denoiser: PaperSafeDenoiser | None, count: int) -> Tensor:
    """Sample with 50 deterministic DDIM steps (linear β from 1e-4 to 0.02 over 1000 steps), E_data as model."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    timesteps = torch.linspace(999, 0, 50, dtype=torch.float64).round().long()
    x = torch.randn(count, mixture.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for position, t in enumerate(timesteps):
        alpha, sigma = float(alphas_cumprod[t].sqrt()), float((1 - alphas_cumprod[t]).sqrt())
        x0 = mixture.posterior_mean(x, alpha, sigma)
        if denoiser is not None:
            x0 = denoiser.correct(x0, x, int(t), alpha, sigma).x0_pred
        if position + 1 == len(timesteps):
            return x0
        noise = (x - alpha * x0) / sigma
        t_next = timesteps[position + 1]
        x = alphas_cumprod[t_next].sqrt() * x0 + (1 - alphas_cumprod[t_next]).sqrt() * noise
    raise AssertionError("unreachable")


def test_paper_form_sampling_avoids_unsafe_mass() -> None:
    """Measured by this test (1,000 samples, float64): plain sampling puts 0.39 of the mass in the
    unsafe blob (weight 0.4), and the paper form with η = 30 and max_weight = 10 puts 0.055 there."""
    mixture = _two_blobs()
    bank = mixture.means[1] + mixture.stds[1] * torch.randn(
        1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    plain = _sample_ddim(mixture, None, 1000)
    safe = _sample_ddim(mixture, PaperSafeDenoiser(bank, eta=30.0, t_min=0, max_weight=10.0), 1000)

    plain_unsafe = float((plain[:, 0] > 0).double().mean())
    safe_unsafe = float((safe[:, 0] > 0).double().mean())
    assert 0.3 < plain_unsafe < 0.5
    assert safe_unsafe < 0.12
    assert safe_unsafe < plain_unsafe / 3


def test_paper_form_clamps_weight_and_reports_it() -> None:
    bank = torch.zeros(8, 2, dtype=torch.float64)
    denoiser = PaperSafeDenoiser(bank, eta=1e6, t_min=0, max_weight=2.0)
    x0 = torch.tensor([[0.1, 0.0], [50.0, 0.0]], dtype=torch.float64)
    sample = 0.9 * x0
    out = denoiser.correct(x0, sample, 500, 0.9, math.sqrt(1 - 0.81))

    assert out.stats["clamped"].tolist() == [1.0, 0.0]
    assert out.stats["weight"][0].item() == pytest.approx(2.0)
    assert torch.allclose(out.x0_pred[0], x0[0] + 2.0 * x0[0])
    # Far from the bank β underflows to 0 in float64, log β stays finite and the row is unchanged.
    assert math.isfinite(out.stats["log_beta"][1].item())
    assert torch.equal(out.x0_pred[1], x0[1])


def test_paper_form_window_and_threshold() -> None:
    bank = torch.zeros(4, 3)
    x0 = torch.ones(2, 3)
    sample = torch.stack([torch.zeros(3), torch.full((3,), 5.0)])
    denoiser = PaperSafeDenoiser(bank, eta=1.0, t_min=600, t_max=900, beta_threshold=1e-3)

    outside = denoiser.correct(x0, sample, 950, 0.5, math.sqrt(0.75))
    assert not outside.applied.any()
    assert torch.equal(outside.x0_pred, x0)

    inside = denoiser.correct(x0, sample, 700, 0.5, math.sqrt(0.75))
    # Sample 0 sits on the noised bank (β ≈ 0.18 ≥ 1e-3), sample 1 is far from it (β ≈ 5e-45).
    assert inside.applied.tolist() == [True, False]
    assert not torch.equal(inside.x0_pred[0], x0[0])
    assert torch.equal(inside.x0_pred[1], x0[1])


def test_reference_form_hand_computed_case() -> None:
    """Bank z1 = (0, 0), z2 = (3, 4); x0̂ = (0, 0); σ = 1, s = 0.5; α_t = 0.6, σ_t = 0.8.

    ‖x0̂ − z‖ = 0 and 5, so k = (1, e^(−2.5)) = (1, 0.0820850), S = 1.0820850,
    E_unsafe = 0.0820850·(3, 4)/1.0820850 = (0.2275736, 0.3034314),
    x0_safe = −0.5·E_unsafe = (−0.1137868, −0.1517157), sample = 0.6·x0_safe + 0.8·ξ.
    """
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    denoiser = ReferenceSafeDenoiser(bank, bandwidth=1.0, scale=0.5, t_min=780)
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    sample = torch.full((1, 2), 7.0, dtype=torch.float64)

    out = denoiser.correct(x0, sample, 800, 0.6, 0.8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn((1, 2), generator=torch.Generator().manual_seed(3)).double()

    k2 = math.exp(-2.5)
    expected_x0 = torch.tensor([[-0.5 * 3 * k2 / (1 + k2), -0.5 * 4 * k2 / (1 + k2)]], dtype=torch.float64)
    assert torch.allclose(out.x0_pred, expected_x0, atol=1e-7)
    assert torch.allclose(out.x0_pred, torch.tensor([[-0.1137868, -0.1517157]], dtype=torch.float64), atol=1e-7)
    assert out.stats["log_kernel_sum"].item() == pytest.approx(math.log(1 + k2), abs=1e-12)
    assert out.sample_replaced
    assert torch.allclose(out.sample, 0.6 * expected_x0 + 0.8 * noise, atol=1e-6)


def test_reference_gate_blocks_and_passes() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    sample = torch.ones(1, 2, dtype=torch.float64)
    blocked = ReferenceSafeDenoiser(bank, 1.0, 0.5, 0, gate_threshold=1.1)  # S = 1.082 < 1.1
    passed = ReferenceSafeDenoiser(bank, 1.0, 0.5, 0, gate_threshold=1.05)
    always = ReferenceSafeDenoiser(bank, 1.0, 0.5, 0, gate_threshold=-0.3)

    out = blocked.correct(x0, sample, 900, 0.6, 0.8)
    assert out.applied.tolist() == [False]
    assert torch.equal(out.sample, sample)
    assert torch.equal(out.x0_pred, x0)
    assert passed.correct(x0, sample, 900, 0.6, 0.8).applied.tolist() == [True]
    assert always.correct(x0, sample, 900, 0.6, 0.8).applied.tolist() == [True]


def test_reference_gate_calibration() -> None:
    latents = torch.randn(24, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    bank = NegationBank.from_tensor(latents, normalisation="channel_l2")
    scheduler = make_scheduler("ddpm")
    calibration = calibrate_reference_gate(bank, scheduler, num_inference_steps=10, bandwidth=3.15)

    assert len(calibration.timesteps) == 10
    assert calibration.timesteps[-1] == 1.0  # SD's DDPM with steps_offset=1 ends at t = 1
    # At t = 1 each noised latent nearly coincides with its own bank entry, so S ≥ 1 − ε.
    last_min_s = math.exp(calibration.min_log_kernel_sum[-1])
    assert last_min_s > 0.9
    assert calibration.threshold == pytest.approx(last_min_s - 1.6)
    assert scheduler.num_inference_steps is None  # the caller's scheduler is left untouched

    only_last = calibrate_reference_gate(bank, scheduler, 10, 3.15, all_timesteps=False)
    assert only_last.threshold == pytest.approx(calibration.threshold, abs=1e-9)
    assert math.isnan(only_last.min_log_kernel_sum[0])

    lenient = calibrate_reference_gate(bank, scheduler, 10, 3.15, margin=100.0)
    assert lenient.threshold <= 0
    gated = ReferenceSafeDenoiser(bank, 3.15, 0.33, 0, gate_threshold=lenient)
    assert gated.gate_threshold == lenient.threshold
    far = torch.full((2, 4, 4, 4), 1e3)
    assert gated.correct(far, far, 999, 0.1, math.sqrt(0.99)).applied.all()


def test_large_distances_stay_finite() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(64, 4, 16, 16, generator=generator)
    x0 = torch.randn(3, 4, 16, 16, generator=generator) + 200.0  # ‖x0̂ − z‖ ≈ 6,400
    sample = 0.07 * x0 + 0.997 * torch.randn(3, 4, 16, 16, generator=generator)

    reference = ReferenceSafeDenoiser(bank, bandwidth=1.0, scale=0.33, t_min=0)
    out = reference.correct(x0, sample, 999, 0.07, 0.997, generator=torch.Generator().manual_seed(1))
    for name, value in out.stats.items():
        assert torch.isfinite(value).all(), name
    assert torch.isfinite(out.x0_pred).all()
    assert torch.isfinite(out.sample).all()

    paper = PaperSafeDenoiser(bank, eta=1.0, t_min=0, kernel_scale=0.01)
    out = paper.correct(x0, sample, 999, 0.07, 0.997)
    assert torch.isfinite(out.stats["log_beta"]).all()
    assert torch.isfinite(out.x0_pred).all()


def test_squared_distances_match_direct() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 30, generator=generator, dtype=torch.float64)
    bank = torch.randn(70, 30, generator=generator, dtype=torch.float64)
    direct = ((queries[:, None, :] - 0.8 * bank[None]) ** 2).sum(-1)
    expanded = squared_distances(queries, bank, bank_scale=0.8, chunk_size=16)
    assert torch.allclose(expanded, direct, rtol=1e-12, atol=1e-10)
    assert (squared_distances(bank[:3], bank[:3]).diagonal() >= 0).all()


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from safedenoise import PaperSafeDenoiser, ReferenceSafeDenoiser
    torch.set_num_threads(1)
    n, d, b = 4096, 16384, 4
    bank = torch.randn(n, 4, 64, 64)
    reference = ReferenceSafeDenoiser(bank, bandwidth=3.15, scale=0.33, t_min=0)
    paper = PaperSafeDenoiser(reference.bank, eta=1.0, t_min=0)
    x0 = torch.randn(b, 4, 64, 64)
    reference.bank.flat()  # the (N, D) view every form shares
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference.correct(x0, x0, 999, 0.1, 0.995)
    paper.correct(x0, x0, 999, 0.1, 0.995)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) // 1024)
    """
)


def test_kernel_memory_is_not_batch_times_bank() -> None:
    """N = 4096, D = 16384, B = 4: a (B, N, D) float32 tensor would take 1 GiB; the peak RSS must grow far less."""
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE.format(root=root)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    growth_mib = int(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 300, f"peak RSS grew by {growth_mib} MiB"
