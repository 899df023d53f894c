"""Noise levels and x0 conversions for the diffusers schedulers the hook supports.

Every supported scheduler is mapped to one convention, the variance-preserving (VP) one:
``x̃ = α_t·x0 + σ_t·ε`` with ``α_t² + σ_t² = 1``. DDPM, DDIM and DPM-Solver samples are
already VP. Euler-type schedulers (Euler, Euler ancestral, LMS) keep ``x = x0 + σ·ε``,
which is the VP sample divided by α_t = 1/√(σ² + 1); ``NoiseLevel.sample_scale`` is that α_t,
so ``x̃ = sample_scale · sample`` for every scheduler. Working in one convention keeps the
paper form's density β and any threshold on it comparable across samplers, because a density
changes by the Jacobian α_t^D when the sample is rescaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from torch import Tensor

__all__ = [
    "NoiseLevel",
    "SUPPORTED_SCHEDULERS",
    "noise_level",
    "model_output_to_x0",
    "x0_change_to_model_output_change",
    "noise_levels",
    "step_reads_stored_sample",
]

# Schedulers whose step reads ᾱ_t = alphas_cumprod[timestep] directly. PNDM (Stable Diffusion
# v1's default) evaluates the model at every timestep it passes to step, its repeated PLMS timestep
# included, so the model output always belongs to (sample, timestep) at that ᾱ_t.
_ALPHAS_CUMPROD_SCHEDULERS = (DDPMScheduler, DDIMScheduler, PNDMScheduler)
# Schedulers that index ``sigmas`` by step but keep VP samples (σ = √((1 − ᾱ)/ᾱ)).
_VP_SIGMA_SCHEDULERS = (DPMSolverMultistepScheduler,)
# Schedulers whose samples are x0 + σ·ε (inputs are divided by √(σ² + 1) in scale_model_input).
_EULER_TYPE_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler)

SUPPORTED_SCHEDULERS: tuple[type, ...] = (
    _ALPHAS_CUMPROD_SCHEDULERS + _VP_SIGMA_SCHEDULERS + _EULER_TYPE_SCHEDULERS
)

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseLevel:
    """The noise level of one scheduler step in the VP convention.

    Attributes:
        alpha: α_t, the signal scale (dimensionless, in (0, 1]).
        sigma: σ_t, the noise scale (dimensionless, α_t² + σ_t² = 1).
        sample_scale: factor that maps the scheduler's sample to the VP sample x̃ (1 for VP schedulers,
            1/√(σ² + 1) for Euler-type schedulers).
        step_index: index into the scheduler's ``sigmas`` for sigma-indexed schedulers, otherwise None.
    """

    alpha: float
    sigma: float
    sample_scale: float
    step_index: int | None = None


def _scalar_timestep(timestep: Any) -> float:
    if isinstance(timestep, Tensor):
        if timestep.numel() != 1:
            values = timestep.flatten()
            if not bool((values == values[0]).all()):
                raise ValueError(
                    f"the safe denoiser hook needs one timestep per step, got distinct per-sample "
                    f"timesteps {values.tolist()}"
                )
            timestep = values[0]
        return float(timestep.item())
    return float(timestep)


def _current_step_index(scheduler: Any, timestep: Any) -> int:
    """Return the index the scheduler's next ``step`` call will use, without changing its state."""
    if scheduler.step_index is not None:
        return int(scheduler.step_index)
    if scheduler.begin_index is not None:
        return int(scheduler.begin_index)
    if isinstance(timestep, Tensor):
        timestep = timestep.to(scheduler.timesteps.device)
    return int(scheduler.index_for_timestep(timestep))


