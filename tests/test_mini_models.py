"""The embedded miniature models: data split, training scripts, shipped weights, prompt CSV."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from benchmark.mini import (
    IMAGE_SIZE,
    UNSAFE_DIGIT,
    WEIGHTS_DIR,
    DigitClassifier,
    export_text2img_pipeline,
    load_digit_classifier,
    load_digits,
    load_text2img_pipeline,
)
from benchmark.mini import make_prompts, train_judge, train_text2img, train_vae
from benchmark.mini.captions import arithmetic_expressions, training_caption
from benchmark.mini.data import augment_digits, split_indices
from benchmark.mini.train_judge import accuracy

CSV_PATH = make_prompts.DEFAULT_OUTPUT


def _load_card_metrics(folder) -> dict:
    return json.loads((folder / "training_metrics.json").read_text())["metrics"]


# --- data -------------------------------------------------------------------------------------


def test_digit_splits_have_expected_shapes_and_range():
    for split, size in (("train", 1200), ("val", 297), ("holdout", 300)):
        images, labels = load_digits(split)
        assert images.shape == (size, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert images.min() >= 0.0
        assert images.max() <= 1.0
        assert torch.equal(images[:, 0], images[:, 2])


def test_digit_splits_are_disjoint():
    indices = {split: set(split_indices(split).tolist()) for split in ("train", "val", "holdout")}
    assert not indices["train"] & indices["val"]
    assert not indices["train"] & indices["holdout"]
    assert not indices["val"] & indices["holdout"]
    assert len(indices["train"] | indices["val"] | indices["holdout"]) == 1797


def test_digit_splits_are_stratified():
    for split in ("train", "val", "holdout"):
        counts = load_digits(split)[1].bincount(minlength=10).float()
        share = counts / counts.sum()
        assert share.min() > 0.09, f"{split}: {counts.tolist()}"
        assert share.max() < 0.11, f"{split}: {counts.tolist()}"


def test_digit_splits_are_deterministic():
    first_images, first_labels = load_digits("val")
    first_images[0] = 0.5  # a caller's in-place change must not leak into the next call
    second_images, second_labels = load_digits("val")
    assert torch.equal(first_labels, second_labels)
    assert not torch.equal(first_images[0], second_images[0])


def test_load_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="test"):
        load_digits("test")


def test_augment_digits_keeps_shape_and_changes_images():
    images, _ = load_digits("val")
    augmented = augment_digits(images[:16], torch.Generator().manual_seed(0))
    assert augmented.shape == images[:16].shape
    assert not torch.allclose(augmented, images[:16])
    assert augmented.min() >= 0.0


# --- training scripts --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae.main(["--out", str(out), "--steps", "2", "--batch-size", "4"])
    return out


def test_train_vae_writes_loadable_weights(short_vae_dir):
    vae = AutoencoderKL.from_pretrained(short_vae_dir)
    latents = vae.encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert vae.config.scaling_factor == pytest.approx(1.0 / _load_card_metrics(short_vae_dir)["latent_std"])


def test_train_text2img_writes_loadable_pipeline(short_vae_dir, tmp_path):
    train_text2img.main([
        "--vae", str(short_vae_dir), "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
        "--augmentations", "1", "--captions-per-digit", "2",
    ])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.cross_attention_dim == 384
    pipeline = load_text2img_pipeline(weights_dir=tmp_path)
    images = pipeline(
        "a 7", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_train_judge_writes_loadable_weights(tmp_path):
    train_judge.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "8"])
    judge = DigitClassifier.from_pretrained(tmp_path)
    assert judge(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, 10)
    assert 0.0 <= _load_card_metrics(tmp_path)["val_accuracy"] <= 1.0


# --- shipped weights ---------------------------------------------------------------------------


def test_shipped_judge_reaches_card_accuracy():
    judge = load_digit_classifier()
    images, labels = load_digits("val")
    measured = _load_card_metrics(WEIGHTS_DIR / "judge")["val_accuracy"]
    assert not judge.training
    assert accuracy(judge, images, labels) >= measured - 0.01


def test_shipped_judge_features_have_declared_size():
    judge = load_digit_classifier()
    features = judge.features(load_digits("val")[0][:5])
    assert features.shape == (5, judge.num_features)


def test_judge_rejects_wrong_image_shape():
    judge = load_digit_classifier()
    with pytest.raises(ValueError, match="32, 32"):
        judge(torch.zeros(1, 1, 28, 28))


def test_shipped_vae_latents_have_unit_std():
    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "text2img" / "vae")
    images, _ = load_digits("val")
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(0))
    scaled_std = (latents * vae.config.scaling_factor).std().item()
    assert 0.8 < scaled_std < 1.25


def test_shipped_pipeline_generates_batch():
    pipeline = load_text2img_pipeline()
    assert pipeline.safety_checker is None
    assert pipeline.tokenizer.model_max_length == 32
    assert pipeline.text_encoder.config.use_attention_mask
    images = pipeline(
        ["a handwritten 3", "seven"], num_inference_steps=3,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.min() >= 0.0
    assert images.max() <= 1.0


def test_exported_pipeline_loads_offline_and_matches(tmp_path):
    export_text2img_pipeline(tmp_path / "export")
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    exported.set_progress_bar_config(disable=True)
    shipped = load_text2img_pipeline()
    kwargs = dict(num_inference_steps=3, output_type="np")
    expected = shipped("the digit 5", generator=torch.Generator().manual_seed(3), **kwargs).images
    actual = exported("the digit 5", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert exported.tokenizer.model_max_length == 32
    np.testing.assert_allclose(actual, expected, atol=1e-5)


# --- prompts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_table() -> pd.DataFrame:
    return pd.read_csv(CSV_PATH)


def test_prompt_csv_has_exact_columns(prompt_table):
    assert tuple(prompt_table.columns) == make_prompts.CSV_COLUMNS


def test_prompt_csv_seeds_and_prompts_are_unique(prompt_table):
    assert prompt_table["evaluation_seed"].is_unique
    assert prompt_table["case_number"].is_unique
    assert prompt_table["prompt"].is_unique


def test_prompt_csv_split_and_style_counts(prompt_table):
    counts = prompt_table.groupby(["split", "category", "style"]).size().to_dict()
    for style in make_prompts.UNSAFE_STYLES:
        assert counts[("test", "unsafe", style)] == 30
        assert counts[("dev", "unsafe", style)] == 15
    for style in make_prompts.BENIGN_STYLES:
        assert counts[("test", "benign", style)] == 45
        assert counts[("dev", "benign", style)] == 18
    unsafe = prompt_table[prompt_table["category"] == "unsafe"]
    benign = prompt_table[prompt_table["category"] == "benign"]
    assert set(unsafe["target_digit"]) == {UNSAFE_DIGIT}
    assert set(benign["target_digit"]) == set(range(10)) - {UNSAFE_DIGIT}


def test_prompt_csv_matches_generator(prompt_table, tmp_path):
    regenerated = pd.read_csv(make_prompts.write_csv(make_prompts.generate_rows(0), tmp_path / "p.csv"))
    pd.testing.assert_frame_equal(regenerated, prompt_table)


def test_prompts_not_in_training_captions(prompt_table):
    # A different seed from the one make_prompts filters with, so this sample is independent.
    rng = random.Random(12345)
    training = {training_caption(digit, rng).lower() for digit in range(10) for _ in range(20000)}
    overlap = set(prompt_table["prompt"].str.lower()) & training
    assert not overlap


OPERATION_OF_WORD = {
    "+": "+", "plus": "+", "and": "+", "-": "-", "minus": "-", "take away": "-",
    "*": "*", "times": "*", "x": "*", "multiplied by": "*", "/": "/", "divided by": "/",
    "÷": "/", "over": "/",
}


def _operations(expressions: list[str]) -> set[tuple[str, str, str]]:
    triples = set()
    for expression in expressions:
        first, *words, second = expression.split(" ")
        triples.add((first, OPERATION_OF_WORD[" ".join(words)], second))
    return triples


def test_arithmetic_pairs_disjoint_between_sides():
    for digit in range(10):
        training = _operations(arithmetic_expressions(digit, training=True))
        evaluation = _operations(arithmetic_expressions(digit, training=False))
        assert training, f"digit {digit} has no training expressions"
        assert evaluation, f"digit {digit} has no evaluation expressions"
        assert not training & evaluation
