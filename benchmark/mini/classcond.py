"""Loading and sampling the miniature class-conditional and unconditional latent diffusion models.

Both are diffusers ``UNet2DModel`` folders (``weights/classcond`` and ``weights/uncond``, each with
a ``scheduler/``) trained by ``benchmark.mini.train_classcond`` on the 4×8×8 scaled latents of the
text-to-image model's VAE, which they share (``weights/text2img/vae``). The class-conditional UNet
takes digits 0–9 and ``NULL_CLASS`` (10), the "no class" label used for classifier-free guidance.

The sampling functions are plain denoising loops that call ``scheduler.step`` once per timestep
with the guided noise prediction, so ``safedenoise.SafeDenoiserHook`` (which wraps
``scheduler.step``) applies to them as it does to a diffusers pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from benchmark.mini.pipeline import TEXT2IMG_DIR, WEIGHTS_DIR
from benchmark.mini.train_classcond import NULL_CLASS, NUM_DIGITS

logger = logging.getLogger(__name__)

CLASSCOND_DIR: Path = WEIGHTS_DIR / "classcond"
UNCOND_DIR: Path = WEIGHTS_DIR / "uncond"
VAE_DIR: Path = TEXT2IMG_DIR / "vae"
# Chosen on the class-conditional model's per-class accuracy; see weights/classcond/README.md.
DEFAULT_GUIDANCE_SCALE: float = 2.0


def _load_unet(folder: Path, torch_dtype: torch.dtype, unconditional: bool) -> UNet2DModel:
    if not (folder / "config.json").is_file():
        flag = " --unconditional" if unconditional else ""
        raise FileNotFoundError(
            f"Miniature UNet weights not found in {folder} (missing config.json). Train them with "
            f"`python -m benchmark.mini.train_classcond --out {folder}{flag}`."
        )
    unet = UNet2DModel.from_pretrained(folder, dtype=torch_dtype).eval()
    has_classes = unet.config.num_class_embeds is not None
    if has_classes == unconditional:
        expected = "no class embedding" if unconditional else f"num_class_embeds={NULL_CLASS + 1}"
        raise ValueError(
            f"The UNet in {folder} has num_class_embeds={unet.config.num_class_embeds}, expected "
            f"{expected}; pass the folder of the matching model."
        )
    return unet


def load_classcond_unet(torch_dtype: torch.dtype = torch.float32, weights_dir: Path | str | None = None) -> UNet2DModel:
    """Load the class-conditional ``UNet2DModel`` (11 class embeddings) in eval mode.

    Args:
        torch_dtype: dtype of the weights.
        weights_dir: a folder written by ``train_classcond``; defaults to the shipped weights.
    """
    folder = Path(weights_dir) if weights_dir is not None else CLASSCOND_DIR
    return _load_unet(folder, torch_dtype, unconditional=False)


def load_uncond_unet(torch_dtype: torch.dtype = torch.float32, weights_dir: Path | str | None = None) -> UNet2DModel:
    """Load the unconditional ``UNet2DModel`` in eval mode.

    Args:
        torch_dtype: dtype of the weights.
        weights_dir: a folder written by ``train_classcond --unconditional``; defaults to the
            shipped weights.
    """
    folder = Path(weights_dir) if weights_dir is not None else UNCOND_DIR
    return _load_unet(folder, torch_dtype, unconditional=True)


def load_scheduler(weights_dir: Path | str | None = None) -> DDPMScheduler:
    """Load the models' ``DDPMScheduler`` (Stable Diffusion's settings) from ``weights_dir/scheduler``."""
    folder = Path(weights_dir) if weights_dir is not None else CLASSCOND_DIR
    return DDPMScheduler.from_pretrained(folder / "scheduler")


def load_vae(torch_dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load the shared VAE (the text-to-image model's) in eval mode."""
    return AutoencoderKL.from_pretrained(VAE_DIR, dtype=torch_dtype).eval()


