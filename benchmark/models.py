"""Loading base pipelines and their schedulers: the embedded miniature model or local weights.

Nothing is ever downloaded. A model is one of:

- ``mini``: the embedded miniature text-to-image model that ships inside this package;
- a local diffusers folder (``model_index.json`` inside), e.g. a Stable Diffusion snapshot;
- a single-file checkpoint (``.safetensors``; ``.ckpt`` only through safe unpickling), loaded with
  diffusers' ``from_single_file`` and a local config folder;
- a hub id such as ``CompVis/stable-diffusion-v1-4`` that is already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The embedded models: text-to-image, class-conditional and unconditional. The last two take no
# prompt, so text-side defenses do not apply to them.
EMBEDDED_MODELS = ("mini", "mini-class", "mini-uncond")
PROMPTLESS_MODELS = ("mini-class", "mini-uncond")


@dataclass
class LatentDigitModel:
    """A class-conditional or unconditional miniature latent model: UNet, the shared VAE, scheduler."""

    unet: object
    vae: object
    scheduler: object
    conditional: bool


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded locally."""


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline plus the id that goes into every stored row."""

    model_id: str
    pipeline: object
    kind: str


def make_scheduler(sampler: str, config: dict):
    """Return a fresh scheduler of the protocol's family built from a pipeline's scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
    )

    if sampler == "ddpm":
        return DDPMScheduler.from_config(config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if sampler == "lms":
        return LMSDiscreteScheduler.from_config(config)
    if sampler == "pndm":
        # PLMS without Runge-Kutta warm-up steps, as Stable Diffusion v1's scheduler config sets.
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    raise ValueError(f"unknown sampler {sampler!r}; expected ddpm, ddim, dpmsolver++, euler, lms or pndm")


_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def _missing_config_message(path: Path) -> str:
    return (
        f"single-file checkpoint {path} needs a local config folder (a diffusers pipeline folder of the "
        "same architecture; its config and tokenizer files are enough): pass --model-config DIR, because "
        "diffusers would otherwise download the config from the hub"
    )


def check_model_reference(model: str, config_folder: str | None = None) -> None:
    """Reject a model reference that cannot be loaded locally, without loading anything."""
    if model in EMBEDDED_MODELS:
        return
    if Path(model).suffix in _CHECKPOINT_SUFFIXES and Path(model).expanduser().is_file():
        if config_folder is None:
            raise ModelLoadError(_missing_config_message(Path(model).expanduser()))
        if not (Path(config_folder).expanduser() / "model_index.json").is_file():
            raise ModelLoadError(
                f"--model-config {config_folder}: no model_index.json there; pass a diffusers pipeline folder "
                "of the checkpoint's architecture (its config files are enough, weights are not read)"
            )
    path = Path(model).expanduser()
    looks_like_path = path.is_absolute() or model.startswith((".", "~")) or path.suffix in _CHECKPOINT_SUFFIXES
    if looks_like_path and not path.exists():
        raise ModelLoadError(
            f"model path {path} not found; pass 'mini', an existing diffusers folder or checkpoint file, "
            "or a hub id that is in the local cache"
        )
    if "/" not in model and not path.exists():
        raise ModelLoadError(
            f"model {model!r} not found: pass 'mini', a diffusers folder, a .safetensors file, or a hub id "
            "(owner/name) that is in the local cache"
        )


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """Return the torch device of a run: ``device`` as given, else this process's GPU, else the CPU.

    Raises:
        ModelLoadError: ``device`` is not a device name, or names a CUDA device that is not available.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"--device {device!r} is not a device name; pass cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device!r}: no CUDA device is available here; pass --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        # mps reports through torch.backends.mps, xpu through torch.xpu.
        checks = [getattr(module, "is_available", None) for module in (getattr(torch.backends, resolved.type, None), getattr(torch, resolved.type, None))]
        if not any(check is not None and check() for check in checks):
            raise ModelLoadError(f"--device {device!r}: this torch build has no usable {resolved.type} device; pass --device cpu")
    if resolved.type == "cuda" and resolved.index is None:
        # Each process of a multi-process run takes the GPU of its local rank.
        resolved = torch.device(f"cuda:{local_rank}")
    return resolved


def load_model(
    model: str, dtype: str = "float32", config_folder: str | None = None, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load a text-to-image pipeline from the embedded default, a local folder, file or the cache.

    Real models are moved to ``device``. The embedded models always run on the CPU, where their
    published numbers were measured.
    """
    loaded = _load_model(model, dtype, config_folder)
    # NOTE: only the CPU path is tested; moving a real pipeline to CUDA has not been run on a GPU.
    if loaded.kind in ("folder", "file", "cache"):
        loaded.pipeline.to(torch.device(device))
    elif torch.device(device).type != "cpu":
        logger.info("model %s is embedded and runs on the CPU; --device %s applies to real models only", model, device)
    return loaded


def _load_model(model: str, dtype: str, config_folder: str | None) -> LoadedModel:
    torch_dtype = _DTYPES[dtype]
    if model in PROMPTLESS_MODELS:
        return _load_latent_digit_model(model, torch_dtype)
    if model == "mini":
        from benchmark.mini import WEIGHTS_DIR, load_text2img_pipeline

        pipeline = load_text2img_pipeline(torch_dtype=torch_dtype)
        return LoadedModel(f"mini@{_folder_digest(WEIGHTS_DIR / 'text2img')}", pipeline, "mini")

    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {path} has no model_index.json; pass a diffusers pipeline folder "
                "(the output of save_pretrained) or a single .safetensors checkpoint"
            )
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        return LoadedModel(f"folder:{path.name}@{_folder_digest(path)}", _without_safety_checker(pipeline), "folder")

    if path.suffix in _CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {path} not found")
        if config_folder is None:
            raise ModelLoadError(_missing_config_message(path))
        try:
            pipeline = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config_folder), dtype=torch_dtype, local_files_only=True
            )
        except Exception as error:  # noqa: BLE001 - diffusers raises its own SingleFileComponentError, and others
            raise ModelLoadError(
                f"could not load {path} as a Stable Diffusion single-file checkpoint ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}). The file must use the original layout of the released SD v1 "
                "checkpoints (keys model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*); "
                "a diffusers folder is passed as --model DIR instead"
            ) from error
        return LoadedModel(f"file:{path.name}@{_file_digest(path)}", _without_safety_checker(pipeline), "file")

    if "/" in model and not path.exists():
        try:
            pipeline = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"model {model!r} is not in the local Hugging Face cache and nothing is downloaded: "
                f"copy its snapshot into the cache (HF_HOME) or pass the folder path ({error})"
            ) from error
        return LoadedModel(f"hub-cache:{model}", _without_safety_checker(pipeline), "cache")

    raise ModelLoadError(
        f"model {model!r} not found: pass 'mini', a diffusers folder, a .safetensors file, or a hub id "
        "that is in the local cache"
    )


def _load_latent_digit_model(model: str, torch_dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, DDPMScheduler

    from benchmark.mini import WEIGHTS_DIR
    from benchmark.mini.classcond import load_classcond_unet, load_uncond_unet

    conditional = model == "mini-class"
    folder = WEIGHTS_DIR / ("classcond" if conditional else "uncond")
    unet = (load_classcond_unet() if conditional else load_uncond_unet()).to(torch_dtype)
    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "text2img" / "vae", dtype=torch_dtype)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    digest = _folder_digest(folder)
    return LoadedModel(f"{model}@{digest}", LatentDigitModel(unet, vae, scheduler, conditional), model)


def _without_safety_checker(pipeline):
    # The evaluation scores raw generations; the pipeline's own checker would blank unsafe images
    # and hide exactly what the judges must see.
    if getattr(pipeline, "safety_checker", None) is not None:
        pipeline.safety_checker = None
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt"):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(str(file.stat().st_size).encode())
            if file.suffix != ".safetensors" or file.stat().st_size < 64 * 2**20:
                digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
