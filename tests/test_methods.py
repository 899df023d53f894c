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


def test_overrides_rename_only_methods_that_use_them():
    from benchmark.methods import apply_overrides

    specs = [get_method(name) for name in ("sd", "safe-denoiser", "sld-medium", "sld-medium+safe-denoiser")]
    result = apply_overrides(specs, {"safe-denoiser": {"scale": 0.5}, "sld": {"sld_guidance_scale": 2000}})
    names = [spec.name for spec in result]
    assert names == [
        "sd",
        "safe-denoiser[safe-denoiser.scale=0.5]",
        "sld-medium[sld.sld_guidance_scale=2000]",
        "sld-medium+safe-denoiser[safe-denoiser.scale=0.5,sld.sld_guidance_scale=2000]",
    ]
    assert result[0] is specs[0]
    assert dict(result[1].safe_denoiser_params) == {"scale": 0.5}
    assert dict(result[2].guidance_params) == {"sld_guidance_scale": 2000}
    assert result[1].config_hash() != specs[1].config_hash()


def test_method_without_overrides_keeps_its_hash():
    # Stored images are keyed by this hash; it must not change when a new field is empty.
    spec = get_method("sld-medium")
    assert spec.config_hash() == MethodSpec("other", "x", guidance_defense="sld-medium").config_hash()
    assert "guidance_params" not in spec.to_dict()


@pytest.mark.parametrize(
    ("methods", "overrides", "message"),
    [
        (("sd",), {"sld": {"sld_guidance_scale": 1}}, "no method of this run uses sld"),
        (("safe-denoiser-paper",), {"safe-denoiser": {"bandwidth": 2.0}}, "unknown setting for method 'safe-denoiser-paper'"),
        (("safree",), {"safree": {"alhpa": 0.1}}, r"safree\.alhpa: unknown setting.*'alpha'"),
        (("sd",), {"vae": {"scale": 1}}, "unknown component 'vae'"),
    ],
)
def test_bad_overrides_name_the_fix(methods, overrides, message):
    from benchmark.methods import apply_overrides

    with pytest.raises(ValueError, match=message):
        apply_overrides([get_method(name) for name in methods], overrides)
