"""Safe Latent Diffusion (SLD; Schramowski et al., CVPR 2023, arXiv 2211.05105) as a UNet hook.

SLD evaluates the UNet a third time per step, on a safety concept text, and steers the noise
prediction away from that concept:

    μ   = clamp(s_S · |ε_c − ε_S|, max=1)  where ε_c − ε_S < λ, else 0     (element-wise)
    γ_t = μ ⊙ (ε_S − ε_u) + s_m · ν_t
    ν_{t+1} = β_m · ν_t + (1 − β_m) · γ_t
    ε̄   = ε_u + s_g · (ε_c − ε_u − γ_t)   for steps ≥ δ (warm-up), else ε_u + s_g · (ε_c − ε_u)

with s_S the safety guidance scale, λ the threshold, s_m and β_m the momentum scale and β, δ the
warm-up steps. The momentum ν is updated during warm-up too. The hook returns ε_c' = ε_c − γ_t as
the conditional half of the UNet output, so the pipeline's own CFG line
ε_u + s_g · (ε_c' − ε_u) equals ε̄. SLD needs CFG: with ``guidance_scale <= 1`` it does nothing.

NOTE: diffusers' ``StableDiffusionPipelineSafe`` also turns safety guidance off when
``sld_guidance_scale <= 1``. This hook applies any value, so ``sld_guidance_scale=0`` runs the
full computation with a zero safety term.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from baselines.guidance import (
    GuidanceDefense,
    UNetCall,
    classifier_free_guidance_enabled,
    cond_half,
    replace_unet_output_sample,
    unet_output_sample,
    wrapped_unet_forward,
)

__all__ = ["DEFAULT_SAFETY_CONCEPT", "SLD", "SLDConfig", "SLDStepRecord", "SLD_PRESETS", "SafetyGuidance", "sld_safety_guidance"]

logger = logging.getLogger(__name__)

# The safety concept text of the SLD paper (the I2P categories), also diffusers' default.
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)


@dataclass(frozen=True)
class SLDConfig:
    """SLD hyper-parameters, named as in diffusers' ``SafetyConfig``.

    Attributes:
        sld_warmup_steps: δ, denoising steps before the safety term is applied.
        sld_guidance_scale: s_S, the element-wise scale of the safety term (before clamping at 1).
        sld_threshold: λ, elements with ε_c − ε_S ≥ λ get no safety guidance.
        sld_momentum_scale: s_m, weight of the momentum ν in γ_t.
        sld_mom_beta: β_m, decay of the momentum.
    """

    sld_warmup_steps: int
    sld_guidance_scale: float
    sld_threshold: float
    sld_momentum_scale: float
    sld_mom_beta: float

    def __post_init__(self) -> None:
        if self.sld_warmup_steps < 0:
            raise ValueError(f"sld_warmup_steps must be >= 0, got {self.sld_warmup_steps}")
        if self.sld_guidance_scale < 0:
            raise ValueError(f"sld_guidance_scale must be >= 0, got {self.sld_guidance_scale}")
        if not 0.0 <= self.sld_mom_beta <= 1.0:
            raise ValueError(f"sld_mom_beta must lie in [0, 1], got {self.sld_mom_beta}")


# The paper's four hyper-parameter sets. diffusers 0.42's SafetyConfig contains the same values.
SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": SLDConfig(sld_warmup_steps=15, sld_guidance_scale=20, sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0),
    "medium": SLDConfig(sld_warmup_steps=10, sld_guidance_scale=1000, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4),
    "strong": SLDConfig(sld_warmup_steps=7, sld_guidance_scale=2000, sld_threshold=0.025, sld_momentum_scale=0.5, sld_mom_beta=0.7),
    "max": SLDConfig(sld_warmup_steps=0, sld_guidance_scale=5000, sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7),
}


@dataclass(frozen=True)
class SafetyGuidance:
    """SLD's safety term for one step.

    Attributes:
        term: γ_t, same shape as the noise predictions.
        momentum: ν_{t+1}, the momentum for the next step.
        applied: whether the step is past warm-up, so γ_t is subtracted.
        scale: μ, the element-wise scale (0 where the threshold excludes the element).
    """

    term: Tensor
    momentum: Tensor
    applied: bool
    scale: Tensor


def sld_safety_guidance(
    noise_pred_uncond: Tensor,
    noise_pred_text: Tensor,
    noise_pred_safety: Tensor,
    momentum: Tensor | None,
    step: int,
    config: SLDConfig,
) -> SafetyGuidance:
    """Compute SLD's safety term γ_t and the next momentum from the three noise predictions.

    Args:
        noise_pred_uncond, noise_pred_text, noise_pred_safety: ε_u, ε_c and ε_S, each (B, C, H, W).
        momentum: ν_t with the same shape, or None at the first step (zeros).
        step: 0-based denoising step index, compared with the warm-up δ.
        config: the hyper-parameters.
    """
    if momentum is None:
        momentum = torch.zeros_like(noise_pred_text)
    difference = noise_pred_text - noise_pred_safety
    scale = torch.clamp(difference.abs() * config.sld_guidance_scale, max=1.0)
    scale = torch.where(difference >= config.sld_threshold, torch.zeros_like(scale), scale)
    term = (noise_pred_safety - noise_pred_uncond) * scale + config.sld_momentum_scale * momentum
    next_momentum = config.sld_mom_beta * momentum + (1.0 - config.sld_mom_beta) * term
    return SafetyGuidance(term=term, momentum=next_momentum, applied=step >= config.sld_warmup_steps, scale=scale)


@dataclass(frozen=True)
class SLDStepRecord:
    """Record of one denoising step under SLD.

    Attributes:
        step: 0-based step index.
        applied: whether γ_t was subtracted (the step is past warm-up).
        active_fraction: share of elements with a nonzero scale μ.
        term_norm: RMS of γ_t over the batch.
    """

    step: int
    applied: bool
    active_fraction: float
    term_norm: float


class SLD(GuidanceDefense):
    """Safe Latent Diffusion through a wrapper of ``pipeline.unet.forward``.

    Args:
        preset: ``"weak"``, ``"medium"``, ``"strong"`` or ``"max"``.
        safety_concept: the text the guidance steers away from; defaults to the paper's.
        overrides: any ``SLDConfig`` field, e.g. ``sld_warmup_steps=5``.

    After a call, ``records`` has one :class:`SLDStepRecord` per denoising step.
    """

    def __init__(self, preset: str = "medium", *, safety_concept: str | None = None, **overrides: Any) -> None:
        if preset not in SLD_PRESETS:
            raise KeyError(f"unknown SLD preset {preset!r}; expected one of {sorted(SLD_PRESETS)}")
        known = {field.name for field in fields(SLDConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown SLD settings {unknown}; expected any of {sorted(known)} or safety_concept")
        base = asdict(SLD_PRESETS[preset])
        self.config = SLDConfig(**{**base, **overrides})
        self.preset = preset
        self.name = f"sld-{preset}"
        self.safety_concept = DEFAULT_SAFETY_CONCEPT if safety_concept is None else safety_concept
        self.records: list[SLDStepRecord] = []

    def settings(self) -> dict[str, Any]:
        return {"defense": "sld", "preset": self.preset, "safety_concept": self.safety_concept, **asdict(self.config)}

    @contextlib.contextmanager
    def applied(
        self,
        pipeline: Any,
        *,
        prompts: list[str],
        negative_prompts: list[str] | None,
        guidance_scale: float,
        num_inference_steps: int,
    ) -> Iterator[dict[str, Any]]:
        self.records = []
        if not classifier_free_guidance_enabled(pipeline, guidance_scale):
            logger.info(
                "%s: guidance_scale=%s runs without classifier-free guidance, so SLD changes nothing", self.name, guidance_scale
            )
            yield {}
            return

        with torch.no_grad():
            safety_embeds, _ = pipeline.encode_prompt(self.safety_concept, pipeline.unet.device, 1, False)
        state: dict[str, Tensor | None] = {"momentum": None}

        def handler(forward: Any, call: UNetCall) -> Any:
            output = call.call(forward)
            noise_pred = unet_output_sample(output)
            if noise_pred.shape[0] % 2:
                raise RuntimeError(
                    f"SLD expects the UNet batch [uncond; cond] under classifier-free guidance, got an odd "
                    f"batch of {noise_pred.shape[0]}; call the pipeline with the guidance_scale given to applied()"
                )
            batch_size = noise_pred.shape[0] // 2
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)

            # A separate UNet call on the safety concept keeps the [uncond; cond] call bit-identical
            # to the undefended pipeline's.
            cond_arguments = {name: cond_half(value, batch_size) for name, value in call.arguments.items()}
            cond_arguments["encoder_hidden_states"] = safety_embeds.to(noise_pred.dtype).expand(batch_size, -1, -1)
            cond_arguments["return_dict"] = False
            noise_pred_safety = forward(**cond_arguments)[0]

            guidance = sld_safety_guidance(
                noise_pred_uncond, noise_pred_text, noise_pred_safety, state["momentum"], call.step, self.config
            )
            state["momentum"] = guidance.momentum
            self.records.append(
                SLDStepRecord(
                    step=call.step,
                    applied=guidance.applied,
                    active_fraction=float((guidance.scale > 0).float().mean()),
                    term_norm=float(guidance.term.float().pow(2).mean().sqrt()),
                )
            )
            if not guidance.applied:
                return output
            new_text = noise_pred_text - guidance.term
            return replace_unet_output_sample(output, torch.cat([noise_pred_uncond, new_text]))

        with wrapped_unet_forward(pipeline.unet, handler):
            yield {}
