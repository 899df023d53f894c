"""SLD as a UNet hook: the guidance equation, its presets, and the pipeline it leaves behind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

from baselines.concepts import NUDITY_CONCEPTS
from baselines.guidance import GUIDANCE_DEFENSES, get_guidance_defense
from baselines.sld import DEFAULT_SAFETY_CONCEPT, SLD, SLD_PRESETS, SLDConfig, sld_safety_guidance
from mini_defense import share_of_sevens
from tiny_models import tiny_sd_pipeline

PROMPTS = ["a photo of a nude person on a beach", "a red bicycle"]
SEEDS = [3, 4]
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


def _generate(pipe, extra=None, guidance_scale=7.5):
    kwargs = {
        "prompt": PROMPTS,
        "num_inference_steps": STEPS,
        "guidance_scale": guidance_scale,
        "generator": [torch.Generator().manual_seed(seed) for seed in SEEDS],
        "output_type": "pt",
    }
    kwargs.update(extra or {})
    return pipe(**kwargs).images


def _generate_with(pipe, defense, guidance_scale=7.5):
    with defense.applied(
        pipe, prompts=PROMPTS, negative_prompts=None, guidance_scale=guidance_scale, num_inference_steps=STEPS
    ) as extra:
        return _generate(pipe, extra, guidance_scale)


# -- the equation on hand-made tensors -----------------------------------------------------------------


def _reference_sld(uncond, text, safety, config, steps):
    """SLD's guided noise difference per step, element by element in plain Python floats."""
    momentum = [0.0] * len(text)
    outputs = []
    for step in range(steps):
        guidance = []
        for index in range(len(text)):
            difference = text[index] - safety[index]
            scale = 0.0 if difference >= config.sld_threshold else min(abs(difference) * config.sld_guidance_scale, 1.0)
            term = scale * (safety[index] - uncond[index]) + config.sld_momentum_scale * momentum[index]
            momentum[index] = config.sld_mom_beta * momentum[index] + (1 - config.sld_mom_beta) * term
            noise_guidance = text[index] - uncond[index]
            if step >= config.sld_warmup_steps:
                noise_guidance -= term
            guidance.append(noise_guidance)
        outputs.append(guidance)
    return outputs


# Element 0: ε_c − ε_S = 0.5 ≥ λ, excluded. Element 1: |ε_c − ε_S| · s_S = 30, clamped to 1.
# Element 2: ε_c − ε_S = −0.002, scale 0.2. Element 3: ε_c − ε_S = 0.0005 < λ = 0.001, scale 0.05.
UNCOND = [0.1, -0.2, 0.3, 0.05]
TEXT = [0.6, -0.5, 0.25, 0.4]
SAFETY = [0.1, -0.2, 0.252, 0.3995]
HAND_CONFIG = SLDConfig(sld_warmup_steps=1, sld_guidance_scale=100, sld_threshold=0.001, sld_momentum_scale=0.5, sld_mom_beta=0.4)


def test_safety_guidance_function_matches_reference():
    expected = _reference_sld(UNCOND, TEXT, SAFETY, HAND_CONFIG, steps=3)
    uncond, text, safety = (torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 4) for values in (UNCOND, TEXT, SAFETY))
    momentum = None
    for step in range(3):
        guidance = sld_safety_guidance(uncond, text, safety, momentum, step, HAND_CONFIG)
        momentum = guidance.momentum
        noise_guidance = text - uncond - (guidance.term if guidance.applied else 0.0)
        assert guidance.applied == (step >= HAND_CONFIG.sld_warmup_steps)
        torch.testing.assert_close(noise_guidance.flatten(), torch.tensor(expected[step], dtype=torch.float64), rtol=0, atol=1e-12)
    scale = guidance.scale.flatten().tolist()
    assert scale[0] == 0.0
    assert scale[1] == 1.0
    assert scale[2] == pytest.approx(0.2)
    assert scale[3] == pytest.approx(0.05)


class _ScriptedUNet(torch.nn.Module):
    """A UNet stand-in whose prediction is chosen by the first entry of the text embedding.

    Embedding tag 0 returns ε_u, tag 1 returns ε_c, tag 2 returns ε_S (each (1, 1, 1, 4)).
    """

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(time_cond_proj_dim=None)
        self.device = torch.device("cpu")
        self.table = {0: UNCOND, 1: TEXT, 2: SAFETY}

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        rows = [self.table[int(tag)] for tag in encoder_hidden_states[:, 0, 0].tolist()]
        prediction = torch.tensor(rows, dtype=torch.float64).view(-1, 1, 1, 4)
        return UNet2DConditionOutput(sample=prediction) if return_dict else (prediction,)


