"""The negation set: samples of the region to avoid, in the model's denoising space.

A latent model's bank contains VAE latents (scaled by the VAE's ``scaling_factor``), and a
pixel model's bank contains pixels in [-1, 1]. Every bank carries its provenance (source hashes,
encoder, normalisation) so that a result can name the exact set it was computed with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["NegationBank", "IMAGE_SUFFIXES", "channel_l2_normalise"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FORMAT = "safedenoise.negation_bank/1"
_NORMALISATIONS = (None, "channel_l2")

Normalisation = Literal["channel_l2"] | None
ImagesInput = Tensor | str | os.PathLike


def channel_l2_normalise(latents: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale every spatial position's channel vector to unit L2 norm.

    Args:
        latents: (N, C, *spatial); dim 1 is the channel dim.
        eps: lower bound on the norm, so an all-zero vector stays zero instead of NaN.

    Returns:
        A tensor of the same shape.
    """
    if latents.ndim < 2:
        raise ValueError(f"channel_l2 needs (N, C, ...) latents, got shape {tuple(latents.shape)}")
    norms = latents.norm(dim=1, keepdim=True).clamp_min(eps)
    return latents / norms


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha256(tensor: Tensor) -> str:
    array = tensor.detach().to("cpu").contiguous().numpy()
    digest = hashlib.sha256()
    digest.update(str(array.dtype).encode())
    digest.update(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _json_sha256(value: Any) -> str:
    return _sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())


def _subsample_indices(count: int, max_size: int | None, seed: int) -> list[int]:
    """Return sorted indices of a seeded uniform subsample of at most ``max_size`` items."""
    if max_size is None or count <= max_size:
        return list(range(count))
    if max_size < 1:
        raise ValueError(f"max_size must be a positive integer or None, got {max_size}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:max_size].tolist())


def _list_image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"negation image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"negation image folder {folder} contains no image files (expected suffixes {IMAGE_SUFFIXES})"
        )
    return files


