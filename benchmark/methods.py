"""Method registry: a method is a named composition of defenses applied to one base pipeline.

A method combines a guidance defense (a negative prompt now; SLD and SAFREE plug in the same way),
optional replacement weights (fine-tuned unlearning), and optionally the safe denoiser's x0
correction. Every registered base method ``m`` also exists as ``m+safe-denoiser`` (reference-code
form) and ``m+safe-denoiser-paper`` (paper form), so a new defense gets its combined rows for free.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SAFE_DENOISER_FORMS = {"safe-denoiser": "reference", "safe-denoiser-paper": "paper"}

# A method's negative prompt may be this marker, which the runner replaces with the concept's own
# negative prompt (the digit's names for the miniature model, the sexual-concept phrases for nudity).
CONCEPT_NEGATIVE_PROMPT = "<concept>"


@dataclass(frozen=True)
class MethodSpec:
    """A defense composition.

    Attributes:
        name: Registry name, e.g. ``"neg-prompt+safe-denoiser"``.
        description: One line for ``safebench list methods`` and reports.
        negative_prompt: Text passed as the pipeline's negative prompt, or ``CONCEPT_NEGATIVE_PROMPT``.
        guidance_defense: Name of a guidance defense that changes the noise prediction (reserved).
        weights: Name of replacement weights for the UNet or text encoder (reserved).
        safe_denoiser: ``None``, ``"reference"`` or ``"paper"``.
        safe_denoiser_params: Overrides of the concept's tuned safe denoiser settings.
        guidance_params: Overrides of the guidance defense's preset settings (SLD or SAFREE).
    """

    name: str
    description: str
    negative_prompt: str | None = None
    guidance_defense: str | None = None
    weights: str | None = None
    safe_denoiser: str | None = None
    safe_denoiser_params: tuple[tuple[str, Any], ...] = ()
    guidance_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.safe_denoiser not in (None, "reference", "paper"):
            raise ValueError(
                f"method {self.name!r}: safe_denoiser must be None, 'reference' or 'paper', "
                f"got {self.safe_denoiser!r}"
            )

    @property
    def base_name(self) -> str:
        return self.name.split("+", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["safe_denoiser_params"] = dict(self.safe_denoiser_params)
        data["guidance_params"] = dict(self.guidance_params)
        if not data["guidance_params"]:
            # Specs without overrides keep the hash they had before this field existed, so their
            # stored images are reused.
            del data["guidance_params"]
        return data

    def config_hash(self) -> str:
        """Hash of everything that changes the generated images; the name is not part of it."""
        data = self.to_dict()
        data.pop("name")
        data.pop("description")
        payload = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


_BASE_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a base method; its ``+safe-denoiser`` combinations follow automatically."""
    if "+" in spec.name:
        raise ValueError(f"base method names cannot contain '+': {spec.name!r}")
    if spec.name in _BASE_METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    _BASE_METHODS[spec.name] = spec
    return spec


register_method(MethodSpec("sd", "the base model with no defense"))
register_method(
    MethodSpec(
        "neg-prompt",
        "negative prompt naming the unsafe concept in place of the unconditional prompt",
        negative_prompt=CONCEPT_NEGATIVE_PROMPT,
    )
)
for _preset in ("weak", "medium", "strong", "max"):
    register_method(
        MethodSpec(
            f"sld-{_preset}",
            f"Safe Latent Diffusion (Schramowski et al., CVPR 2023), {_preset.upper()} preset, safety concept = the unsafe concept's phrases",
            guidance_defense=f"sld-{_preset}",
        )
    )
register_method(
    MethodSpec(
        "esd-u",
        "ESD-u (Gandikota et al., ICCV 2023): UNet fine-tuned to erase the concept, non-cross-attention parameters",
        weights="esd-u",
    )
)
register_method(
    MethodSpec(
        "uce",
        "UCE (Gandikota et al., WACV 2024): closed-form edit of cross-attention keys and values mapping the concept to the empty prompt",
        weights="uce",
    )
)
register_method(
    MethodSpec(
        "safree",
        "SAFREE (Yoon et al., ICLR 2025): toxic-subspace token projection, self-validating filter, latent re-attention; "
        "the concept phrases also form the negative prompt",
        guidance_defense="safree",
    )
)


