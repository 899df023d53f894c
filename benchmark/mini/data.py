"""Handwritten digits from scikit-learn as 32×32 RGB images, with a fixed split and augmentation.

The 1,797 images of ``sklearn.datasets.load_digits`` (8×8, grey levels 0–16) ship inside the
scikit-learn wheel, so no download is needed. Each image is scaled to [0, 1], upsampled
bilinearly to 24×24, centred on a 32×32 black canvas (the 4-pixel border leaves room for the
shift and scale augmentation) and replicated to 3 channels: a white digit on black.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMAGE_SIZE: int = 32
DIGIT_SIZE: int = 24
SPLIT_SEED: int = 20240607
SPLIT_SIZES: dict[str, int] = {"train": 1200, "val": 297, "holdout": 300}
SPLITS: tuple[str, ...] = ("train", "val", "holdout")


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    grey = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    grey = F.interpolate(grey, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    pad = (IMAGE_SIZE - DIGIT_SIZE) // 2
    grey = F.pad(grey, (pad, pad, pad, pad)).clamp(0.0, 1.0)
    images = grey.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _all_digits()
    all_indices = np.arange(len(labels))
    rest, holdout = train_test_split(
        all_indices,
        test_size=SPLIT_SIZES["holdout"],
        stratify=labels.numpy(),
        random_state=SPLIT_SEED,
    )
    train, val = train_test_split(
        rest,
        test_size=SPLIT_SIZES["val"],
        stratify=labels.numpy()[rest],
        random_state=SPLIT_SEED + 1,
    )
    return {"train": np.sort(train), "val": np.sort(val), "holdout": np.sort(holdout)}


def split_indices(split: str) -> np.ndarray:
    """Return the sorted indices into ``sklearn.datasets.load_digits()`` that form ``split``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS}.")
    return _split_indices()[split].copy()


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of the digits.

    Args:
        split: ``"train"`` (1,200 images), ``"val"`` (297) or ``"holdout"`` (300). The split is
            stratified by digit and fixed by ``SPLIT_SEED``, so every call returns the same images.

    Returns:
        ``images`` of shape (N, 3, 32, 32), float32 in [0, 1], white digit on black with the grey
        level replicated to the 3 channels, and ``labels`` of shape (N,), int64 digits 0–9.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS}.")
    images, labels = _all_digits()
    index = torch.from_numpy(_split_indices()[split])
    return images[index].clone(), labels[index].clone()


def augment_digits(
    images: torch.Tensor,
    generator: torch.Generator,
    max_shift: float = 3.0,
    max_rotation_degrees: float = 12.0,
    scale_range: tuple[float, float] = (0.85, 1.15),
) -> torch.Tensor:
    """Apply a random affine transform (shift, rotation, isotropic scale) to each image.

    Args:
        images: (B, C, H, W) float tensor; the border is filled with 0 (black).
        generator: source of the random parameters, for reproducibility.
        max_shift: maximum shift in pixels along each axis.
        max_rotation_degrees: maximum absolute rotation angle in degrees.
        scale_range: (min, max) zoom factor; above 1 enlarges the digit.

    Returns:
        Tensor of the same shape and dtype as ``images``.
    """
    batch, _, height, width = images.shape
    shape = (batch,)
    angle = (torch.rand(shape, generator=generator) * 2 - 1) * math.radians(max_rotation_degrees)
    scale = scale_range[0] + torch.rand(shape, generator=generator) * (scale_range[1] - scale_range[0])
    # affine_grid works in normalised coordinates where the image spans [-1, 1].
    shift_x = (torch.rand(shape, generator=generator) * 2 - 1) * max_shift * 2 / width
    shift_y = (torch.rand(shape, generator=generator) * 2 - 1) * max_shift * 2 / height
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
