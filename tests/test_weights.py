"""Tests for loading replacement UNets and text encoders from local files (baselines.weights)."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from baselines.weights import (
    UnsafeCheckpointError,
    WeightsLoadError,
    load_replacement,
    replacement_provenance,
)
from tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def other_unet_state():
    """A UNet state dict with the same architecture but different values (seed 1)."""
    return {key: value.clone() for key, value in tiny_sd_pipeline(seed=1).unet.state_dict().items()}


def _assert_state_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_round_trip(pipeline, tmp_path):
    source = tiny_sd_pipeline(seed=1).unet
    source.save_pretrained(tmp_path / "unet", safe_serialization=True)
    base_before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}

    unet = load_replacement(pipeline, tmp_path / "unet")

    _assert_state_equal(unet, source.state_dict())
    _assert_state_equal(pipeline.unet, base_before)
    provenance = replacement_provenance(unet)
    assert provenance.source_format == "diffusers-folder"
    assert provenance.sha256 == _sha256(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")


def test_pipeline_folder_uses_component_subfolder(pipeline, tmp_path):
    source = tiny_sd_pipeline(seed=1)
    source.text_encoder.save_pretrained(tmp_path / "text_encoder")

    text_encoder = load_replacement(pipeline, tmp_path, component="text_encoder")

    _assert_state_equal(text_encoder, source.text_encoder.state_dict())
    assert replacement_provenance(text_encoder).component == "text_encoder"


def test_safetensors_round_trip(pipeline, other_unet_state, tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(other_unet_state, str(path))

    unet = load_replacement(pipeline, path)

    _assert_state_equal(unet, other_unet_state)
    provenance = replacement_provenance(unet)
    assert provenance.sha256 == _sha256(path)
    assert provenance.key_format == "diffusers"


def test_full_pipeline_state_dict_picks_component(pipeline, other_unet_state, tmp_path):
    text_state = tiny_sd_pipeline(seed=1).text_encoder.state_dict()
    combined = {f"unet.{key}": value for key, value in other_unet_state.items()}
    combined.update({f"text_encoder.{key}": value.clone() for key, value in text_state.items()})
    path = tmp_path / "pipeline.safetensors"
    save_file(combined, str(path))

    unet = load_replacement(pipeline, path, component="unet")
    text_encoder = load_replacement(pipeline, path, component="text_encoder")

    _assert_state_equal(unet, other_unet_state)
    _assert_state_equal(text_encoder, text_state)


def test_transformers4_text_model_prefix_is_aligned(pipeline, tmp_path):
    text_state = tiny_sd_pipeline(seed=1).text_encoder.state_dict()
    prefixed = {f"text_model.{key}": value.clone() for key, value in text_state.items()}
    path = tmp_path / "text_encoder.safetensors"
    save_file(prefixed, str(path))

    text_encoder = load_replacement(pipeline, path, component="text_encoder")

    _assert_state_equal(text_encoder, text_state)


def test_weights_only_pickle_round_trip(pipeline, other_unet_state, tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(other_unet_state, path)

    unet = load_replacement(pipeline, path)

    _assert_state_equal(unet, other_unet_state)
    assert replacement_provenance(unet).source_format == "torch-weights-only"


def test_wrapped_ldm_checkpoint_text_encoder(pipeline, tmp_path):
    text_state = tiny_sd_pipeline(seed=1).text_encoder.state_dict()
    # Stable Diffusion v1 checkpoints name the CLIP tensors with transformers 4's ``text_model.``.
    ldm = {f"cond_stage_model.transformer.text_model.{key}": value.clone() for key, value in text_state.items()}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm, "global_step": 1000}, path)

    text_encoder = load_replacement(pipeline, path, component="text_encoder")

    _assert_state_equal(text_encoder, text_state)
    assert replacement_provenance(text_encoder).key_format == "ldm"


def test_ldm_unet_keys_use_diffusers_converter(pipeline, tmp_path):
    # The fixed layers (conv_in, time embedding, conv_out) have a one-to-one ldm name in diffusers'
    # mapping; a file with only those is a partial ldm checkpoint.
    base_state = pipeline.unet.state_dict()
    mapping = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    ldm = {f"model.diffusion_model.{ldm_key}": base_state[key] + 1 for key, ldm_key in mapping.items() if key in base_state}
    path = tmp_path / "ldm_unet.safetensors"
    save_file(ldm, str(path))

    unet = load_replacement(pipeline, path, strict=False)

    state = unet.state_dict()
    for key in mapping:
        if key in base_state:
            assert torch.equal(state[key], base_state[key] + 1), key
    assert torch.equal(state["down_blocks.0.resnets.0.conv1.weight"], base_state["down_blocks.0.resnets.0.conv1.weight"])
    assert replacement_provenance(unet).key_format == "ldm"


class _Payload:
    """An arbitrary class: unpickling an instance needs a global lookup that weights_only forbids."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_pickle_with_arbitrary_object_is_rejected(pipeline, other_unet_state, tmp_path, capsys):
    path = tmp_path / "unsafe.ckpt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": other_unet_state, "payload": _Payload()}, handle, protocol=2)

    with pytest.raises(UnsafeCheckpointError, match="weights_only=True") as error:
        load_replacement(pipeline, path)
    assert "safetensors" in str(error.value)
    assert "unpickled" not in capsys.readouterr().out


