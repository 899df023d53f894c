"""SAFREE: trigger detection, projection, the self-validating filter and latent re-attention."""

from __future__ import annotations

import pytest
import torch

from baselines.concepts import NUDITY_CONCEPTS, NUDITY_NEGATIVE_PROMPT
from baselines.guidance import get_guidance_defense
from baselines.safree import (
    FILTER_FORMS,
    SAFREE,
    projection_matrix,
    self_validating_last_step,
    trigger_token_mask,
)
from mini_defense import share_of_sevens
from tiny_models import tiny_sd_pipeline

PROMPTS = ["a photo of a nude person on a beach", "a red bicycle"]
SEEDS = [5, 6]
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _generate(pipe, extra=None, negative_prompt=None, steps=STEPS):
    kwargs = {
        "prompt": PROMPTS,
        "negative_prompt": negative_prompt,
        "num_inference_steps": steps,
        "guidance_scale": 7.5,
        "generator": [torch.Generator().manual_seed(seed) for seed in SEEDS],
        "output_type": "pt",
    }
    kwargs.update(extra or {})
    return pipe(**kwargs).images


def _generate_with(pipe, defense, steps=STEPS):
    with defense.applied(pipe, prompts=PROMPTS, negative_prompts=None, guidance_scale=7.5, num_inference_steps=steps) as extra:
        return _generate(pipe, extra, steps=steps)


# -- the algebra -------------------------------------------------------------------------------------


def test_trigger_rule_flags_outlying_distance():
    distances = torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=torch.float64)
    assert trigger_token_mask(distances, alpha=0.01).tolist() == [False, False, False, True]


def test_trigger_rule_alpha_sets_margin():
    # Token 2's leave-one-out mean is 1.0, so it is flagged at alpha = 0.1 but not at alpha = 0.2.
    distances = torch.tensor([1.0, 1.0, 1.15], dtype=torch.float64)
    assert trigger_token_mask(distances, alpha=0.1).tolist() == [False, False, True]
    assert trigger_token_mask(distances, alpha=0.2).tolist() == [False, False, False]


def test_trigger_rule_single_token_flags_nothing():
    assert trigger_token_mask(torch.tensor([3.0]), alpha=0.01).tolist() == [False]


def test_projection_matrix_is_orthogonal_projection():
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projection = projection_matrix(vectors)
    torch.testing.assert_close(projection @ projection, projection)
    torch.testing.assert_close(projection, projection.T)
    torch.testing.assert_close(vectors @ projection, vectors)


@pytest.mark.parametrize("form", FILTER_FORMS)
def test_filter_steps_monotone_in_similarity(form):
    similarities = torch.linspace(-1.0, 1.0, 201).tolist()
    steps = [self_validating_last_step(similarity, gamma=10, form=form) for similarity in similarities]
    assert all(later <= earlier for earlier, later in zip(steps, steps[1:]))
    assert all(0 <= step <= 10 for step in steps)
    assert steps[0] > steps[-1]


# -- on the tiny pipeline -------------------------------------------------------------------------------


def test_inert_safree_matches_stock_pipeline(pipe):
    stock = _generate(pipe)
    defense = SAFREE(NUDITY_CONCEPTS, alpha=1e9, re_attention=False, concept_negative_prompt=False)
    defended = _generate_with(pipe, defense)
    assert all(not analysis.trigger_mask.any() for analysis in defense.analyses)
    assert len(defense.records) == STEPS
    torch.testing.assert_close(defended, stock, rtol=0, atol=0)


def test_projection_removes_toxic_component_of_triggers(pipe):
    defense = SAFREE(NUDITY_CONCEPTS, alpha=0.0)
    concept_projection = defense.concept_projection(pipe)
    analysis = defense.analyse(pipe, PROMPTS[:1])[0]
    triggers = analysis.trigger_mask
    assert triggers.any()
    assert (~triggers).any()

    safree = analysis.safree_embeds.to(torch.float64)
    original = analysis.original_embeds.to(torch.float64)
    toxic_component = safree[triggers] @ concept_projection
    assert toxic_component.abs().max() < 1e-4 * original[triggers].abs().max()
    assert (original[triggers] @ concept_projection).abs().max() > 1e-2
    torch.testing.assert_close(analysis.safree_embeds[~triggers], analysis.original_embeds[~triggers], rtol=0, atol=0)


