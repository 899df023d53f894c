"""Tests for ESD fine-tuning (baselines.esd) on a randomly initialised tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from baselines.esd import ESDConfig, esd_trainable_parameters, main, run_esd, save_esd_unet
from tiny_models import tiny_sd_pipeline

CONCEPT = "cat"


@pytest.fixture(scope="module")
def pipeline():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def esd_u_output(pipeline):
    return run_esd(pipeline, ESDConfig(CONCEPT, method="esd-u", steps=4, lr=1e-3, ddim_steps=5))


@pytest.fixture(scope="module")
def esd_x_output(pipeline):
    return run_esd(pipeline, ESDConfig(CONCEPT, method="esd-x", steps=4, lr=1e-3, ddim_steps=5))


def _changed_keys(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    after_state = after.state_dict()
    return {key for key, value in before.state_dict().items() if not torch.equal(value, after_state[key])}


def _esd_objective(pipeline, unet, negative_guidance: float = 1.0) -> float:
    """Mean ESD loss of ``unet`` on fixed noisy latents at fixed timesteps."""
    generator = torch.Generator().manual_seed(123)
    sample_size = pipeline.unet.config.sample_size
    latents = torch.randn(4, 4, sample_size, sample_size, generator=generator)
    timesteps = torch.tensor([100, 300, 600, 900])
    with torch.no_grad():
        concept, null = pipeline.encode_prompt(CONCEPT, "cpu", 4, True, negative_prompt="")
        frozen_concept = pipeline.unet(latents, timesteps, encoder_hidden_states=concept).sample
        frozen_null = pipeline.unet(latents, timesteps, encoder_hidden_states=null).sample
        target = frozen_null - negative_guidance * (frozen_concept - frozen_null)
        prediction = unet(latents, timesteps, encoder_hidden_states=concept).sample
    return torch.nn.functional.mse_loss(prediction, target).item()


def test_esd_u_leaves_cross_attention(pipeline, esd_u_output):
    changed = _changed_keys(pipeline.unet, esd_u_output.unet)

    assert changed
    assert not [key for key in changed if ".attn2." in key]
    assert any(key.startswith("down_blocks.0.resnets.") for key in changed)
    assert not [key for key in changed if "norm" in key.split(".")[-2]]


def test_esd_x_changes_only_cross_attention(pipeline, esd_x_output):
    changed = _changed_keys(pipeline.unet, esd_x_output.unet)

    assert changed
    assert all(".attn2." in key for key in changed)
    assert any(".attn2.to_k." in key for key in changed)


def test_trainable_groups_partition_linear_and_conv(pipeline):
    esd_u = set(esd_trainable_parameters(pipeline.unet, "esd-u"))
    esd_x = set(esd_trainable_parameters(pipeline.unet, "esd-x"))

    assert esd_u and esd_x
    assert not esd_u & esd_x
    assert all(".attn2." in name for name in esd_x)
    assert "conv_in.weight" in esd_u


def test_frozen_pipeline_unet_is_untouched(pipeline):
    before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in pipeline.unet.named_parameters()}

    run_esd(pipeline, ESDConfig(CONCEPT, method="esd-u", steps=2, lr=1e-2, ddim_steps=5))

    for key, value in pipeline.unet.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {name: p.requires_grad for name, p in pipeline.unet.named_parameters()} == flags


def test_loss_falls_on_short_run(pipeline):
    config = ESDConfig(CONCEPT, method="esd-x", steps=30, lr=2e-3, ddim_steps=5, negative_guidance=1.0)
    before = _esd_objective(pipeline, pipeline.unet)

    output = run_esd(pipeline, config)
    after = _esd_objective(pipeline, output.unet)

    assert before > 0
    assert after < 0.5 * before
    assert len(output.losses) == config.steps


def test_same_seed_gives_same_weights(pipeline, esd_x_output):
    again = run_esd(pipeline, esd_x_output.config)

    assert again.losses == esd_x_output.losses
    assert not _changed_keys(esd_x_output.unet, again.unet)


def test_saved_folder_reloads(esd_u_output, tmp_path):
    save_esd_unet(esd_u_output, tmp_path / "esd", extra={"base_model_dir": "tiny"})

    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "esd")
    assert not _changed_keys(esd_u_output.unet, reloaded)
    assert (tmp_path / "esd" / "diffusion_pytorch_model.safetensors").is_file()
    record = json.loads((tmp_path / "esd" / "esd_settings.json").read_text())
    assert record["settings"]["concept"] == CONCEPT
    assert record["settings"]["steps"] == 4
    assert record["base_model_dir"] == "tiny"


def test_cli_trains_and_writes_unet(tmp_path):
    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "model")
    main([
        "--model-dir", str(tmp_path / "model"), "--concept", CONCEPT, "--method", "esd-x",
        "--out", str(tmp_path / "out"), "--steps", "2", "--ddim-steps", "4", "--lr", "1e-3",
    ])

    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    base = tiny_sd_pipeline(seed=0).unet
    changed = _changed_keys(base, reloaded)
    assert changed
    assert all(".attn2." in key for key in changed)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="invalid ESD method 'esd-z'"):
        ESDConfig(CONCEPT, method="esd-z")
    with pytest.raises(ValueError, match="concept is empty"):
        ESDConfig("  ")