def test_missing_keys_are_named(pipeline, other_unet_state, tmp_path):
    partial = dict(other_unet_state)
    removed = sorted(partial)[0]
    del partial[removed]
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))

    with pytest.raises(WeightsLoadError, match="1 missing keys") as error:
        load_replacement(pipeline, path)
    assert removed in str(error.value)
    assert "strict=False" in str(error.value)

    unet = load_replacement(pipeline, path, strict=False)
    assert replacement_provenance(unet).missing_keys == (removed,)
    assert torch.equal(unet.state_dict()[removed], pipeline.unet.state_dict()[removed])


def test_shape_mismatch_names_key_and_base_model(pipeline, other_unet_state, tmp_path):
    wrong = dict(other_unet_state)
    wrong["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "wrong.safetensors"
    save_file(wrong, str(path))

    with pytest.raises(WeightsLoadError, match="conv_in.weight") as error:
        load_replacement(pipeline, path, strict=False)
    assert "different base model" in str(error.value)


def test_wrong_component_is_named(pipeline, tmp_path):
    text_state = tiny_sd_pipeline(seed=1).text_encoder.state_dict()
    path = tmp_path / "text_encoder.safetensors"
    save_file({key: value.clone() for key, value in text_state.items()}, str(path))

    with pytest.raises(WeightsLoadError, match="unexpected keys") as error:
        load_replacement(pipeline, path, component="unet")
    assert "component='text_encoder'" in str(error.value)


def test_missing_path_and_unknown_suffix(pipeline, tmp_path):
    with pytest.raises(WeightsLoadError, match="not found"):
        load_replacement(pipeline, tmp_path / "absent.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"0")
    with pytest.raises(WeightsLoadError, match="unsupported weights file"):
        load_replacement(pipeline, odd)


def test_folder_config_difference_is_logged(pipeline, tmp_path, caplog):
    source = tiny_sd_pipeline(seed=1)
    source.unet.save_pretrained(tmp_path / "unet")
    source.text_encoder.save_pretrained(tmp_path / "text_encoder")
    with caplog.at_level("WARNING", logger="baselines.weights"):
        load_replacement(pipeline, tmp_path / "unet")
        load_replacement(pipeline, tmp_path / "text_encoder", component="text_encoder")
    assert not caplog.records

    config_file = tmp_path / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["attention_head_dim"] = 8
    config_file.write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="baselines.weights"):
        load_replacement(pipeline, tmp_path / "unet")
    assert "attention_head_dim" in caplog.text


@pytest.mark.parametrize("name", ["mini-esd-u"])
def test_shipped_mini_weights_fit_mini_model(name):
    from pathlib import Path

    from benchmark.mini.pipeline import TEXT2IMG_DIR, load_text2img_pipeline

    folder = Path(__file__).resolve().parents[1] / "baselines" / "weights" / name
    base_unet_file = TEXT2IMG_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} is not shipped")
    if not base_unet_file.is_file():
        pytest.skip(f"the miniature text-to-image weights are not in {TEXT2IMG_DIR}")
    settings = json.loads(next(folder.glob("*_settings.json")).read_text())
    # Shipped unlearned weights must match the shipped base model; stale ones are a packaging bug.
    assert _sha256(base_unet_file) == settings["base_unet_sha256"], (
        f"{name} was made from another miniature UNet; retrain it with the command in its README"
    )

    pipeline = load_text2img_pipeline()
    unet = load_replacement(pipeline, folder)

    assert replacement_provenance(unet).sha256 == _sha256(folder / "diffusion_pytorch_model.safetensors")
    base_state = pipeline.unet.state_dict()
    changed = {key for key, value in unet.state_dict().items() if not torch.equal(value, base_state[key])}
    cross_attention = {key for key in changed if ".attn2." in key}
    if name == "mini-uce":
        assert changed
        assert changed == {key for key in cross_attention if key.endswith(("to_k.weight", "to_v.weight"))}
    else:
        assert changed - cross_attention
        assert not cross_attention