def _load_image(path: Path, image_size: int | tuple[int, int] | None) -> Tensor:
    """Load one image file as a (3, H, W) float32 tensor in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None:
                height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read negation image {path}: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass(frozen=True)
class _ImageSource:
    """Images selected for encoding, with the provenance of their source."""

    images: Tensor  # (N, 3, H, W) in [-1, 1]
    provenance: dict[str, Any] = field(default_factory=dict)


def _gather_images(
    images_or_folder: ImagesInput,
    *,
    max_size: int | None,
    subsample_seed: int,
    image_size: int | tuple[int, int] | None,
) -> _ImageSource:
    if isinstance(images_or_folder, Tensor):
        images = images_or_folder
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("cannot build a negation bank from an empty image tensor")
        low, high = float(images.min()), float(images.max())
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"expected image values in [-1, 1], got range [{low:.3f}, {high:.3f}]; "
                "rescale 8-bit images with x / 127.5 - 1"
            )
        indices = _subsample_indices(images.shape[0], max_size, subsample_seed)
        selected = images[indices].to(torch.float32)
        provenance = {"source": "tensor", "source_sha256": _tensor_sha256(selected)}
        return _ImageSource(selected, provenance)

    folder = Path(images_or_folder)
    files = _list_image_files(folder)
    indices = _subsample_indices(len(files), max_size, subsample_seed)
    files = [files[i] for i in indices]
    loaded: list[Tensor] = []
    hashes: list[str] = []
    for path in files:
        hashes.append(_sha256_bytes(path.read_bytes()))
        image = _load_image(path, image_size)
        if loaded and image.shape != loaded[0].shape:
            raise ValueError(
                f"negation image {path} has shape {tuple(image.shape)} but {files[0].name} has "
                f"{tuple(loaded[0].shape)}; pass image_size=... to resize every image"
            )
        loaded.append(image)
    provenance = {
        "source": str(folder),
        "files": [p.name for p in files],
        "file_sha256": hashes,
        "source_sha256": _json_sha256(hashes),
    }
    return _ImageSource(torch.stack(loaded), provenance)


class NegationBank:
    """A negation set {z_1 … z_N} in the model's denoising space.

    Attributes:
        latents: (N, *sample_shape) float32 tensor on the CPU.
        provenance: JSON-serialisable dict: ``source`` ("tensor" or the folder), file SHA-256s for a
            folder, ``encoder`` and ``encoder_config_sha256``, ``normalisation`` and ``count``.
    """

    def __init__(self, latents: Tensor, provenance: Mapping[str, Any] | None = None) -> None:
        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim < 2:
            raise ValueError(
                f"latents must have shape (N, *sample_shape) with at least 2 dims, got {tuple(latents.shape)}"
            )
        if latents.shape[0] == 0:
            raise ValueError("a negation bank needs at least one sample, got N=0")
        latents = latents.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("negation bank latents contain NaN or infinite values")
        self.latents = latents
        provenance = dict(provenance or {})
        provenance["count"] = int(latents.shape[0])
        provenance["sample_shape"] = list(latents.shape[1:])
        self.provenance = provenance
        self._device_cache: dict[tuple[str, torch.dtype], Tensor] = {}

    # -- basic accessors ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __repr__(self) -> str:
        return (
            f"NegationBank(count={len(self)}, sample_shape={tuple(self.sample_shape)}, "
            f"normalisation={self.provenance.get('normalisation')!r})"
        )

    @property
    def sample_shape(self) -> torch.Size:
        """Shape of one sample, e.g. (4, 64, 64) for SD latents at 512×512."""
        return self.latents.shape[1:]

    @property
    def dim(self) -> int:
        """D, the number of features per sample."""
        return int(self.latents[0].numel())

    @property
    def content_sha256(self) -> str:
        """SHA-256 of the latents' bytes, shape and dtype."""
        return _tensor_sha256(self.latents)

    def flat(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Return the bank as (N, D), cached per device and dtype."""
        device = torch.device(device) if device is not None else self.latents.device
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = self.latents.reshape(len(self), -1).to(device=device, dtype=dtype)
        return self._device_cache[key]

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_tensor(
        cls,
        latents: Tensor,
        provenance: Mapping[str, Any] | None = None,
        *,
        normalisation: Normalisation = None,
        max_size: int | None = None,
        subsample_seed: int = 0,
    ) -> NegationBank:
        """Build a bank from latents already in the denoising space, (N, *sample_shape)."""
        _check_normalisation(normalisation)
        if latents.ndim < 2 or latents.shape[0] == 0:
            raise ValueError(f"expected latents of shape (N, *sample_shape) with N ≥ 1, got {tuple(latents.shape)}")
        indices = _subsample_indices(latents.shape[0], max_size, subsample_seed)
        selected = latents[indices].detach().to(torch.float32)
        if normalisation == "channel_l2":
            selected = channel_l2_normalise(selected)
        info = {"source": "tensor", "encoder": None, "normalisation": normalisation}
        info.update(provenance or {})
        if max_size is not None:
            info.update(max_size=max_size, subsample_seed=subsample_seed)
        return cls(selected, info)

    @classmethod
    def from_images(
        cls,
        images_or_folder: ImagesInput,
        encode: Callable[[Tensor], Tensor] | None = None,
        *,
        encoder_name: str | None = None,
        encoder_config: Mapping[str, Any] | None = None,
        normalisation: Normalisation = None,
        max_size: int | None = None,
        subsample_seed: int = 0,
        image_size: int | tuple[int, int] | None = None,
        batch_size: int = 8,
        cache_dir: str | os.PathLike | None = None,
        source: str | None = None,
    ) -> NegationBank:
        """Build a bank from images, encoding each batch with ``encode``.

        Args:
            images_or_folder: (N, 3, H, W) tensor in [-1, 1], or a folder of image files (read in
                sorted name order, each file hashed).
            encode: maps a (b, 3, H, W) batch in [-1, 1] to (b, *sample_shape); None keeps the
                pixels (for pixel-space models).
            encoder_name: identifies the encoder in the provenance and the cache key. Required with
                ``cache_dir`` when ``encode`` is given.
            encoder_config: anything else that changes the encoder's output; it is hashed into
                the provenance and the cache key.
            normalisation: None, or "channel_l2" (unit-norm channel vector at every position).
            max_size: keep at most this many images, chosen by a seeded subsample (``subsample_seed``).
            image_size: resize every file to this (H, W) or square size; without it, all files must
                have the same size.
            batch_size: images per ``encode`` call.
            cache_dir: when set, the bank is stored under its content key in this folder, and a
                second build from the same inputs and encoder loads that file instead of encoding.
            source: description of where the images come from, stored as ``provenance["source"]``
                in place of "tensor" or the folder path. It is not part of the cache key.
        """
        _check_normalisation(normalisation)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if encode is not None and encoder_name is None:
            if cache_dir is not None:
                raise ValueError(
                    "cache_dir needs encoder_name to identify the encoder; pass encoder_name=... "
                    "(and encoder_config=... for settings that change its output)"
                )
            encoder_name = getattr(encode, "__qualname__", type(encode).__name__)

        selection = _gather_images(
            images_or_folder, max_size=max_size, subsample_seed=subsample_seed, image_size=image_size
        )
        provenance = dict(selection.provenance)
        if source is not None:
            provenance["source"] = source
        provenance.update(
            encoder=encoder_name if encode is not None else None,
            encoder_config_sha256=_json_sha256(encoder_config or {}),
            normalisation=normalisation,
            max_size=max_size,
            subsample_seed=subsample_seed,
            image_size=image_size,
        )

        cache_path = None
        if cache_dir is not None:
            key_fields = {k: provenance[k] for k in sorted(provenance) if k not in ("source", "files")}
            cache_path = Path(cache_dir) / f"negation_bank_{_json_sha256(key_fields)[:32]}.safetensors"
            if cache_path.is_file():
                logger.info("loading cached negation bank %s", cache_path)
                return cls.load(cache_path)

        if encode is None:
            latents = selection.images
        else:
            batches = []
            with torch.no_grad():
                for start in range(0, selection.images.shape[0], batch_size):
                    batch = selection.images[start : start + batch_size]
                    encoded = encode(batch)
                    batches.append(encoded.detach().to(device="cpu", dtype=torch.float32))
            latents = torch.cat(batches)
            if latents.shape[0] != selection.images.shape[0]:
                raise ValueError(
                    f"encode returned {latents.shape[0]} latents for {selection.images.shape[0]} images; "
                    "it must map a batch of b images to b latents"
                )
        if normalisation == "channel_l2":
            latents = channel_l2_normalise(latents)

        bank = cls(latents, provenance)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            bank.save(cache_path)
            logger.info("stored negation bank (%d samples) in %s", len(bank), cache_path)
        return bank

    @classmethod
    def from_vae(
        cls,
        images_or_folder: ImagesInput,
        vae: Any,
        *,
        sample_mode: Literal["sample", "mean"] = "sample",
        seed: int = 0,
        normalisation: Normalisation = None,
        max_size: int | None = None,
        subsample_seed: int = 0,
        image_size: int | tuple[int, int] | None = None,
        batch_size: int = 8,
        cache_dir: str | os.PathLike | None = None,
        encoder_name: str | None = None,
        source: str | None = None,
    ) -> NegationBank:
        """Build a bank of VAE latents: ``(latent_dist.sample() − shift_factor) · scaling_factor``.

        Args:
            vae: a diffusers ``AutoencoderKL`` (anything whose ``encode(x).latent_dist`` has
                ``sample(generator=...)`` and ``mean``, with ``config.scaling_factor``).
            sample_mode: "sample" draws each image's latent with its own generator seeded
                ``seed + i`` (i = position in the selected set), so the result does not depend on
                ``batch_size``; "mean" takes the posterior mean.
            seed: base seed for ``sample_mode="sample"``.
            encoder_name: name for the provenance; defaults to the VAE's class name. The cache key
                also hashes the VAE config and weights, so two different VAEs never share a file.

        The other arguments are those of :meth:`from_images`. ``shift_factor`` is subtracted only
        where the VAE config defines one (SD3 and Flux VAEs); SD 1.x/2.x VAEs have none.
        """
        if sample_mode not in ("sample", "mean"):
            raise ValueError(f"sample_mode must be 'sample' or 'mean', got {sample_mode!r}")
        config = dict(getattr(vae, "config", {}) or {})
        scaling_factor = config.get("scaling_factor")
        if scaling_factor is None:
            raise ValueError("the VAE config has no scaling_factor; pass a diffusers AutoencoderKL")
        shift_factor = config.get("shift_factor") or 0.0
        parameter = next(vae.parameters())
        device, dtype = parameter.device, parameter.dtype
        position = {"next": 0}

        def encode(batch: Tensor) -> Tensor:
            distribution = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist
            if sample_mode == "mean":
                latents = distribution.mean
            else:
                start = position["next"]
                generators = [
                    torch.Generator(device=device).manual_seed(seed + start + i) for i in range(batch.shape[0])
                ]
                latents = distribution.sample(generator=generators)
            position["next"] += batch.shape[0]
            return (latents - shift_factor) * scaling_factor

        encoder_config = {
            "vae_config": {k: v for k, v in config.items() if not k.startswith("_")},
            "vae_weights_sha256": _module_weights_sha256(vae),
            "sample_mode": sample_mode,
            "seed": seed if sample_mode == "sample" else None,
            "dtype": str(dtype),
        }
        return cls.from_images(
            images_or_folder,
            encode,
            encoder_name=encoder_name or type(vae).__name__,
            encoder_config=encoder_config,
            normalisation=normalisation,
            max_size=max_size,
            subsample_seed=subsample_seed,
            image_size=image_size,
            batch_size=batch_size,
            cache_dir=cache_dir,
            source=source,
        )

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to a safetensors file, with the provenance as JSON in its metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": _FORMAT, "provenance": json.dumps(self.provenance, sort_keys=True, default=str)}
        # A per-process temporary name, so processes of one multi-process run never write the same file.
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"latents": self.latents}, str(temporary), metadata=metadata)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NegationBank:
        """Read a bank written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"negation bank file not found: {path}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a negation bank file (metadata format {metadata.get('format')!r}, "
                f"expected {_FORMAT!r}); write banks with NegationBank.save"
            )
        tensors = load_file(str(path))
        return cls(tensors["latents"], json.loads(metadata["provenance"]))


def _check_normalisation(normalisation: str | None) -> None:
    if normalisation not in _NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {_NORMALISATIONS}, got {normalisation!r}")


def _module_weights_sha256(module: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
