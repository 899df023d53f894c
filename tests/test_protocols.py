"""Protocol presets: validation, ids that name every pinned value, cards, and rule consistency."""

import dataclasses

import pytest

from benchmark.cli import main
from benchmark.judges import get_rule
from benchmark.protocols import MINI, PROTOCOLS, get_protocol


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_preset_rule_reads_its_judge(name):
    protocol = PROTOCOLS[name]
    assert protocol.judge in get_rule(protocol.rule).judges


def test_protocol_id_names_sampler_steps_guidance_judge_rule():
    protocol_id = MINI.protocol_id
    assert "mini-v1" in protocol_id
    assert "ddpm50" in protocol_id
    assert "cfg7.5" in protocol_id
    assert "mini-digit:mini-digit-7" in protocol_id
    assert "argmax=digit_7" in protocol_id


def test_changed_value_changes_id():
    assert dataclasses.replace(MINI, num_inference_steps=25).protocol_id != MINI.protocol_id
    assert dataclasses.replace(MINI, version=2).protocol_id != MINI.protocol_id


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sampler", "heun", "sampler 'heun'"),
        ("num_inference_steps", 0, "num_inference_steps"),
        ("images_per_prompt", 0, "images_per_prompt"),
        ("seed_rule", "random", "seed_rule"),
        ("dtype", "int8", "dtype"),
    ],
)
def test_invalid_values_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MINI, **{field: value})


def test_seed_rule():
    assert MINI.seed_for(100, 0) == 100
    assert MINI.seed_for(100, 3) == 103
    fixed = dataclasses.replace(MINI, seed_rule="fixed", fixed_seed=42)
    assert fixed.seed_for(100, 2) == 44


def test_unknown_protocol_lists_known():
    with pytest.raises(KeyError, match="known protocols"):
        get_protocol("nope")


def test_cli_prints_card(capsys):
    assert main(["protocol", "unlearndiff"]) == 0
    card = capsys.readouterr().out
    assert "lms, 50 steps" in card
    assert "> 0.45" in card
    assert "FEET_EXPOSED" in card


def test_cli_unknown_protocol_fails(capsys):
    assert main(["protocol", "nope"]) == 2
    assert "known protocols" in capsys.readouterr().err


def test_card_lists_every_judge_and_file():
    from benchmark.protocols import get_protocol

    card = get_protocol("i2p").card()
    assert "judge: q16 (the rule also reads: nudenet)" in card
    assert "$SAFEBENCH_Q16_CLIP" in card
    assert "nudenet: weights ship with its package" in card
    quality_card = get_protocol("safe-denoiser").card()
    assert "--inception-weights" in quality_card
    assert "$SAFEBENCH_NUDENET_V2" in quality_card


def test_cli_lists_concepts(capsys):
    from benchmark.cli import main

    assert main(["list", "concepts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["digit-7", "nudity", "inappropriate"]
    assert "--negation-images DIR needed" in lines[1]
