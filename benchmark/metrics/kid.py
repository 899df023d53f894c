"""Kernel distance (KID with Inception features) between two image sets in a pluggable feature space.

KID is the unbiased estimate of the squared maximum mean discrepancy (MMD²) with the polynomial
kernel k(x, y) = (γ xᵀy + c)^d, by default d = 3, γ = 1 / num_features and c = 1. The estimate is
averaged over ``num_subsets`` random subsets of ``subset_size`` images drawn from each set.
torchmetrics' ``KernelInceptionDistance`` stores the features and computes the estimate. This
module seeds the subset draws so that a value can be reproduced, and records the kernel, the subset
sizes and the seed with every result.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchmetrics
from PIL import Image
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from benchmark.metrics.frechet import _Float64Features, _infer_num_features, pil_images_to_tensor

logger = logging.getLogger(__name__)

IMPLEMENTATION = (
    f"torchmetrics {torchmetrics.__version__} KernelInceptionDistance "
    "(custom feature module, float64 features, seeded subsets)"
)


@dataclass(frozen=True)
class KernelDistanceResult:
    """A kernel distance (KID) with everything needed to compare it with another one.

    ``value`` is the mean of the MMD² estimates over the subsets, in squared feature units (lower
    is better; an unbiased estimate can be slightly negative). ``std`` is their population standard
    deviation over the subsets. ``reference_size`` and ``generated_size`` count images.
    """

    value: float
    std: float
    implementation: str
    feature_extractor: str
    num_features: int
    reference_name: str
    reference_size: int
    generated_size: int
    subset_size: int
    num_subsets: int
    kernel: str
    seed: int
    resize_policy: str


class KernelDistance:
    """Accumulate features of a reference set and a generated set, then compute their KID.

    Args:
        feature_extractor: maps a (B, 3, H, W) float batch to (B, F) features. It should have an
            integer ``num_features`` (F). The module is put in eval mode. When ``input_size`` is
            None and the module has a ``resize_policy`` string, that string is recorded.
        feature_extractor_name: recorded with every result.
        reference_name: name of the reference ("real") set, for example ``"coco-10k"``.
        subset_size: images per subset, drawn without replacement from each set. Both sets need
            at least this many images. 1000 is torchmetrics' default.
        num_subsets: number of subsets averaged.
        degree, gamma, coef: the polynomial kernel (γ xᵀy + coef)^degree. ``gamma`` None is
            1 / num_features.
        seed: seed of the subset draws. The global CPU random state is left unchanged.
        input_size: (H, W). Batches of another size are resized to it with antialiased bilinear
            interpolation. ``None`` passes every batch at its own size.
        device: where the extractor and the stored features live.

    Every feature is stored until ``reset``: 10,000 images with 2048 float64 features take 160 MiB
    per set.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        *,
        feature_extractor_name: str,
        reference_name: str,
        subset_size: int = 1000,
        num_subsets: int = 100,
        degree: int = 3,
        gamma: float | None = None,
        coef: float = 1.0,
        seed: int = 0,
        input_size: tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.feature_extractor_name = feature_extractor_name
        self.reference_name = reference_name
        self.subset_size = subset_size
        self.num_subsets = num_subsets
        self.seed = seed
        self.input_size = tuple(input_size) if input_size is not None else None
        self.device = torch.device(device)

        feature_extractor = feature_extractor.to(self.device).eval()
        self.num_features = _infer_num_features(feature_extractor, self.input_size, self.device)
        features = _Float64Features(feature_extractor, self.num_features, self.input_size)
        # torchmetrics checks the argument types strictly: coef and gamma must be Python floats.
        # Its warning that every feature is stored is the memory note in this class's docstring.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            metric = KernelInceptionDistance(
                feature=features,
                subsets=num_subsets,
                subset_size=subset_size,
                degree=degree,
                gamma=None if gamma is None else float(gamma),
                coef=float(coef),
                reset_real_features=True,
                sync_on_compute=False,
            )
        self._metric = metric.to(self.device)

        gamma_text = f"{gamma:g}" if gamma is not None else f"1/{self.num_features}"
        self.kernel = f"polynomial (gamma * x.y + {coef:g})^{degree}, gamma={gamma_text}"
        if self.input_size is not None:
            height, width = self.input_size
            self.resize_policy = (
                f"bilinear with antialias (torch.nn.functional.interpolate, align_corners=False) "
                f"to {height}x{width} when a batch has another size"
            )
        elif isinstance(getattr(feature_extractor, "resize_policy", None), str):
            self.resize_policy = feature_extractor.resize_policy
        else:
            self.resize_policy = "none: each batch goes to the feature extractor at its own size"

    def update(self, images: torch.Tensor | Sequence[Image.Image], real: bool) -> None:
        """Add a batch to the reference set (``real=True``) or to the generated set.

        ``images`` is a (B, 3, H, W) float tensor in the range the extractor expects, or a sequence
        of PIL images, converted to RGB in [0, 1].
        """
        if not isinstance(images, torch.Tensor):
            images = list(images)
            if not images:
                return
            images = pil_images_to_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"KID: images have shape {tuple(images.shape)}; expected (B, 3, H, W)")
        if not images.is_floating_point():
            raise TypeError(
                f"KID: images have dtype {images.dtype}; expected a float tensor (divide uint8 "
                "images by 255)"
            )
        if images.shape[0] == 0:
            return
        with torch.no_grad():
            self._metric.update(images.to(self.device), real=real)

    @property
    def reference_size(self) -> int:
        """Number of reference images accumulated so far."""
        return sum(int(batch.shape[0]) for batch in self._metric.real_features)

    @property
    def generated_size(self) -> int:
        """Number of generated images accumulated so far."""
        return sum(int(batch.shape[0]) for batch in self._metric.fake_features)

    def compute(self) -> KernelDistanceResult:
        """Return the KID between the accumulated sets, with its metadata.

        Raises:
            ValueError: either set has fewer than ``subset_size`` images.
        """
        for set_name, size in (
            (f"reference set {self.reference_name!r}", self.reference_size),
            ("generated set", self.generated_size),
        ):
            if size < self.subset_size:
                raise ValueError(
                    f"KID: the {set_name} has {size} image(s), fewer than subset_size="
                    f"{self.subset_size}. Add images with update(), or build the metric with a "
                    f"subset_size of at most {size} (and report it)"
                )
        # torchmetrics draws the subsets with torch.randperm from the global CPU generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            mean, std = self._metric.compute()
        result = KernelDistanceResult(
            value=float(mean.item()),
            std=float(std.item()),
            implementation=IMPLEMENTATION,
            feature_extractor=self.feature_extractor_name,
            num_features=self.num_features,
            reference_name=self.reference_name,
            reference_size=self.reference_size,
            generated_size=self.generated_size,
            subset_size=self.subset_size,
            num_subsets=self.num_subsets,
            kernel=self.kernel,
            seed=self.seed,
            resize_policy=self.resize_policy,
        )
        logger.info(
            "KID %.6g ± %.3g (%s; reference %r, %d images; generated %d images; %d subsets of %d)",
            result.value,
            result.std,
            self.feature_extractor_name,
            self.reference_name,
            result.reference_size,
            result.generated_size,
            self.num_subsets,
            self.subset_size,
        )
        return result

    def reset(self, keep_reference: bool = False) -> None:
        """Clear the generated set, and the reference set too unless ``keep_reference``."""
        if keep_reference:
            self._metric.reset_real_features = False
            self._metric.reset()
            self._metric.reset_real_features = True
        else:
            self._metric.reset()
