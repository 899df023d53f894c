"""Fréchet distance between two image sets in a pluggable feature space.

    d² = ‖μ_ref − μ_gen‖² + Tr(Σ_ref + Σ_gen − 2 (Σ_ref Σ_gen)^{1/2})

where μ and Σ are the mean and the unbiased covariance of the features of each set. The statistics
are accumulated by torchmetrics' ``FrechetInceptionDistance``, which accepts any ``nn.Module`` as
its feature extractor. With Inception-v3 pool3 features this is FID, but the published FID numbers
also depend on the reference set, its size, the resize policy and the implementation. Every
``FrechetResult`` records all four.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

logger = logging.getLogger(__name__)

IMPLEMENTATION = (
    f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance "
    "(custom feature module, float64 statistics)"
)


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance with everything needed to compare it with another one.

    ``value`` is d² in squared feature units (lower is better). ``reference_size`` and
    ``generated_size`` count images.
    """

    value: float
    implementation: str
    feature_extractor: str
    num_features: int
    reference_name: str
    reference_size: int
    generated_size: int
    resize_policy: str


class _Float64Features(nn.Module):
    """Resize images if requested, extract (B, F) features and return them as float64.

    torchmetrics casts its result to the dtype of the features, so float64 features keep the
    returned value at the precision of the float64 statistics.
    """

    def __init__(
        self, extractor: nn.Module, num_features: int, input_size: tuple[int, int] | None
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(
                images.float(), size=self.input_size, mode="bilinear", align_corners=False, antialias=True
            )
        features = self.extractor(images)
        expected = (images.shape[0], self.num_features)
        if tuple(features.shape) != expected:
            raise ValueError(
                f"Fréchet distance: the feature extractor returned shape {tuple(features.shape)}; "
                f"expected {expected} (batch, num_features)"
            )
        return features.double()


def _infer_num_features(
    extractor: nn.Module, input_size: tuple[int, int] | None, device: torch.device
) -> int:
    num_features = getattr(extractor, "num_features", None)
    if isinstance(num_features, torch.Tensor):
        return int(num_features.item())
    if isinstance(num_features, int):
        return num_features
    if input_size is None:
        raise ValueError(
            f"Fréchet distance: feature extractor {type(extractor).__name__} has no integer "
            "`num_features`; set it, or pass input_size so that the size can be inferred"
        )
    with torch.no_grad():
        probe = extractor(torch.zeros(2, 3, *input_size, device=device))
    return int(probe.shape[-1])


def pil_images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Convert same-size PIL images to a (B, 3, H, W) float32 tensor in [0, 1] (RGB)."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"Fréchet distance: PIL images have different sizes {sorted(shapes)}; "
            "pass input_size to resize them, or resize them beforehand"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FrechetDistance:
    """Accumulate features of a reference set and a generated set, then compute their distance.

    Args:
        feature_extractor: maps a (B, 3, H, W) float batch to (B, F) features. It should have an
            integer ``num_features`` (F). The module is put in eval mode.
        feature_extractor_name: recorded with every result, for example
            ``"mini-digit classifier sha256:0123abcd"``.
        reference_name: name of the reference ("real") set, for example ``"coco-10k"``.
        input_size: (H, W). Batches of another size are resized to it with antialiased bilinear
            interpolation. ``None`` passes every batch at its own size.
        device: where the extractor and the statistics live.

    Call ``update(images, real=True)`` for reference batches and ``real=False`` for generated
    batches, then ``compute()``. The result covers this process's images only, also when
    ``torch.distributed`` is initialised: a multi-process run computes quality in one process.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        *,
        feature_extractor_name: str,
        reference_name: str,
        input_size: tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.feature_extractor_name = feature_extractor_name
        self.reference_name = reference_name
        self.input_size = tuple(input_size) if input_size is not None else None
        self.device = torch.device(device)

        feature_extractor = feature_extractor.to(self.device).eval()
        self.num_features = _infer_num_features(feature_extractor, self.input_size, self.device)
        self._features = _Float64Features(feature_extractor, self.num_features, self.input_size)
        self._metric = self._new_metric()

        if self.input_size is None:
            self.resize_policy = "none: each batch goes to the feature extractor at its own size"
        else:
            height, width = self.input_size
            self.resize_policy = (
                f"bilinear with antialias (torch.nn.functional.interpolate, align_corners=False) "
                f"to {height}x{width} when a batch has another size"
            )

    def _new_metric(self) -> FrechetInceptionDistance:
        metric = FrechetInceptionDistance(
            feature=self._features, reset_real_features=True, normalize=True, sync_on_compute=False
        )
        return metric.to(self.device)

    def update(self, images: torch.Tensor | Sequence[Image.Image], real: bool) -> None:
        """Add a batch to the reference set (``real=True``) or to the generated set.

        ``images`` is a (B, 3, H, W) float tensor in the range the extractor expects (the
        embedded digit extractor expects [0, 1]), or a sequence of PIL images, converted to RGB
        in [0, 1].
        """
        if not isinstance(images, torch.Tensor):
            images = list(images)
            if not images:
                return
            images = pil_images_to_tensor(images)
        if images.ndim != 4:
            raise ValueError(
                f"Fréchet distance: images have shape {tuple(images.shape)}; expected (B, 3, H, W)"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"Fréchet distance: images have dtype {images.dtype}; expected a float tensor "
                "(divide uint8 images by 255)"
            )
        if images.shape[0] == 0:
            return
        self._metric.update(images.to(self.device), real=real)

    @property
    def reference_size(self) -> int:
        """Number of reference images accumulated so far."""
        return int(self._metric.real_features_num_samples.item())

    @property
    def generated_size(self) -> int:
        """Number of generated images accumulated so far."""
        return int(self._metric.fake_features_num_samples.item())

    def compute(self) -> FrechetResult:
        """Return the distance between the accumulated sets, with its metadata.

        Raises:
            ValueError: either set has fewer than 2 images, so its covariance is undefined.
        """
        for set_name, size in (
            (f"reference set {self.reference_name!r}", self.reference_size),
            ("generated set", self.generated_size),
        ):
            if size < 2:
                raise ValueError(
                    f"Fréchet distance: the {set_name} has {size} image(s); at least 2 are needed "
                    "to estimate a covariance. Add more images with update()"
                )
        value = float(self._metric.compute().item())
        logger.info(
            "Fréchet distance %.6g (%s; reference %r, %d images; generated %d images)",
            value,
            self.feature_extractor_name,
            self.reference_name,
            self.reference_size,
            self.generated_size,
        )
        return FrechetResult(
            value=value,
            implementation=IMPLEMENTATION,
            feature_extractor=self.feature_extractor_name,
            num_features=self.num_features,
            reference_name=self.reference_name,
            reference_size=self.reference_size,
            generated_size=self.generated_size,
            resize_policy=self.resize_policy,
        )

    def reset(self, keep_reference: bool = False) -> None:
        """Clear the generated set, and the reference set too unless ``keep_reference``."""
        if keep_reference:
            self._metric.reset_real_features = False
            self._metric.reset()
            self._metric.reset_real_features = True
        else:
            self._metric.reset()