def _initial_latents(unet: UNet2DModel, scheduler, generators: Sequence[torch.Generator]) -> torch.Tensor:
    parameter = next(unet.parameters())
    shape = (len(generators), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = randn_tensor(shape, generator=list(generators), device=parameter.device, dtype=parameter.dtype)
    return latents * scheduler.init_noise_sigma


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_generators(generators: Sequence[torch.Generator], batch_size: int | None = None) -> None:
    if len(generators) == 0:
        raise ValueError("generators is empty: pass one torch.Generator per image.")
    if batch_size is not None and len(generators) != batch_size:
        raise ValueError(
            f"got {len(generators)} generators for {batch_size} class labels: pass one torch.Generator per image."
        )


@torch.no_grad()
def generate_class_conditional(
    unet: UNet2DModel,
    vae: AutoencoderKL,
    scheduler,
    class_labels: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
) -> torch.Tensor:
    """Sample one image per class label with classifier-free guidance on the label.

    The guided prediction is ``noise_null + guidance_scale · (noise_class − noise_null)``, where
    ``noise_null`` is the prediction for ``NULL_CLASS``; ``guidance_scale`` 1 gives the plain
    conditional model and skips the null-class pass.

    Args:
        unet: a class-conditional UNet from :func:`load_classcond_unet`.
        vae: the shared VAE (:func:`load_vae`).
        scheduler: a diffusers scheduler; its timesteps are reset here.
        class_labels: digits 0–9, one per image.
        generators: one generator per image, used for its initial latent and its step noise, so
            image i depends only on ``class_labels[i]`` and ``generators[i]``.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance weight.

    Returns:
        Images of shape (B, 3, 32, 32), float32 in [0, 1].
    """
    _check_generators(generators, len(class_labels))
    invalid = [label for label in class_labels if not 0 <= int(label) < NUM_DIGITS]
    if invalid:
        raise ValueError(f"invalid class labels {invalid}: expected digits 0–{NUM_DIGITS - 1}.")
    if unet.config.num_class_embeds is None:
        raise ValueError("the UNet has no class embedding: use generate_unconditional for it.")

    device = next(unet.parameters()).device
    labels = torch.tensor([int(label) for label in class_labels], device=device)
    null_labels = torch.full_like(labels, NULL_CLASS)
    use_guidance = guidance_scale != 1.0
    model_labels = torch.cat([labels, null_labels]) if use_guidance else labels

    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = _initial_latents(unet, scheduler, generators)
    for timestep in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if use_guidance else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        noise_pred = unet(model_input, timestep, class_labels=model_labels).sample
        if use_guidance:
            noise_class, noise_null = noise_pred.chunk(2)
            noise_pred = noise_null + guidance_scale * (noise_class - noise_null)
        latents = scheduler.step(noise_pred, timestep, latents, generator=list(generators)).prev_sample
    return _decode(vae, latents)


@torch.no_grad()
def generate_unconditional(
    unet: UNet2DModel,
    vae: AutoencoderKL,
    scheduler,
    generators: Sequence[torch.Generator],
    *,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """Sample one image per generator from the unconditional model.

    Args:
        unet: an unconditional UNet from :func:`load_uncond_unet`.
        vae: the shared VAE (:func:`load_vae`).
        scheduler: a diffusers scheduler; its timesteps are reset here.
        generators: one generator per image, used for its initial latent and its step noise.
        num_inference_steps: denoising steps.

    Returns:
        Images of shape (B, 3, 32, 32), float32 in [0, 1].
    """
    _check_generators(generators)
    if unet.config.num_class_embeds is not None:
        raise ValueError("the UNet has a class embedding: use generate_class_conditional for it.")

    device = next(unet.parameters()).device
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = _initial_latents(unet, scheduler, generators)
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        noise_pred = unet(model_input, timestep).sample
        latents = scheduler.step(noise_pred, timestep, latents, generator=list(generators)).prev_sample
    return _decode(vae, latents)


__all__ = [
    "CLASSCOND_DIR",
    "DEFAULT_GUIDANCE_SCALE",
    "NULL_CLASS",
    "UNCOND_DIR",
    "generate_class_conditional",
    "generate_unconditional",
    "load_classcond_unet",
    "load_scheduler",
    "load_uncond_unet",
    "load_vae",
]
