"""Inception-v3 pool3 features as pytorch-fid computes them, for FID and KID.

The network is the TensorFlow FID Inception graph (``inception-2015-12-05``) in the layout that
pytorch-fid loads from ``pt_inception-2015-12-05-6726825d.pth``. It differs from the ImageNet
Inception-v3 in three places: the average pools inside the Mixed_5*, Mixed_6b-e and Mixed_7b
blocks leave the zero padding out of the average, and the pool branch of Mixed_7c is a 3x3 max pool.
Images in [0, 1] are resized to 299x299 (bilinear, ``align_corners=False``, no antialias) and
mapped to [-1, 1], as pytorch-fid does by default.

torch-fidelity, which torchmetrics' own FID and KID use for Inception features, is not used here
because torch-fidelity 0.4.0 imports torchvision, and torchvision does not import beside this
project's torch. The weights are never downloaded. They come from an explicit path, from the
``SAFEBENCH_FID_INCEPTION`` environment variable or from ``~/.cache/safebench/metrics/``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.metrics.frechet import FrechetDistance
from benchmark.metrics.kid import KernelDistance

logger = logging.getLogger(__name__)

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
WEIGHTS_ENV_VAR = "SAFEBENCH_FID_INCEPTION"


def metrics_cache_dir() -> Path:
    """Return the folder where metric weights are looked up: ``$SAFEBENCH_HOME/metrics``."""
    from benchmark.judges.weights import safebench_home

    return safebench_home() / "metrics"
NUM_FEATURES = 2048
INPUT_SIZE = (299, 299)
RESIZE_POLICY = (
    "pytorch-fid: bilinear to 299x299 (torch.nn.functional.interpolate, align_corners=False, "
    "no antialias) inside the Inception module, then 2x-1 to [-1, 1]"
)

# Keys of the pytorch-fid weights file that this feature extractor does not use: the 1008-way
# classifier, an auxiliary classifier (absent from that file, accepted in case a conversion kept
# it) and BatchNorm's batch counters.
_UNUSED_KEY_PREFIXES = ("fc.", "AuxLogits.")
_UNUSED_KEY_SUFFIX = "num_batches_tracked"


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights file is not at any of the places searched."""


