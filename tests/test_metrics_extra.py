"""Tests of the FID Inception loader, FID/KID with it, the CLIP score and the COCO reference images.

No real weights are used. The Inception tests save a randomly initialised ``FIDInceptionV3``, whose
BatchNorm statistics are set from one batch so that its features do not vanish, in the real
state-dict layout. The CLIP tests save a tiny random CLIP with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel

from benchmark.metrics.clip_score import ClipScore, ClipScoreResult
from benchmark.metrics.inception import (
    NUM_FEATURES,
    RESIZE_POLICY,
    WEIGHTS_ENV_VAR,
    WEIGHTS_FILENAME,
    FIDInceptionV3,
    InceptionFrechetDistance,
    InceptionKernelDistance,
    InceptionWeightsNotFoundError,
    load_fid_inception,
    resolve_inception_weights,
    sha256_of_file,
)
from benchmark.metrics.kid import KernelDistance
from benchmark.metrics.reference import (
    MissingReferenceImagesError,
    coco_image_id,
    coco_reference_images,
)
from benchmark.suites import load_suite
from tiny_models import save_stand_in_inception, save_tiny_clip, smooth_images, tiny_clip_tokenizer

CLIP_IMAGE_SIZE = 32


# --- FID Inception -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_stand_in_inception(tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME)


@pytest.fixture(scope="module")
def inception(inception_weights: Path) -> FIDInceptionV3:
    return load_fid_inception(inception_weights)


def test_inception_loads_weights_and_gives_2048_features(inception_weights: Path, inception: FIDInceptionV3) -> None:
    saved = torch.load(inception_weights, weights_only=True)
    loaded = inception.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var"):
        assert torch.equal(loaded[key], saved[key]), key

    with torch.no_grad():
        features = inception(smooth_images(3, seed=1))
    assert features.shape == (3, NUM_FEATURES)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert features.std(dim=0).mean() > 1e-3  # the images give different features


def test_inception_records_weights_sha256(inception_weights: Path, inception: FIDInceptionV3) -> None:
    digest = sha256_of_file(inception_weights)
    assert inception.weights_sha256 == digest
    assert f"sha256:{digest}" in inception.description
    assert WEIGHTS_FILENAME in inception.description


def test_inception_resizes_any_input_size(inception: FIDInceptionV3) -> None:
    images = smooth_images(2, seed=2)
    upsampled = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        from_small = inception(images)
        from_299 = inception(upsampled)
    # A 32x32 batch is resized to 299x299 inside the module, with the same interpolation.
    torch.testing.assert_close(from_small, from_299)


def test_inception_weights_found_by_env_var_and_folder(
    inception_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(inception_weights))
    assert resolve_inception_weights() == inception_weights

    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(inception_weights.parent))
    assert resolve_inception_weights() == inception_weights

    monkeypatch.delenv(WEIGHTS_ENV_VAR)
    assert resolve_inception_weights(inception_weights.parent) == inception_weights


def test_inception_missing_weights_error_names_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/safebench/metrics
    with pytest.raises(InceptionWeightsNotFoundError) as raised:
        resolve_inception_weights()
    message = str(raised.value)
    assert WEIGHTS_FILENAME in message
    assert WEIGHTS_ENV_VAR in message
    assert ".cache/safebench/metrics" in message

    with pytest.raises(InceptionWeightsNotFoundError, match="weights_path"):
        load_fid_inception(tmp_path / "absent.pth")


def test_inception_rejects_wrong_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing key"):
        load_fid_inception(path)


def test_fid_same_set_near_zero_other_set_larger(inception: FIDInceptionV3) -> None:
    reference = smooth_images(6, seed=3)
    metric = InceptionFrechetDistance("six smooth images", extractor=inception)
    metric.update(reference, real=True)
    metric.update(reference, real=False)
    same = metric.compute()

    metric.reset(keep_reference=True)
    metric.update(smooth_images(6, seed=4, brightness=0.8), real=False)
    other = metric.compute()

    assert other.value > 0.0
    assert abs(same.value) < 1e-3 * other.value
    assert same.num_features == NUM_FEATURES
    assert same.reference_name == "six smooth images"
    assert (same.reference_size, same.generated_size) == (6, 6)
    assert same.resize_policy == RESIZE_POLICY
    assert inception.weights_sha256 in same.feature_extractor
    assert "torchmetrics" in same.implementation


def test_kid_records_subsets_and_is_reproducible(inception: FIDInceptionV3) -> None:
    metric = InceptionKernelDistance("six smooth images", extractor=inception, subset_size=4, num_subsets=5, seed=7)
    metric.update(smooth_images(6, seed=3), real=True)
    metric.update(smooth_images(5, seed=4, brightness=0.8), real=False)
    first = metric.compute()
    second = metric.compute()

    assert first == second
    assert math.isfinite(first.value)
    assert first.std >= 0.0
    assert (first.subset_size, first.num_subsets, first.seed) == (4, 5, 7)
    assert (first.reference_size, first.generated_size) == (6, 5)
    assert first.kernel == f"polynomial (gamma * x.y + 1)^3, gamma=1/{NUM_FEATURES}"
    assert first.resize_policy == RESIZE_POLICY
    assert inception.weights_sha256 in first.feature_extractor


class MeanColour(torch.nn.Module):
    """Stand-in extractor with 3 features: the mean colour."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def test_kid_matches_unbiased_mmd_with_one_subset() -> None:
    reference = smooth_images(5, seed=5)
    generated = smooth_images(5, seed=6, brightness=0.7)
    metric = KernelDistance(
        MeanColour(), feature_extractor_name="mean colour", reference_name="five", subset_size=5, num_subsets=1
    )
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    result = metric.compute()

    # With subset_size equal to both set sizes, every subset is the whole set.
    x = reference.mean(dim=(2, 3)).double()
    y = generated.mean(dim=(2, 3)).double()

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / 3 + 1) ** 3

    n = 5
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = (
        (k_xx.sum() - k_xx.trace()) / (n * (n - 1))
        + (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
        - 2 * k_xy.mean()
    )
    assert result.value == pytest.approx(float(expected), rel=1e-6)
    assert result.resize_policy.startswith("none")


def test_kid_too_few_images_error() -> None:
    metric = KernelDistance(MeanColour(), feature_extractor_name="mean colour", reference_name="two", subset_size=3)
    metric.update(smooth_images(2, seed=7), real=True)
    metric.update(smooth_images(4, seed=8), real=False)
    with pytest.raises(ValueError, match="subset_size=3"):
        metric.compute()


# --- CLIP score --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), image_size=CLIP_IMAGE_SIZE)


def direct_cosines(clip_dir: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosines computed with transformers alone, truncating prompts with the tokenizer."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = tiny_clip_tokenizer()
    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    pil_images = [
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for image in images
    ]
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output
        vision = model.get_image_features(**processor(images=pil_images, return_tensors="pt")).pooler_output
    return torch.nn.functional.cosine_similarity(text, vision, dim=-1)


def test_clip_score_scales_match_direct_cosine(clip_dir: Path) -> None:
    images = smooth_images(3, seed=9)
    prompts = ["a red car", "two dogs on grass", "a bowl of fruit"]
    expected = direct_cosines(clip_dir, images, prompts)

    percent = ClipScore(clip_dir, scale="torchmetrics")
    percent.update(images[:2], prompts[:2])
    percent.update(images[2:], prompts[2:])
    percent_result = percent.compute()

    cosine = ClipScore(clip_dir, scale="cosine")
    cosine.update(images, prompts)
    cosine_result = cosine.compute()

    mean_cosine = float(expected.mean())
    assert cosine_result.value == pytest.approx(mean_cosine, abs=1e-5)
    assert percent_result.mean_cosine == pytest.approx(mean_cosine, abs=1e-5)
    assert percent_result.value == pytest.approx(max(100.0 * mean_cosine, 0.0), abs=1e-3)
    assert 0.0 <= percent_result.value <= 100.0
    assert -1.0 <= cosine_result.value <= 1.0
    assert percent_result.num_pairs == 3
    assert percent_result.scale == "torchmetrics"
    assert cosine_result.scale == "cosine"


def test_clip_score_truncates_and_counts_long_prompts(clip_dir: Path) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(100))
    prompts = ["a cat", long_prompt]
    images = smooth_images(2, seed=10)

    metric = ClipScore(clip_dir, scale="cosine")
    metric.update(images, prompts)
    result = metric.compute()

    assert result.num_truncated_prompts == 1
    assert result.max_text_tokens == 77
    # The tokenizer's truncation keeps the end-of-text token that CLIP pools.
    assert result.value == pytest.approx(float(direct_cosines(clip_dir, images, prompts).mean()), abs=1e-5)


def test_clip_score_accepts_pil_and_uint8(clip_dir: Path) -> None:
    images = smooth_images(2, seed=11)
    as_uint8 = (images * 255).round().to(torch.uint8)
    as_pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in as_uint8]
    prompts = ["a house", "a boat"]

    results = []
    for batch in (images, as_uint8, as_pil):
        metric = ClipScore(clip_dir, scale="cosine")
        metric.update(batch, prompts)
        results.append(metric.compute().value)
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    assert results[0] == pytest.approx(results[2], abs=1e-6)