def noise_level(scheduler: Any, timestep: Any) -> NoiseLevel:
    """Compute the VP noise level that the scheduler's next ``step`` at ``timestep`` will use.

    Raises:
        TypeError: the scheduler class is not one of ``SUPPORTED_SCHEDULERS``.
        ValueError: the scheduler is configured for flow matching.
    """
    if isinstance(scheduler, _ALPHAS_CUMPROD_SCHEDULERS):
        t = int(round(_scalar_timestep(timestep)))
        alpha_bar = float(scheduler.alphas_cumprod[t])
        return NoiseLevel(alpha=math.sqrt(alpha_bar), sigma=math.sqrt(1.0 - alpha_bar), sample_scale=1.0)

    if isinstance(scheduler, _VP_SIGMA_SCHEDULERS + _EULER_TYPE_SCHEDULERS):
        if getattr(scheduler.config, "use_flow_sigmas", False):
            raise ValueError(
                f"{type(scheduler).__name__} is configured with use_flow_sigmas=True; the safe "
                "denoiser hook supports only variance-preserving noise schedules"
            )
        index = _current_step_index(scheduler, timestep)
        sigma_k = float(scheduler.sigmas[index])
        alpha = 1.0 / math.sqrt(sigma_k * sigma_k + 1.0)
        sample_scale = alpha if isinstance(scheduler, _EULER_TYPE_SCHEDULERS) else 1.0
        return NoiseLevel(alpha=alpha, sigma=sigma_k * alpha, sample_scale=sample_scale, step_index=index)

    supported = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
    raise TypeError(
        f"scheduler {type(scheduler).__name__} is not supported by the safe denoiser hook; "
        f"use one of: {supported}"
    )


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; expected one of {_PREDICTION_TYPES}"
        )


def model_output_to_x0(
    model_output: Tensor, vp_sample: Tensor, level: NoiseLevel, prediction_type: str
) -> Tensor:
    """Convert a model output to its x0-prediction, given the VP sample x̃ (same shape)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (vp_sample - level.sigma * model_output) / level.alpha
    if prediction_type == "v_prediction":
        return level.alpha * vp_sample - level.sigma * model_output
    return model_output


def x0_change_to_model_output_change(delta_x0: Tensor, level: NoiseLevel, prediction_type: str) -> Tensor:
    """Return the change of the model output that moves its x0-prediction by ``delta_x0``.

    The sample is held fixed. Adding the change instead of re-deriving the output from the new
    x0 keeps an unchanged x0 bit-exact. Epsilon: Δε = −(α/σ)·Δx0; v: Δv = −Δx0/σ; sample: Δx0.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return delta_x0
    if level.sigma <= 0.0:
        raise ValueError(
            f"cannot express an x0 change as a {prediction_type} change at σ_t = {level.sigma}; "
            "limit the correction window to timesteps with noise"
        )
    if prediction_type == "epsilon":
        return delta_x0 * (-level.alpha / level.sigma)
    return delta_x0 * (-1.0 / level.sigma)


def noise_levels(scheduler: Any, timesteps: Tensor) -> list[NoiseLevel]:
    """Return the noise level at each of ``timesteps`` on a scheduler that has not stepped yet."""
    levels = []
    for position, t in enumerate(timesteps):
        if isinstance(scheduler, _ALPHAS_CUMPROD_SCHEDULERS):
            levels.append(noise_level(scheduler, t))
            continue
        if isinstance(scheduler, _VP_SIGMA_SCHEDULERS + _EULER_TYPE_SCHEDULERS):
            sigma_k = float(scheduler.sigmas[position])
            alpha = 1.0 / math.sqrt(sigma_k * sigma_k + 1.0)
            sample_scale = alpha if isinstance(scheduler, _EULER_TYPE_SCHEDULERS) else 1.0
            levels.append(NoiseLevel(alpha, sigma_k * alpha, sample_scale, position))
            continue
        noise_level(scheduler, t)  # raises the unsupported-scheduler error
    return levels


def step_reads_stored_sample(scheduler: Any) -> bool:
    """Return whether the scheduler's next ``step`` ignores its ``sample`` argument for a stored one.

    PNDM's PLMS mode (``skip_prk_steps=True``, as in Stable Diffusion) evaluates the model twice
    at its first timestep pair: the second call (counter 1) averages the two outputs and steps
    from the sample stored by the first. Its Runge-Kutta mode steps from the stored sample in
    three of every four calls. A sample replaced on those calls would be discarded.
    """
    if not isinstance(scheduler, PNDMScheduler):
        return False
    counter = int(scheduler.counter)
    if not scheduler.config.skip_prk_steps and counter < len(scheduler.prk_timesteps):
        return counter % 4 != 0
    return bool(scheduler.config.skip_prk_steps) and counter == 1


def as_float(value: float | Tensor) -> float:
    """Return a Python float from a number or a one-element tensor."""
    if isinstance(value, Tensor):
        return float(value.detach().reshape(-1)[0].item())
    return float(value)

