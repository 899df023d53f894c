"""The miniature class-conditional and unconditional models: training script, weights, sampling loops."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from benchmark.mini import IMAGE_SIZE, UNSAFE_DIGIT, load_digits
from benchmark.mini import train_classcond
from benchmark.mini.classcond import (
    CLASSCOND_DIR,
    NULL_CLASS,
    UNCOND_DIR,
    generate_class_conditional,
    generate_unconditional,
    load_classcond_unet,
    load_scheduler,
    load_uncond_unet,
    load_vae,
)
from safedenoise import NegationBank, ReferenceSafeDenoiser, SafeDenoiserHook

STEPS = 3
MAX_WEIGHTS_BYTES = 5_000_000


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _quantise(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round()


@pytest.fixture(scope="module")
def vae():
    return load_vae()


@pytest.fixture(scope="module")
def classcond_unet():
    return load_classcond_unet()


@pytest.fixture(scope="module")
def uncond_unet():
    return load_uncond_unet()


@pytest.fixture(scope="module")
def seven_bank(vae):
    images, labels = load_digits("train")
    sevens = images[labels == UNSAFE_DIGIT][:16] * 2.0 - 1.0
    return NegationBank.from_vae(sevens, vae, source="test: 16 training 7s")


def _sample_classcond(unet, vae, seeds, labels):
    return generate_class_conditional(
        unet, vae, load_scheduler(), labels, _generators(seeds), num_inference_steps=STEPS, guidance_scale=3.0
    )


def _sample_uncond(unet, vae, seeds):
    return generate_unconditional(unet, vae, load_scheduler(UNCOND_DIR), _generators(seeds), num_inference_steps=STEPS)


# --- training script -----------------------------------------------------------------------------


@pytest.mark.parametrize("unconditional", [False, True])
def test_train_classcond_writes_loadable_unet(tmp_path, unconditional):
    argv = ["--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--augmentations", "1"]
    train_classcond.main(argv + (["--unconditional"] if unconditional else []))

    loader = load_uncond_unet if unconditional else load_classcond_unet
    unet = loader(weights_dir=tmp_path)
    assert unet.config.sample_size == 8
    assert unet.config.in_channels == 4
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    metrics = json.loads((tmp_path / "training_metrics.json").read_text())
    assert metrics["config"]["unconditional"] is unconditional
    assert metrics["config"]["steps"] == 2


def test_loaders_reject_the_other_model():
    with pytest.raises(ValueError, match="num_class_embeds"):
        load_classcond_unet(weights_dir=UNCOND_DIR)
    with pytest.raises(ValueError, match="num_class_embeds"):
        load_uncond_unet(weights_dir=CLASSCOND_DIR)


def test_loader_reports_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classcond"):
        load_classcond_unet(weights_dir=tmp_path)


# --- shipped weights -----------------------------------------------------------------------------


def test_shipped_unets_load_with_expected_config(classcond_unet, uncond_unet):
    assert isinstance(classcond_unet, UNet2DModel)
    assert classcond_unet.config.num_class_embeds == NULL_CLASS + 1
    assert uncond_unet.config.num_class_embeds is None
    for folder in (CLASSCOND_DIR, UNCOND_DIR):
        assert (folder / "README.md").is_file()
        assert (folder / "training_metrics.json").is_file()
        assert load_scheduler(folder).config.beta_schedule == "scaled_linear"


def test_shipped_weights_stay_small():
    for folder in (CLASSCOND_DIR, UNCOND_DIR):
        size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
        assert size < MAX_WEIGHTS_BYTES, f"{folder.name}: {size} bytes"


# --- sampling loops ------------------------------------------------------------------------------


def test_class_conditional_images_have_shape_and_range(classcond_unet, vae):
    images = _sample_classcond(classcond_unet, vae, [1, 2], [7, 3])
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


def test_unconditional_images_have_shape_and_range(uncond_unet, vae):
    images = _sample_uncond(uncond_unet, vae, [1, 2])
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0


def test_class_conditional_image_ignores_batch_companions(classcond_unet, vae):
    batch = _sample_classcond(classcond_unet, vae, [11, 12, 13], [0, 7, 4])
    alone = _sample_classcond(classcond_unet, vae, [12], [7])
    difference = (_quantise(batch[1:2]) - _quantise(alone)).abs().max()
    assert difference <= 2.0


def test_unconditional_image_ignores_batch_companions(uncond_unet, vae):
    batch = _sample_uncond(uncond_unet, vae, [21, 22, 23])
    alone = _sample_uncond(uncond_unet, vae, [22])
    difference = (_quantise(batch[1:2]) - _quantise(alone)).abs().max()
    assert difference <= 2.0


def test_class_conditional_depends_on_label(classcond_unet, vae):
    sevens = _sample_classcond(classcond_unet, vae, [31], [7])
    zeros = _sample_classcond(classcond_unet, vae, [31], [0])
    assert not torch.allclose(sevens, zeros)


def test_generate_class_conditional_rejects_bad_input(classcond_unet, uncond_unet, vae):
    with pytest.raises(ValueError, match="class labels"):
        _sample_classcond(classcond_unet, vae, [1], [NULL_CLASS])
    with pytest.raises(ValueError, match="generators"):
        _sample_classcond(classcond_unet, vae, [1, 2], [7])
    with pytest.raises(ValueError, match="class embedding"):
        _sample_classcond(uncond_unet, vae, [1], [7])


# --- safe denoiser hook ---------------------------------------------------------------------------


def _hooked(sample, seven_bank, t_min: float):
    denoiser = ReferenceSafeDenoiser(seven_bank, bandwidth=2.0, scale=1.0, t_min=t_min)
    hook = SafeDenoiserHook(denoiser, generator=_generators([101, 102]))
    scheduler = load_scheduler()
    with hook.attached(scheduler):
        images = sample(scheduler)
    return images, hook


@pytest.mark.parametrize("model", ["classcond", "uncond"])
def test_hook_applies_inside_sampling_loops(model, classcond_unet, uncond_unet, vae, seven_bank):
    def sample(scheduler):
        generators = _generators([41, 42])
        if model == "classcond":
            return generate_class_conditional(
                classcond_unet, vae, scheduler, [7, 7], generators, num_inference_steps=STEPS, guidance_scale=3.0
            )
        return generate_unconditional(uncond_unet, vae, scheduler, generators, num_inference_steps=STEPS)

    plain = sample(load_scheduler())
    closed, closed_hook = _hooked(sample, seven_bank, t_min=10_000)
    opened, opened_hook = _hooked(sample, seven_bank, t_min=0)

    assert len(closed_hook.records) == STEPS
    assert not any(record.in_window for record in closed_hook.records)
    assert torch.equal(closed, plain)
    assert all(record.in_window for record in opened_hook.records)
    assert (opened - plain).abs().max() > 0.05
