"""Tests of the Fréchet distance against a direct scipy computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from benchmark.metrics import FrechetDistance, FrechetResult

NUM_FEATURES = 6


class LinearFeatures(nn.Module):
    """Stand-in extractor: a fixed linear map of the mean colour of each 8x8 block."""

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = nn.Linear(3 * 2 * 2, NUM_FEATURES)
        with torch.no_grad():
            self.projection.weight.copy_(torch.randn(NUM_FEATURES, 12, generator=generator))
            self.projection.bias.copy_(torch.randn(NUM_FEATURES, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(nn.functional.avg_pool2d(images, 8).flatten(1))


def reference_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    cov_sqrt = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * cov_sqrt))


def gaussian_images(count: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator, dtype=torch.float64).float() + shift


def make_metric(**kwargs: object) -> FrechetDistance:
    options: dict[str, object] = {
        "feature_extractor_name": "linear stand-in",
        "reference_name": "gaussian-reference",
    }
    options.update(kwargs)
    return FrechetDistance(LinearFeatures(), **options)  # type: ignore[arg-type]


def test_frechet_identical_sets_near_zero() -> None:
    metric = make_metric()
    images = gaussian_images(64, seed=0)
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert abs(metric.compute().value) < 1e-6


def test_frechet_matches_scipy_formula() -> None:
    metric = make_metric()
    reference = gaussian_images(80, seed=1)
    generated = gaussian_images(50, seed=2, shift=0.3)
    for start in range(0, 80, 16):
        metric.update(reference[start : start + 16], real=True)
    for start in range(0, 50, 16):
        metric.update(generated[start : start + 16], real=False)

    extractor = LinearFeatures()
    with torch.no_grad():
        expected = reference_frechet(
            extractor(reference).double().numpy(), extractor(generated).double().numpy()
        )
    result = metric.compute()
    assert expected > 0.1
    assert result.value == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_grows_with_mean_shift() -> None:
    values = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        metric = make_metric()
        metric.update(gaussian_images(64, seed=3), real=True)
        metric.update(gaussian_images(64, seed=4, shift=shift), real=False)
        values.append(metric.compute().value)
    assert values == sorted(values)
    assert values[-1] > 10 * values[0]


def test_frechet_records_metadata() -> None:
    metric = make_metric(input_size=(16, 16))
    metric.update(gaussian_images(5, seed=5), real=True)
    metric.update(gaussian_images(3, seed=6), real=False)
    metric.update(gaussian_images(4, seed=7), real=False)
    result = metric.compute()

    assert isinstance(result, FrechetResult)
    assert result.implementation.startswith("torchmetrics 1.")
    assert "FrechetInceptionDistance" in result.implementation
    assert result.feature_extractor == "linear stand-in"
    assert result.num_features == NUM_FEATURES
    assert result.reference_name == "gaussian-reference"
    assert result.reference_size == 5
    assert result.generated_size == 7
    assert "16x16" in result.resize_policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.value = 0.0  # type: ignore[misc]


def test_frechet_resize_policy_applies() -> None:
    # With input_size, 32x32 batches are resized to 16x16 before the extractor, so they match
    # the same batch resized beforehand with antialiased bilinear interpolation.
    large = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    resized = nn.functional.interpolate(
        large, size=(16, 16), mode="bilinear", align_corners=False, antialias=True
    )
    metric = make_metric(input_size=(16, 16))
    metric.update(resized, real=True)
    metric.update(large, real=False)
    assert abs(metric.compute().value) < 1e-6

    unresized = make_metric()
    unresized.update(resized, real=True)
    unresized.update(large[:, :, ::2, ::2].contiguous(), real=False)
    assert unresized.compute().value > 1e-3


def test_frechet_accepts_pil_images() -> None:
    generator = np.random.default_rng(9)
    arrays = [generator.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    metric = make_metric()
    metric.update([Image.fromarray(array) for array in arrays], real=True)
    metric.update(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255, real=False)
    assert metric.reference_size == 6
    assert abs(metric.compute().value) < 1e-6


@pytest.mark.parametrize("reference_count, generated_count", [(1, 10), (10, 1), (0, 10)])
def test_frechet_rejects_sets_under_two(reference_count: int, generated_count: int) -> None:
    metric = make_metric()
    if reference_count:
        metric.update(gaussian_images(reference_count, seed=10), real=True)
    metric.update(gaussian_images(generated_count, seed=11), real=False)
    with pytest.raises(ValueError, match="at least 2"):
        metric.compute()


def test_frechet_reset_keeps_reference() -> None:
    metric = make_metric()
    metric.update(gaussian_images(10, seed=12), real=True)
    metric.update(gaussian_images(10, seed=13), real=False)
    metric.reset(keep_reference=True)
    assert metric.reference_size == 10
    assert metric.generated_size == 0
    metric.reset()
    assert metric.reference_size == 0


def test_frechet_rejects_wrong_feature_shape() -> None:
    class WrongWidth(nn.Module):
        num_features = 4

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(1)[:, :3]

    metric = FrechetDistance(WrongWidth(), feature_extractor_name="wrong", reference_name="r")
    with pytest.raises(ValueError, match="expected \\(2, 4\\)"):
        metric.update(torch.rand(2, 3, 8, 8), real=True)


def test_frechet_with_digit_judge_features() -> None:
    from benchmark.judges.digit import DigitJudge

    class StandInDigitClassifier(nn.Module):
        num_features = 48

        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(self.num_features, 10)

        def features(self, images: torch.Tensor) -> torch.Tensor:
            return nn.functional.avg_pool2d(images, 8).flatten(1)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(images))

    judge = DigitJudge(StandInDigitClassifier())
    metric = FrechetDistance(
        judge.feature_extractor(),
        feature_extractor_name=f"{judge.name} {judge.version}",
        reference_name="random-32",
        input_size=(32, 32),
    )
    generator = torch.Generator().manual_seed(14)
    metric.update(torch.rand(300, 3, 32, 32, generator=generator), real=True)
    metric.update(torch.rand(300, 3, 32, 32, generator=generator) * 0.5, real=False)
    result = metric.compute()
    assert result.num_features == StandInDigitClassifier.num_features
    assert result.value > 0


def test_frechet_infers_num_features_by_probe() -> None:
    extractor = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5))
    metric = FrechetDistance(
        extractor, feature_extractor_name="probe", reference_name="r", input_size=(8, 8)
    )
    assert metric.num_features == 5

    with pytest.raises(ValueError, match="num_features"):
        FrechetDistance(extractor, feature_extractor_name="probe", reference_name="r")