def test_trigger_tokens_reported_in_prompt_order(pipe):
    analysis = SAFREE(NUDITY_CONCEPTS, alpha=0.0).analyse(pipe, PROMPTS[:1])[0]
    flagged_positions = torch.nonzero(analysis.trigger_mask).flatten().tolist()
    expected = tuple(analysis.tokens[analysis.token_positions.index(position)] for position in flagged_positions)
    assert analysis.trigger_tokens == expected
    assert len(analysis.distances) == len(analysis.tokens)


def test_embeddings_switch_at_filter_step(pipe):
    steps = 6
    seen: list[torch.Tensor] = []
    class_forward = type(pipe.unet).forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())
        return class_forward(pipe.unet, *args, **kwargs)

    pipe.unet.forward = recording_forward
    try:
        defense = SAFREE(NUDITY_CONCEPTS, alpha=0.0, gamma=3.0, re_attention=False)
        _generate_with(pipe, defense, steps=steps)
        assert pipe.unet.forward is recording_forward
    finally:
        del pipe.unet.forward

    last_steps = [analysis.last_projected_step for analysis in defense.analyses]
    assert min(last_steps) >= 0
    assert max(last_steps) < steps - 1
    assert len(seen) == steps
    for step, hidden in enumerate(seen):
        cond = hidden[len(PROMPTS) :]
        for index, analysis in enumerate(defense.analyses):
            expected = analysis.safree_embeds if step <= analysis.last_projected_step else analysis.original_embeds
            torch.testing.assert_close(cond[index], expected, rtol=0, atol=0)
        assert defense.records[step].projected == tuple(step <= last for last in last_steps)


def test_filter_off_projects_every_step(pipe):
    defense = SAFREE(NUDITY_CONCEPTS, alpha=0.0, self_validating_filter=False, re_attention=False)
    _generate_with(pipe, defense)
    assert all(all(record.projected) for record in defense.records)


def test_re_attention_active_only_during_call(pipe):
    observed: list[object] = []
    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(lambda module, args: observed.append(getattr(module, "s1", None)))
    try:
        pipe.unet.enable_freeu(s1=0.5, s2=0.5, b1=1.1, b2=1.1)
        _generate_with(pipe, SAFREE(NUDITY_CONCEPTS))
        during_call = list(observed)
        restored = [getattr(block, "s1", None) for block in pipe.unet.up_blocks]
        pipe.unet.disable_freeu()
        observed.clear()
        _generate(pipe)
        after_disable = list(observed)
    finally:
        handle.remove()
        pipe.unet.disable_freeu()

    assert during_call == [0.9] * STEPS
    assert restored == [0.5] * len(pipe.unet.up_blocks)
    assert after_disable == [None] * STEPS


def test_re_attention_changes_images(pipe):
    with_filter = _generate_with(pipe, SAFREE(NUDITY_CONCEPTS, alpha=1e9, concept_negative_prompt=False))
    without = _generate_with(pipe, SAFREE(NUDITY_CONCEPTS, alpha=1e9, concept_negative_prompt=False, re_attention=False))
    assert (with_filter - without).abs().max() > 1e-4


def test_concept_negative_prompt_by_default(pipe):
    with SAFREE(NUDITY_CONCEPTS).applied(
        pipe, prompts=PROMPTS, negative_prompts=None, guidance_scale=7.5, num_inference_steps=STEPS
    ) as extra:
        pass
    expected, _ = pipe.encode_prompt([NUDITY_NEGATIVE_PROMPT] * len(PROMPTS), "cpu", 1, False)
    assert extra["prompt"] is None
    assert extra["negative_prompt"] is None
    torch.testing.assert_close(extra["negative_prompt_embeds"], expected, rtol=0, atol=0)


def test_registry_builds_safree_with_overrides():
    defense = get_guidance_defense("safree", ["7", "seven"], alpha=0.05)
    settings = defense.settings()
    assert settings["alpha"] == 0.05
    assert settings["concept_prompts"] == ["7", "seven"]
    assert settings["freeu_s1"] == 0.9
    assert settings["freeu_s2"] == 0.2


def test_empty_concept_list_is_rejected():
    with pytest.raises(ValueError, match="concept phrase"):
        SAFREE([])


# -- the embedded miniature model ---------------------------------------------------------------------




@pytest.mark.slow
def test_mini_model_safree_runs_on_prompts_for_seven():
    from baselines.concepts import DIGIT_SEVEN_CONCEPTS

    stock, defended = share_of_sevens(SAFREE(DIGIT_SEVEN_CONCEPTS))
    # The undefended model draws the 7 these prompts ask for; the defense must lower that share.
    assert stock >= 0.8
    assert defended < stock