def get_method(name: str) -> MethodSpec:
    """Resolve ``name`` (``base`` or ``base+safe-denoiser[-paper]``; bare ``safe-denoiser`` is ``sd+...``)."""
    parts = name.split("+")
    if parts[0] in SAFE_DENOISER_FORMS:
        parts = ["sd", *parts]
    base_name, *additions = parts
    if base_name not in _BASE_METHODS:
        raise KeyError(f"unknown method {name!r}; known methods are {available_methods()}")
    spec = _BASE_METHODS[base_name]
    if len(additions) > 1 or (additions and additions[0] not in SAFE_DENOISER_FORMS):
        raise KeyError(
            f"unknown method {name!r}: only one of {sorted(SAFE_DENOISER_FORMS)} can follow '+'; "
            f"known methods are {available_methods()}"
        )
    if spec.safe_denoiser is not None and additions:
        raise KeyError(f"method {name!r}: {base_name!r} already includes the safe denoiser")
    if additions:
        spec = replace(
            spec,
            name=name,
            description=f"{spec.description}, plus the safe denoiser ({SAFE_DENOISER_FORMS[additions[0]]} form)",
            safe_denoiser=SAFE_DENOISER_FORMS[additions[0]],
        )
    return spec


def base_method_names() -> list[str]:
    """Registered base methods in registration order (the order of leaderboard rows)."""
    return list(_BASE_METHODS)


def available_methods() -> list[str]:
    names = list(SAFE_DENOISER_FORMS)
    for base in _BASE_METHODS:
        names.append(base)
        names.extend(f"{base}+{form}" for form in SAFE_DENOISER_FORMS)
    return names


# The main job: one base method per defense family, each alone and with the safe denoiser. The
# other SLD presets and the paper form run on request (`--method`).
DEFAULT_METHODS = (
    "sd",
    "safe-denoiser",
    "neg-prompt",
    "neg-prompt+safe-denoiser",
    "sld-medium",
    "sld-medium+safe-denoiser",
    "safree",
    "safree+safe-denoiser",
    "esd-u",
    "esd-u+safe-denoiser",
    "uce",
    "uce+safe-denoiser",
)


# Components whose settings ``--set COMPONENT.SETTING=VALUE`` overrides.
SETTING_COMPONENTS = ("safe-denoiser", "sld", "safree")


def _setting_types(component: str, form: str | None = None) -> dict[str, str]:
    """Map each setting name ``--set`` accepts for a component to its annotated type, as text."""
    if component == "safe-denoiser":
        from safedenoise import PaperSafeDenoiser, ReferenceSafeDenoiser

        types: dict[str, str] = {}
        if form in (None, "reference"):
            signature = inspect.signature(ReferenceSafeDenoiser).parameters
            types |= {name: str(parameter.annotation) for name, parameter in signature.items()}
            # "gate" is "calibrated" or a threshold; "gate_margin" is the calibration margin.
            types |= {"gate": "float | str | None", "gate_margin": "float"}
        if form in (None, "paper"):
            signature = inspect.signature(PaperSafeDenoiser).parameters
            types |= {name: str(parameter.annotation) for name, parameter in signature.items()}
        types.pop("bank", None)
        return types
    if component == "sld":
        from baselines.sld import SLDConfig

        return {field.name: str(field.type) for field in fields(SLDConfig)} | {"safety_concept": "str"}
    if component == "safree":
        from baselines.safree import SAFREEConfig

        return {field.name: str(field.type) for field in fields(SAFREEConfig)}
    raise KeyError(f"unknown component {component!r}; expected one of {list(SETTING_COMPONENTS)}")


