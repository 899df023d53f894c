"""Tests for the closed-form UCE edit of cross-attention projections (baselines.uce)."""

from __future__ import annotations

import pytest
import torch

from baselines.uce import (
    UCEConfig,
    aligned_erase_rows,
    cross_attention_modules,
    encode_tokens,
    main,
    solve_uce_weight,
    uce_edit,
)
from tiny_models import tiny_clip_tokenizer, tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline():
    pipe = tiny_sd_pipeline(seed=0)
    # 8 tokens keep the erase rows fewer than the 32 embedding dimensions, so that W'·c = target can
    # hold exactly; with SD's 77 tokens the edit is a least-squares fit.
    pipe.tokenizer = tiny_clip_tokenizer(model_max_length=8)
    return pipe


def _projection_weights(unet) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{projection}": getattr(module, projection).weight.detach().double().clone()
        for name, module in cross_attention_modules(unet).items()
        for projection in ("to_k", "to_v")
    }


def test_erased_tokens_map_to_guide(pipeline):
    original = _projection_weights(pipeline.unet)
    edited_unet = uce_edit(pipeline, ["cat"], "dog", lamb=1e-4)
    edited = _projection_weights(edited_unet)
    erase_rows, guide_rows = aligned_erase_rows(pipeline.text_encoder, pipeline.tokenizer, "cat", "dog")

    assert erase_rows.shape[0] >= 2
    for name, weight in original.items():
        target = guide_rows @ weight.T
        result = erase_rows @ edited[name].T
        relative_error = (result - target).norm() / target.norm()
        assert relative_error < 1e-3, name
        before = (erase_rows @ weight.T - target).norm() / target.norm()
        assert before > 0.05, name


def test_preserved_concept_is_unchanged(pipeline):
    original = _projection_weights(pipeline.unet)
    edited = _projection_weights(uce_edit(pipeline, ["cat"], "dog", ["car"], preserve_scale=1.0, lamb=1e-4))
    preserve_rows, _ = encode_tokens(pipeline.text_encoder, pipeline.tokenizer, ["car"])
    preserve_rows = preserve_rows[0]
    erase_rows, guide_rows = aligned_erase_rows(pipeline.text_encoder, pipeline.tokenizer, "cat", "dog")

    for name, weight in original.items():
        kept = preserve_rows @ weight.T
        relative_change = (preserve_rows @ edited[name].T - kept).norm() / kept.norm()
        # Without the preserve term this change is about 0.9 on this model.
        assert relative_change < 1e-3, name
        target = guide_rows @ weight.T
        assert (erase_rows @ edited[name].T - target).norm() / target.norm() < 1e-3, name


def test_solution_satisfies_normal_equations():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    erase = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    guide = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    preserve = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    lamb, erase_scale, preserve_scale = 0.3, 1.5, 0.2

    edited = solve_uce_weight(
        weight, erase, guide, preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale
    )

    # Gradient of the UCE objective with respect to W' vanishes at the minimiser.
    gradient = (
        lamb * (edited - weight)
        + erase_scale * (erase @ edited.T - guide @ weight.T).T @ erase
        + preserve_scale * (preserve @ edited.T - preserve @ weight.T).T @ preserve
    )
    assert gradient.abs().max() < 1e-10


def test_only_cross_attention_keys_and_values_change(pipeline):
    edited = uce_edit(pipeline, ["cat"], "")
    original_state = pipeline.unet.state_dict()
    edited_state = edited.state_dict()
    changed = {key for key in original_state if not torch.equal(original_state[key], edited_state[key])}

    assert changed
    for key in changed:
        assert ".attn2.to_k.weight" in key or ".attn2.to_v.weight" in key, key
    assert len(changed) == 2 * len(cross_attention_modules(pipeline.unet))


def test_values_only_leaves_keys(pipeline):
    edited = uce_edit(pipeline, ["cat"], "", edit_keys=False)
    for name, module in cross_attention_modules(edited).items():
        original = pipeline.unet.get_submodule(name)
        assert torch.equal(module.to_k.weight, original.to_k.weight), name
        assert not torch.equal(module.to_v.weight, original.to_v.weight), name


@pytest.mark.parametrize("preserve", [(), ("car", "tree")])
def test_no_erase_concepts_is_identity(pipeline, preserve):
    original = _projection_weights(pipeline.unet)
    edited = _projection_weights(uce_edit(pipeline, [], "", preserve))

    for name, weight in original.items():
        torch.testing.assert_close(edited[name], weight, rtol=1e-5, atol=1e-6)


def test_input_unet_is_not_modified(pipeline):
    before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    uce_edit(pipeline.unet, ["cat"], "dog", text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    for key, value in pipeline.unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_config_validation_messages():
    with pytest.raises(ValueError, match="2 guide concepts for 1 erase"):
        UCEConfig.from_concepts(["cat"], ["dog", "cow"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        UCEConfig.from_concepts("cat")
    with pytest.raises(ValueError, match="lamb must be > 0"):
        UCEConfig.from_concepts(["cat"], lamb=0.0)


def test_unet_without_text_encoder_is_rejected(pipeline):
    with pytest.raises(ValueError, match="text_encoder= and tokenizer="):
        uce_edit(pipeline.unet, ["cat"])


def test_cli_writes_loadable_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "model")
    main(["--model-dir", str(tmp_path / "model"), "--erase", "cat", "--guide", "dog", "--out", str(tmp_path / "uce")])

    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "uce")
    assert (tmp_path / "uce" / "uce_settings.json").is_file()
    expected = uce_edit(tiny_sd_pipeline(seed=0), ["cat"], "dog")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=1e-6, atol=1e-7)
