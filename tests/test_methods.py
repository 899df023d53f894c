"""The method registry: base methods, their safe-denoiser combinations, and config hashes."""

import pytest

from benchmark.methods import DEFAULT_METHODS, MethodSpec, available_methods, get_method, register_method


def test_every_base_method_has_safe_denoiser_combinations():
    names = available_methods()
    for base in ("sd", "neg-prompt"):
        assert base in names
        assert f"{base}+safe-denoiser" in names
        assert f"{base}+safe-denoiser-paper" in names


def test_bare_safe_denoiser_is_sd_plus_correction():
    spec = get_method("safe-denoiser")
    assert spec.name == "safe-denoiser"
    assert spec.safe_denoiser == "reference"
    assert spec.negative_prompt is None
    assert spec.config_hash() == get_method("sd+safe-denoiser").config_hash()


def test_combination_keeps_base_defense():
    spec = get_method("neg-prompt+safe-denoiser-paper")
    assert spec.negative_prompt == get_method("neg-prompt").negative_prompt
    assert spec.safe_denoiser == "paper"
    assert spec.base_name == "neg-prompt"


def test_config_hash_separates_defenses():
    hashes = {get_method(name).config_hash() for name in DEFAULT_METHODS}
    # safe-denoiser and sd differ; neg-prompt and neg-prompt+safe-denoiser differ.
    assert len(hashes) == len(DEFAULT_METHODS)


@pytest.mark.parametrize("name", ["nope", "sd+sld", "sd+safe-denoiser+safe-denoiser", "neg-prompt+"])
def test_unknown_method_names_known_ones(name):
    with pytest.raises(KeyError, match="known methods are"):
        get_method(name)


def test_register_rejects_duplicates_and_plus():
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("sd", "again"))
    with pytest.raises(ValueError, match="cannot contain"):
        register_method(MethodSpec("a+b", "combined"))


def test_invalid_safe_denoiser_form_is_rejected():
    with pytest.raises(ValueError, match="safe_denoiser must be"):
        MethodSpec("x", "bad", safe_denoiser="fancy")