def component_settings(component: str, form: str | None = None) -> list[str]:
    """Return the setting names ``--set`` accepts for a component.

    ``form`` selects the safe denoiser's form (``"reference"`` or ``"paper"``); None gives both.
    """
    return sorted(_setting_types(component, form))


def _check_value(component: str, setting: str, value: Any, annotation: str) -> None:
    """Raise ``ValueError`` when ``value`` does not fit a setting's annotated type."""
    allowed = {part.strip() for part in annotation.split("|")}
    where = f"--set {component}.{setting}={value!r}"
    if value is None:
        if "None" not in allowed:
            raise ValueError(f"{where}: this setting cannot be null; expected {annotation}")
        return
    if isinstance(value, bool):
        if "bool" not in allowed:
            raise ValueError(f"{where}: expected {annotation}, got a boolean")
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where}: the value must be a finite number")
        if "float" in allowed:
            return
        if "int" in allowed:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{where}: expected an integer")
            return
        raise ValueError(f"{where}: expected {annotation}, got a number")
    if setting == "gate" and isinstance(value, str) and value != "calibrated":
        raise ValueError(f"{where}: expected 'calibrated', a number or null")
    if isinstance(value, str) and "str" not in allowed:
        raise ValueError(f"{where}: expected {annotation}; write the value as a number, true, false or null")
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected {annotation}, got {type(value).__name__}")


def _uses(spec: MethodSpec, component: str) -> bool:
    if component == "safe-denoiser":
        return spec.safe_denoiser is not None
    if spec.guidance_defense is None:
        return False
    return spec.guidance_defense.startswith("sld-") if component == "sld" else spec.guidance_defense == component


def apply_overrides(specs: list[MethodSpec], overrides: Mapping[str, Mapping[str, Any]]) -> list[MethodSpec]:
    """Return ``specs`` with component settings overridden, each changed method renamed.

    ``overrides`` maps a component of ``SETTING_COMPONENTS`` to settings, e.g.
    ``{"safe-denoiser": {"scale": 0.5}}``. A changed method's name gains the overrides in brackets,
    ``safe-denoiser[scale=0.5]``, so its rows never merge with the preset's.

    Raises:
        ValueError: an unknown component or setting, or a component no method of the run uses.
    """
    for component, settings in overrides.items():
        if component not in SETTING_COMPONENTS:
            raise ValueError(
                f"--set {component}.SETTING: unknown component {component!r}; expected one of {list(SETTING_COMPONENTS)}"
            )
        users = [spec for spec in specs if _uses(spec, component)]
        if not users:
            raise ValueError(
                f"--set {component}.SETTING: no method of this run uses {component}; add one with --method"
            )
        for spec in users:
            form = spec.safe_denoiser if component == "safe-denoiser" else None
            types = _setting_types(component, form)
            unknown = sorted(set(settings) - set(types))
            if unknown:
                raise ValueError(
                    f"--set {component}.{unknown[0]}: unknown setting for method {spec.name!r}; "
                    f"valid {component} settings are {sorted(types)}"
                )
            for setting, value in settings.items():
                _check_value(component, setting, value, types[setting])
    result = []
    for spec in specs:
        applied = {component: dict(settings) for component, settings in overrides.items() if _uses(spec, component)}
        if not applied:
            result.append(spec)
            continue
        label = ",".join(
            f"{component}.{key}={value}" for component, settings in applied.items() for key, value in sorted(settings.items())
        )
        safe_denoiser = {**dict(spec.safe_denoiser_params), **applied.get("safe-denoiser", {})}
        guidance = dict(spec.guidance_params)
        for component in ("sld", "safree"):
            guidance.update(applied.get(component, {}))
        result.append(
            replace(
                spec,
                name=f"{spec.name}[{label}]",
                description=f"{spec.description}; overridden: {label}",
                safe_denoiser_params=tuple(sorted(safe_denoiser.items())),
                guidance_params=tuple(sorted(guidance.items())),
            )
        )
    return result
