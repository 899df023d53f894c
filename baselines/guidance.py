"""Guidance defenses applied to an unmodified diffusers ``StableDiffusionPipeline`` through hooks.

A guidance defense changes what the pipeline's UNet returns (SLD) or what it is conditioned on
(SAFREE) by wrapping ``pipeline.unet.forward`` on the instance for one pipeline call, and restores
it afterwards. No pipeline is copied. Usage::

    defense = get_guidance_defense("sld-medium", NUDITY_CONCEPTS)
    with defense.applied(pipe, prompts=prompts, negative_prompts=None,
                         guidance_scale=7.5, num_inference_steps=50) as extra_kwargs:
        kwargs = {"prompt": prompts, "guidance_scale": 7.5, "num_inference_steps": 50}
        kwargs.update(extra_kwargs)
        images = pipe(**kwargs).images

``extra_kwargs`` may set ``prompt`` and ``negative_prompt`` to None and pass ``prompt_embeds`` and
``negative_prompt_embeds`` instead, so the caller must apply it after its own arguments.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GUIDANCE_DEFENSES",
    "GuidanceDefense",
    "UNetCall",
    "classifier_free_guidance_enabled",
    "get_guidance_defense",
    "wrapped_unet_forward",
]

logger = logging.getLogger(__name__)

GUIDANCE_DEFENSES: tuple[str, ...] = ("sld-weak", "sld-medium", "sld-strong", "sld-max", "safree")


class GuidanceDefense(abc.ABC):
    """A defense that acts on one pipeline call through hooks on the pipeline's modules."""

    name: str

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Return every value that changes the images, JSON-serialisable, for hashing and records."""

    @abc.abstractmethod
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
        """Install the defense on ``pipeline`` for one call and yield extra or overriding kwargs.

        The pipeline is restored on exit, also after an exception.
        """


def classifier_free_guidance_enabled(pipeline: Any, guidance_scale: float) -> bool:
    """Return whether ``StableDiffusionPipeline`` batches [uncond; cond] for this guidance scale.

    Mirrors the pipeline's own rule: CFG runs when ``guidance_scale > 1`` and the UNet has no
    guidance embedding (``time_cond_proj_dim`` is None).
    """
    return guidance_scale > 1.0 and getattr(pipeline.unet.config, "time_cond_proj_dim", None) is None


@dataclass
class UNetCall:
    """One call of the wrapped UNet forward with its arguments bound by name.

    Attributes:
        step: 0-based count of UNet calls since the wrapper was installed. With CFG the pipeline
            calls the UNet once per denoising step, so this is the denoising step index.
        arguments: the original forward's arguments by parameter name (``sample``, ``timestep``,
            ``encoder_hidden_states``, ``return_dict``, ...), including defaults.
    """

    step: int
    arguments: dict[str, Any]

    def call(self, forward: Callable[..., Any], **replacements: Any) -> Any:
        """Call ``forward`` with these arguments, replacing the ones named in ``replacements``."""
        return forward(**{**self.arguments, **replacements})


def unet_output_sample(output: Any) -> Tensor:
    """Return the predicted tensor of a UNet output (a tuple, or an output with ``.sample``)."""
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def replace_unet_output_sample(output: Any, sample: Tensor) -> Any:
    """Return ``output`` of the same type with its predicted tensor replaced by ``sample``."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


def cond_half(value: Any, batch_size: int) -> Any:
    """Return the conditional half of a tensor (or dict of tensors) batched as [uncond; cond].

    Tensors whose first dimension is not ``2 * batch_size`` (a scalar timestep, shared tensors)
    are returned unchanged.
    """
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == 2 * batch_size:
        return value[batch_size:]
    if isinstance(value, dict):
        return {key: cond_half(item, batch_size) for key, item in value.items()}
    return value


@contextlib.contextmanager
def wrapped_unet_forward(
    unet: torch.nn.Module, handler: Callable[[Callable[..., Any], UNetCall], Any]
) -> Iterator[None]:
    """Replace ``unet.forward`` on the instance by ``handler`` for a ``with`` block.

    ``handler(original_forward, call)`` receives the forward in place before (an earlier instance
    wrapper or the class method) and the bound arguments, and returns the UNet output. The previous
    forward is restored on exit, also after an exception.
    """
    if getattr(unet.forward, "_guidance_defense_wrapper", False):
        raise RuntimeError(
            "unet.forward already carries a guidance defense wrapper; apply one guidance defense at a time"
        )
    had_instance_forward = "forward" in vars(unet)
    previous_instance_forward = vars(unet).get("forward")
    original_forward = unet.forward
    # Arguments are named after the class's forward, so an earlier instance wrapper with a
    # (*args, **kwargs) signature still receives them by their usual names.
    signature = inspect.signature(type(unet).forward.__get__(unet))
    steps = 0

    @functools.wraps(original_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = UNetCall(step=steps, arguments=dict(bound.arguments))
        steps += 1
        return handler(original_forward, call)

    forward._guidance_defense_wrapper = True  # type: ignore[attr-defined]
    unet.forward = forward
    try:
        yield
    finally:
        if had_instance_forward:
            unet.forward = previous_instance_forward
        else:
            del unet.forward


def get_guidance_defense(name: str, concept_prompts: Sequence[str], **overrides: Any) -> GuidanceDefense:
    """Build a registered guidance defense.

    Args:
        name: one of ``GUIDANCE_DEFENSES``.
        concept_prompts: phrases that stand for the unsafe concept for this model. SAFREE builds its
            toxic subspace (and, by default, its negative prompt) from them. SLD ignores them and
            uses its own safety concept text unless ``safety_concept=`` is given.
        overrides: settings of the defense, e.g. ``sld_guidance_scale=0`` or ``alpha=0.05``.
    """
    from baselines.safree import SAFREE
    from baselines.sld import SLD, SLD_PRESETS

    if name.startswith("sld-") and name[len("sld-") :] in SLD_PRESETS:
        return SLD(preset=name[len("sld-") :], **overrides)
    if name == "safree":
        return SAFREE(concept_prompts, **overrides)
    raise KeyError(f"unknown guidance defense {name!r}; known guidance defenses are {list(GUIDANCE_DEFENSES)}")