def test_clip_score_result_records_model(clip_dir: Path) -> None:
    metric = ClipScore(clip_dir)
    metric.update(smooth_images(1, seed=12), ["a tree"])
    result = metric.compute()
    assert isinstance(result, ClipScoreResult)
    assert result.weights_sha256 == sha256_of_file(clip_dir / "model.safetensors")
    assert result.model_dir == str(clip_dir)
    assert "100" in result.formula
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.value = 0.0  # type: ignore[misc]


def test_clip_score_input_errors(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ClipScore(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ClipScore(tmp_path)

    metric = ClipScore(clip_dir)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metric.update(smooth_images(2, seed=13), ["one"])
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        metric.update(smooth_images(1, seed=13) * 255.0, ["one"])
    with pytest.raises(ValueError, match="no \\(image, prompt\\) pairs"):
        metric.compute()


# --- COCO reference images ---------------------------------------------------------------------


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> None:
    Image.new("RGB", size, colour).save(path, format="JPEG")


def test_coco_ids_from_both_suite_layouts() -> None:
    row_30k = load_suite("coco-30k", limit=1).rows[0]
    row_10k = load_suite("coco-10k", limit=1).rows[0]
    assert coco_image_id(row_30k) == int(row_30k.attributes["coco_id"])
    assert coco_image_id(row_10k) == int(row_10k.case_id)
    assert row_30k.case_id != row_30k.attributes["coco_id"]  # case_number is a row number there


def test_coco_reference_finds_both_file_names(tmp_path: Path) -> None:
    suite = load_suite("coco-10k", limit=3)
    ids = [coco_image_id(row) for row in suite]
    write_jpeg(tmp_path / f"COCO_val2014_{ids[0]:012d}.jpg", (255, 0, 0))
    write_jpeg(tmp_path / f"{ids[1]:012d}.jpg", (0, 255, 0), size=(16, 24))
    write_jpeg(tmp_path / f"COCO_val2014_{ids[2]:012d}.jpg", (0, 0, 255))
    write_jpeg(tmp_path / "COCO_val2014_000000000001.jpg", (9, 9, 9))  # not in the suite

    reference = coco_reference_images(tmp_path, suite)
    assert reference.image_ids == tuple(ids)
    assert [path.name for path in reference.paths] == [
        f"COCO_val2014_{ids[0]:012d}.jpg",
        f"{ids[1]:012d}.jpg",
        f"COCO_val2014_{ids[2]:012d}.jpg",
    ]

    batches = list(reference.batches(batch_size=2, size=8))
    assert [tuple(batch.shape) for batch in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    red = batches[0][0].mean(dim=(1, 2))
    assert red[0] > 0.9
    assert red[1] < 0.1
    assert red[2] < 0.1
    assert "8x8" in reference.reference_name(8)
    assert "coco-10k" in reference.reference_name(8)

    originals = list(reference.batches(batch_size=2, size=None))
    assert [tuple(batch.shape) for batch in originals] == [(1, 3, 16, 24), (1, 3, 24, 16), (1, 3, 16, 24)]


def test_coco_reference_missing_ids_error(tmp_path: Path) -> None:
    suite = load_suite("coco-30k", limit=15)
    first_id = coco_image_id(suite.rows[0])
    write_jpeg(tmp_path / f"{first_id:012d}.jpg", (1, 2, 3))

    with pytest.raises(MissingReferenceImagesError) as raised:
        coco_reference_images(tmp_path, suite)
    message = str(raised.value)
    assert "14 of 15" in message
    assert f"{coco_image_id(suite.rows[1]):012d}" in message
    assert f"{coco_image_id(suite.rows[14]):012d}" not in message  # only the first 10 are listed
    assert "val2014" in message


def test_coco_reference_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        coco_reference_images(tmp_path / "absent", "coco-10k", limit=1)
