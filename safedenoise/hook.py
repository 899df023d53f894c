"""One hook that applies a safe denoiser inside any diffusers pipeline that calls ``scheduler.step``.

The hook wraps ``step`` on the scheduler instance. Pipelines call ``step`` with the noise
prediction after classifier-free guidance (and after SLD's or SAFREE's terms, which act on the
prediction before ``step``), so the correction sees the guided prediction and composes with those
defenses without copying any pipeline. Per step the wrapper:

1. converts the model output to the VP sample x̃ and the x0-prediction (epsilon, v_prediction or
   sample; VP and Euler-type schedulers, see :mod:`safedenoise.schedules`);
2. calls ``denoiser.correct``;
3. paper form: adds to the model output the change that moves its x0-prediction to the corrected
   x0; reference form: replaces the sample by the re-noised one and keeps the model output;
4. calls the original ``step`` with every original argument.

PNDM steps that read a sample the scheduler stored earlier (the second call of PLMS's first
timestep pair; three of four Runge-Kutta calls) ignore the ``sample`` argument. There the reference
form, which replaces the sample, is not applied, and the step record marks this
(``applied`` all False, statistic ``skipped_stored_sample``). The paper form acts on the model
output and applies on every step.

NOTE: on a guided prediction x0_g = E_u + λ·(E_c − E_u) the paper form yields
E_safe(E_u) + λ·(E_c − E_u) + η·β·λ·(E_c − E_u), while the published combination replaces only the
unguided term (Kim et al., arXiv 2502.08011); the extra η·β·λ·(E_c − E_u) comes from hooking at
``step``, after guidance.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoiser import SafeDenoiser
from .schedules import (
    SUPPORTED_SCHEDULERS,
    model_output_to_x0,
    noise_level,
    step_reads_stored_sample,
    x0_change_to_model_output_change,
)

__all__ = ["SafeDenoiserHook", "StepRecord"]

logger = logging.getLogger(__name__)

_LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclass(frozen=True)
class StepRecord:
    """Record of one wrapped ``step`` call: its noise level, mask and statistics.

    Attributes:
        step: 0-based count of ``step`` calls since the hook was attached.
        timestep: the scheduler timestep.
        alpha, sigma: the VP noise level used.
        in_window: whether the timestep was inside the denoiser's window.
        applied: (B,) bool on the CPU.
        stats: the denoiser's (B,) statistics, float32 on the CPU.
    """

    step: int
    timestep: float
    alpha: float
    sigma: float
    in_window: bool
    applied: Tensor
    stats: dict[str, Tensor]


class SafeDenoiserHook:
    """Apply a :class:`SafeDenoiser` at every ``step`` of a diffusers scheduler.

    Args:
        denoiser: a PaperSafeDenoiser or ReferenceSafeDenoiser.
        generator: noise for forms that re-noise: one ``torch.Generator`` for the batch, or one per
            sample. None draws from the global generator.
        keep_records: store a :class:`StepRecord` per step in ``records``.

    Usage::

        hook = SafeDenoiserHook(denoiser, generator=torch.Generator().manual_seed(0))
        with hook.attached(pipe.scheduler):
            images = pipe(prompt).images
        hook.records  # one StepRecord per step
    """

    def __init__(
        self,
        denoiser: SafeDenoiser,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        keep_records: bool = True,
    ) -> None:
        if not isinstance(denoiser, SafeDenoiser):
            raise TypeError(f"denoiser must be a SafeDenoiser, got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.generator = generator
        self.keep_records = keep_records
        self.records: list[StepRecord] = []
        self._scheduler: Any = None
        self._had_instance_step = False
        self._original_instance_step: Any = None
        self._calls = 0

    # -- attach / detach ---------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        """Whether the hook currently wraps a scheduler's ``step``."""
        return self._scheduler is not None

    def attach(self, scheduler: Any) -> None:
        """Wrap ``scheduler.step`` on this instance and clear the records."""
        if self._scheduler is not None:
            raise RuntimeError("this hook is already attached; call detach() first")
        if not isinstance(scheduler, SUPPORTED_SCHEDULERS):
            supported = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
            raise TypeError(f"cannot attach to {type(scheduler).__name__}; supported schedulers: {supported}")
        if getattr(scheduler.step, "_safedenoise_hook", None) is not None:
            raise RuntimeError("the scheduler already carries a safe denoiser hook; detach that one first")

        self._had_instance_step = "step" in vars(scheduler)
        self._original_instance_step = vars(scheduler).get("step")
        original_step = scheduler.step
        signature = inspect.signature(original_step)

        @functools.wraps(original_step)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._step(scheduler, original_step, signature, args, kwargs)

        # Pipelines pass `generator` and `eta` only if inspect.signature(scheduler.step) lists them,
        # so the wrapper must expose the original signature.
        step.__signature__ = signature  # type: ignore[attr-defined]
        step._safedenoise_hook = self  # type: ignore[attr-defined]
        scheduler.step = step
        self._scheduler = scheduler
        self.records = []
        self._calls = 0

    def detach(self) -> None:
        """Restore the scheduler's original ``step``; a no-op when not attached."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        if self._had_instance_step:
            scheduler.step = self._original_instance_step
        else:
            del scheduler.step
        self._scheduler = None
        self._original_instance_step = None

    @contextmanager
    def attached(self, scheduler: Any) -> Iterator[SafeDenoiserHook]:
        """Attach for the duration of a ``with`` block; ``step`` is restored even on an exception."""
        self.attach(scheduler)
        try:
            yield self
        finally:
            self.detach()

    # -- the wrapped step ----------------------------------------------------------------------

    def _step(self, scheduler: Any, original_step: Any, signature: inspect.Signature, args: tuple, kwargs: dict) -> Any:
        bound = signature.bind(*args, **kwargs)
        model_output: Tensor = bound.arguments["model_output"]
        timestep = bound.arguments["timestep"]
        sample: Tensor = bound.arguments["sample"]

        if float(bound.arguments.get("s_churn", 0.0) or 0.0) > 0.0:
            raise NotImplementedError(
                "Euler's s_churn > 0 perturbs the sample inside step, after the correction; "
                "run the safe denoiser with s_churn=0"
            )

        new_output, new_sample, record = self._correct(scheduler, model_output, timestep, sample)
        bound.arguments["model_output"] = new_output
        bound.arguments["sample"] = new_sample
        if self.keep_records:
            self.records.append(record)
        self._calls += 1
        return original_step(*bound.args, **bound.kwargs)

    def _correct(self, scheduler: Any, model_output: Tensor, timestep: Any, sample: Tensor) -> tuple[Tensor, Tensor, StepRecord]:
        level = noise_level(scheduler, timestep)
        prediction_type = scheduler.config.prediction_type
        t = float(timestep.reshape(-1)[0].item()) if isinstance(timestep, Tensor) else float(timestep)

        # A learned-variance DDPM output carries the variance in its second half of channels.
        variance = None
        prediction = model_output
        variance_type = getattr(scheduler.config, "variance_type", None)
        if model_output.shape[1] == 2 * sample.shape[1] and variance_type in _LEARNED_VARIANCE_TYPES:
            prediction, variance = torch.split(model_output, sample.shape[1], dim=1)

        if not self.denoiser.in_window(t):
            output = self.denoiser.unchanged_output(prediction, sample)
            return model_output, sample, self._record(t, level, False, output.applied, output.stats)
        if self.denoiser.replaces_sample and step_reads_stored_sample(scheduler):
            output = self.denoiser.unchanged_output(prediction, sample)
            stats = {**output.stats, "skipped_stored_sample": torch.ones(sample.shape[0])}
            return model_output, sample, self._record(t, level, True, output.applied, stats)

        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        vp_sample = sample.to(work) * level.sample_scale
        x0 = model_output_to_x0(prediction.to(work), vp_sample, level, prediction_type)
        result = self.denoiser.correct(x0, vp_sample, t, level.alpha, level.sigma, generator=self.generator)

        if result.sample_replaced:
            # Reference form: new sample, unchanged model output.
            new_sample = (result.sample.to(work) / level.sample_scale).to(sample.dtype)
            new_output = model_output
        else:
            delta_x0 = result.x0_pred.to(work) - x0
            delta = x0_change_to_model_output_change(delta_x0, level, prediction_type)
            new_prediction = (prediction.to(work) + delta).to(prediction.dtype)
            new_output = new_prediction if variance is None else torch.cat([new_prediction, variance], dim=1)
            new_sample = sample

        return new_output, new_sample, self._record(t, level, True, result.applied, result.stats)

    def _record(self, t: float, level: Any, in_window: bool, applied: Tensor, stats: Any) -> StepRecord:
        record = StepRecord(
            step=self._calls,
            timestep=t,
            alpha=level.alpha,
            sigma=level.sigma,
            in_window=in_window,
            applied=applied.detach().to("cpu"),
            stats={k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in stats.items()},
        )
        if in_window:
            logger.debug(
                "step %d t=%.1f: correction applied to %d of %d samples",
                record.step,
                t,
                int(record.applied.sum()),
                record.applied.numel(),
            )
        return record

    # -- summaries -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Summarise the records: steps, window timesteps, fraction applied and fraction clamped.

        ``applied_fraction`` and ``clamped_fraction`` are over (sample, step) pairs inside the window;
        ``clamped_fraction`` is NaN for forms that do not clamp.
        """
        window = [r for r in self.records if r.in_window]
        pairs = sum(r.applied.numel() for r in window)
        applied = sum(int(r.applied.sum()) for r in window)
        clamped = [r.stats["clamped"] for r in window if "clamped" in r.stats]
        return {
            "steps": len(self.records),
            "window_timesteps": [r.timestep for r in window],
            "applied_fraction": applied / pairs if pairs else math.nan,
            "clamped_fraction": float(torch.cat(clamped).mean()) if clamped else math.nan,
        }