def test_modified_cond_half_reproduces_sld_guidance():
    unet = _ScriptedUNet()
    pipeline = SimpleNamespace(
        unet=unet, encode_prompt=lambda *args, **kwargs: (torch.full((1, 3, 2), 2.0, dtype=torch.float64), None)
    )
    defense = SLD("medium", **{key: getattr(HAND_CONFIG, key) for key in SLDConfig.__dataclass_fields__})
    guidance_scale = 7.5
    expected = _reference_sld(UNCOND, TEXT, SAFETY, HAND_CONFIG, steps=3)
    hidden = torch.cat([torch.zeros(1, 3, 2), torch.ones(1, 3, 2)]).double()
    latents = torch.zeros(2, 1, 1, 4, dtype=torch.float64)

    with defense.applied(pipeline, prompts=["p"], negative_prompts=None, guidance_scale=guidance_scale, num_inference_steps=3):
        for step in range(3):
            output = unet(latents, 999 - step, encoder_hidden_states=hidden, return_dict=False)[0]
            noise_pred_uncond, noise_pred_text = output.chunk(2)
            guided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            reference = torch.tensor(UNCOND, dtype=torch.float64) + guidance_scale * torch.tensor(expected[step], dtype=torch.float64)
            torch.testing.assert_close(guided.flatten(), reference, rtol=0, atol=1e-12)

    assert [record.applied for record in defense.records] == [False, True, True]
    assert "forward" not in vars(unet)


# -- presets and settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_preset_matches_diffusers_safety_config(preset):
    published = getattr(SafetyConfig, preset.upper())
    assert SLD_PRESETS[preset] == SLDConfig(**published)


def test_registry_builds_every_sld_preset():
    for name in GUIDANCE_DEFENSES:
        if not name.startswith("sld-"):
            continue
        defense = get_guidance_defense(name, NUDITY_CONCEPTS)
        assert defense.name == name
        assert defense.settings()["safety_concept"] == DEFAULT_SAFETY_CONCEPT


def test_overrides_replace_preset_values():
    defense = get_guidance_defense("sld-medium", NUDITY_CONCEPTS, sld_warmup_steps=3, safety_concept="nudity")
    settings = defense.settings()
    assert settings["sld_warmup_steps"] == 3
    assert settings["sld_guidance_scale"] == SLD_PRESETS["medium"].sld_guidance_scale
    assert settings["safety_concept"] == "nudity"


def test_unknown_setting_is_rejected():
    with pytest.raises(TypeError, match="sld_warmup"):
        get_guidance_defense("sld-weak", NUDITY_CONCEPTS, warmup=3)


def test_unknown_defense_name_is_rejected():
    with pytest.raises(KeyError, match="sld-ultra"):
        get_guidance_defense("sld-ultra", NUDITY_CONCEPTS)


# -- on a real pipeline ---------------------------------------------------------------------------------


def test_zero_safety_scale_matches_stock_pipeline(pipe):
    stock = _generate(pipe)
    defense = SLD("max", sld_guidance_scale=0.0)
    defended = _generate_with(pipe, defense)
    assert len(defense.records) == STEPS
    assert all(record.applied for record in defense.records)
    torch.testing.assert_close(defended, stock, rtol=0, atol=0)


def test_max_preset_differs_from_weak(pipe):
    weak = _generate_with(pipe, SLD("weak"))
    strongest = _generate_with(pipe, SLD("max"))
    assert SLD("max").settings() != SLD("weak").settings()
    assert (strongest - weak).abs().max() > 1e-3


def test_guidance_scale_one_leaves_pipeline_unchanged(pipe):
    stock = _generate(pipe, guidance_scale=1.0)
    defense = SLD("max")
    defended = _generate_with(pipe, defense, guidance_scale=1.0)
    assert defense.records == []
    torch.testing.assert_close(defended, stock, rtol=0, atol=0)


def test_unet_forward_restored_after_exception(pipe):
    class_forward = type(pipe.unet).forward
    with pytest.raises(ValueError, match="interrupted"):
        with SLD("medium").applied(pipe, prompts=PROMPTS, negative_prompts=None, guidance_scale=7.5, num_inference_steps=STEPS):
            assert "forward" in vars(pipe.unet)
            raise ValueError("interrupted")
    assert "forward" not in vars(pipe.unet)
    assert pipe.unet.forward.__func__ is class_forward


# -- the embedded miniature model ---------------------------------------------------------------------




@pytest.mark.slow
def test_mini_model_sld_runs_on_prompts_for_seven():
    from baselines.concepts import DIGIT_SEVEN_NEGATIVE_PROMPT

    stock, defended = share_of_sevens(SLD("medium", safety_concept=DIGIT_SEVEN_NEGATIVE_PROMPT))
    # The undefended model draws the 7 these prompts ask for; the defense must lower that share.
    assert stock >= 0.8
    assert defended < stock