class _ConvBNReLU(nn.Module):
    """Bias-free convolution, BatchNorm (eps 1e-3, as in the TensorFlow graph) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_options: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_options)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches (Mixed_5b-d)."""

    def __init__(self, in_channels: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBNReLU(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _ConvBNReLU(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _ConvBNReLU(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _ConvBNReLU(in_channels, pool_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.branch1x1(x)
        five = self.branch5x5_2(self.branch5x5_1(x))
        double_three = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_average_pool_without_padding(x))
        return torch.cat([one, five, double_three, pool], dim=1)


class _ReductionB(nn.Module):
    """35x35 to 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBNReLU(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3(x)
        double_three = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([three, double_three, pool], dim=1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBNReLU(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _ConvBNReLU(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _ConvBNReLU(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBNReLU(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBNReLU(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _ConvBNReLU(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBNReLU(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBNReLU(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBNReLU(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _ConvBNReLU(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.branch1x1(x)
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double_seven = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double_seven = layer(double_seven)
        pool = self.branch_pool(_average_pool_without_padding(x))
        return torch.cat([one, seven, double_seven, pool], dim=1)


class _ReductionD(nn.Module):
    """17x17 to 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBNReLU(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _ConvBNReLU(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _ConvBNReLU(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _ConvBNReLU(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBNReLU(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBNReLU(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven_three = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven_three = layer(seven_three)
        pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([three, seven_three, pool], dim=1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (Mixed_7b with an average pool, Mixed_7c with a max pool)."""

    def __init__(self, in_channels: int, pool: Literal["average", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBNReLU(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _ConvBNReLU(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _ConvBNReLU(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBNReLU(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _ConvBNReLU(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _ConvBNReLU(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBNReLU(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _ConvBNReLU(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = self.branch1x1(x)
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], dim=1)
        double_three = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double_three = torch.cat(
            [self.branch3x3dbl_3a(double_three), self.branch3x3dbl_3b(double_three)], dim=1
        )
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool_without_padding(x)
        return torch.cat([one, three, double_three, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 up to pool3: (B, 3, H, W) images in [0, 1] to (B, 2048) float32 features.

    The module names match the keys of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
    (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``, ...). A freshly built
    instance has random weights. Use ``load_fid_inception`` to build one with the FID weights.
    """

    num_features = NUM_FEATURES
    resize_policy = RESIZE_POLICY

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBNReLU(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBNReLU(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _ConvBNReLU(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBNReLU(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _ConvBNReLU(80, 192, kernel_size=3)
        self.Mixed_5b = _MixedA(192, pool_channels=32)
        self.Mixed_5c = _MixedA(256, pool_channels=64)
        self.Mixed_5d = _MixedA(288, pool_channels=64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, pool="average")
        self.Mixed_7c = _MixedE(2048, pool="max")
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FID Inception: images have shape {tuple(images.shape)}; expected (B, 3, H, W) RGB"
            )
        x = F.interpolate(images.float(), size=INPUT_SIZE, mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0

        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
            self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,
        ):  # fmt: skip
            x = block(x)
        return F.adaptive_avg_pool2d(x, output_size=1).flatten(1)


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """Find the FID Inception weights file.

    The places searched, in order: ``weights_path`` (a file, or a folder holding
    ``pt_inception-2015-12-05-6726825d.pth``), the ``SAFEBENCH_FID_INCEPTION`` environment
    variable (same forms), then ``$SAFEBENCH_HOME/metrics/`` (``SAFEBENCH_HOME`` defaults to
    ``~/.cache/safebench``). An explicit path that does not exist raises at once and is not
    replaced by a later place.

    Raises:
        InceptionWeightsNotFoundError: the file is at none of the places searched.
    """
    if weights_path is not None:
        source = "weights_path"
        candidate: Path | None = Path(weights_path).expanduser()
    elif os.environ.get(WEIGHTS_ENV_VAR):
        source = f"${WEIGHTS_ENV_VAR}"
        candidate = Path(os.environ[WEIGHTS_ENV_VAR]).expanduser()
    else:
        source = "the default folder"
        candidate = None

    searched = candidate if candidate is not None else metrics_cache_dir()
    if searched.is_dir():
        searched = searched / WEIGHTS_FILENAME
    if searched.is_file():
        return searched

    raise InceptionWeightsNotFoundError(
        f"FID Inception weights not found: {source} points to {searched}, which does not exist. "
        f"The file is pytorch-fid's {WEIGHTS_FILENAME} (the TensorFlow FID Inception graph "
        f"converted to PyTorch), published at {WEIGHTS_URL}. "
        "It is not downloaded automatically: copy it to "
        f"{metrics_cache_dir() / WEIGHTS_FILENAME}, set {WEIGHTS_ENV_VAR} to its path, or pass "
        "safebench run --inception-weights FILE (weights_path from Python)."
    )


def sha256_of_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_version() -> str:
    try:
        return importlib.metadata.version("safedenoise-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _check_state_dict_keys(
    model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Drop the keys the extractor does not use and raise on any other mismatch."""
    expected = set(model.state_dict())
    used = {key: value for key, value in state_dict.items() if key in expected}
    unexpected = sorted(
        key
        for key in state_dict
        if key not in expected
        and not key.startswith(_UNUSED_KEY_PREFIXES)
        and not key.endswith(_UNUSED_KEY_SUFFIX)
    )
    missing = sorted(key for key in expected - set(used) if not key.endswith(_UNUSED_KEY_SUFFIX))
    if missing or unexpected:
        raise ValueError(
            f"FID Inception: {path} is not a pytorch-fid Inception state dict: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}. Expected the keys of {WEIGHTS_FILENAME}"
        )
    return used


def load_fid_inception(
    weights_path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """Build the FID Inception-v3 and load its weights from a local file (never downloaded).

    ``weights_path`` is found as ``resolve_inception_weights`` describes. The returned module is in
    eval mode and has ``weights_path``, ``weights_sha256`` and ``description`` attributes. The
    description names the implementation, its version and the weights file's SHA-256.

    Raises:
        InceptionWeightsNotFoundError: no weights file was found.
        ValueError: the file's keys or shapes are not those of the FID Inception.
    """
    path = resolve_inception_weights(weights_path)
    model = FIDInceptionV3()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(
            f"FID Inception: {path} is not a readable PyTorch state dict ({type(error).__name__}); "
            f"expected pytorch-fid's {WEIGHTS_FILENAME}, published at {WEIGHTS_URL}. Replace the file"
        ) from None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"FID Inception: {path} contains a {type(state_dict).__name__}; expected a state dict "
            f"(a dict of tensors) such as {WEIGHTS_FILENAME}"
        )
    used = _check_state_dict_keys(model, state_dict, path)
    # strict=False only tolerates the BatchNorm batch counters, which _check_state_dict_keys allows.
    model.load_state_dict(used, strict=False)

    digest = sha256_of_file(path)
    model.weights_path = path  # type: ignore[assignment]
    model.weights_sha256 = digest  # type: ignore[assignment]
    model.description = (  # type: ignore[assignment]
        f"pytorch-fid-compatible Inception-v3 pool3 ({NUM_FEATURES}-d), "
        f"benchmark.metrics.inception from safedenoise-bench {_package_version()}; "
        f"weights {path.name} sha256:{digest}"
    )
    logger.info("Loaded FID Inception weights from %s (sha256 %s).", path, digest)
    return model.to(device).eval()


class InceptionFrechetDistance(FrechetDistance):
    """FID: the Fréchet distance between pool3 features of the FID Inception-v3.

    Args:
        reference_name: name of the real image set, for example ``"coco-10k val2014, 512 center crop"``.
        weights_path: the FID Inception weights file, found as ``resolve_inception_weights``
            describes. Ignored when ``extractor`` is given.
        extractor: an already loaded ``FIDInceptionV3`` (from ``load_fid_inception``), to share
            one network between FID and KID.
        device: where the network and the statistics live.

    ``update`` takes (B, 3, H, W) float images in [0, 1] at any size. The network resizes each batch
    to 299x299 itself, and the result's ``resize_policy`` records how.
    """

    def __init__(
        self,
        reference_name: str,
        *,
        weights_path: str | os.PathLike[str] | None = None,
        extractor: FIDInceptionV3 | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if extractor is None:
            extractor = load_fid_inception(weights_path, device=device)
        super().__init__(
            extractor,
            feature_extractor_name=_describe(extractor),
            reference_name=reference_name,
            input_size=None,
            device=device,
        )
        self.resize_policy = extractor.resize_policy


class InceptionKernelDistance(KernelDistance):
    """KID: the polynomial-kernel MMD² between pool3 features of the FID Inception-v3.

    ``reference_name``, ``weights_path``, ``extractor`` and ``device`` are as for
    ``InceptionFrechetDistance``. ``subset_size``, ``num_subsets`` and ``seed`` are as for
    ``KernelDistance``. The kernel is the standard KID kernel (xᵀy / 2048 + 1)³.
    """

    def __init__(
        self,
        reference_name: str,
        *,
        weights_path: str | os.PathLike[str] | None = None,
        extractor: FIDInceptionV3 | None = None,
        subset_size: int = 1000,
        num_subsets: int = 100,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if extractor is None:
            extractor = load_fid_inception(weights_path, device=device)
        super().__init__(
            extractor,
            feature_extractor_name=_describe(extractor),
            reference_name=reference_name,
            subset_size=subset_size,
            num_subsets=num_subsets,
            seed=seed,
            input_size=None,
            device=device,
        )


def _describe(extractor: FIDInceptionV3) -> str:
    description = getattr(extractor, "description", None)
    if description is None:
        return "FID Inception-v3 pool3 (2048-d) with weights not loaded by load_fid_inception"
    return str(description)
