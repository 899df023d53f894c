"""Unsafe concepts: what a defense must avoid, per base model.

A concept bundles the text a guidance defense uses (the negative prompt), the negation set the safe
denoiser pushes away from, and the safe denoiser settings tuned for it. The miniature model's
concept is the digit 7; its settings were chosen on the ``mini-dev`` prompts only (see
``benchmark/mini/TUNING.md``), never on the reported ``mini`` split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import baselines
from baselines.sld import DEFAULT_SAFETY_CONCEPT
from baselines.concepts import (
    DIGIT_SEVEN_CONCEPTS,
    DIGIT_SEVEN_NEGATIVE_PROMPT,
    NUDITY_CONCEPTS,
    NUDITY_NEGATIVE_PROMPT,
    INAPPROPRIATE_CONCEPTS,
    INAPPROPRIATE_NEGATIVE_PROMPT,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    """An unsafe concept and the defense inputs that stand for it."""

    name: str
    negative_prompt: str
    concept_prompts: tuple[str, ...]
    # (pipeline, cache_dir, images_dir or None) -> NegationBank.
    build_negation_bank: Callable[[Any, Path, Path | None], Any] = field(repr=False)
    # Whether the negation set must come from the user (no images ship for this concept).
    needs_negation_images: bool = False
    safe_denoiser_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Per-model replacements of safe_denoiser_settings, keyed by model kind, then by form.
    safe_denoiser_settings_by_model: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    # Replacement UNet folders of fine-tuned unlearning methods for this concept's model, by method.
    unlearned_weights: Mapping[str, Path] = field(default_factory=dict)
    # Concepts UCE maps to the empty prompt.
    uce_erase: tuple[str, ...] = ()
    # SLD's safety concept text; None joins concept_prompts with commas.
    sld_safety_concept: str | None = None
    description: str = ""


def _mini_digit_bank(pipeline: Any, cache_dir: Path, images_dir: Path | None = None):
    """Encode the training images of the unsafe digit with the miniature model's own VAE.

    A user folder (``images_dir``) replaces the shipped digits when given.
    """
    from benchmark.mini import UNSAFE_DIGIT, load_digits
    from safedenoise import NegationBank

    if images_dir is not None:
        return NegationBank.from_vae(images_dir, pipeline.vae, image_size=32, cache_dir=cache_dir)
    images, labels = load_digits("train")
    unsafe = images[labels == UNSAFE_DIGIT] * 2.0 - 1.0
    return NegationBank.from_vae(
        unsafe,
        pipeline.vae,
        source=f"sklearn-digits train split, digit {UNSAFE_DIGIT}",
        cache_dir=cache_dir,
    )


MINI_DIGIT_7 = Concept(
    name="digit-7",
    negative_prompt=DIGIT_SEVEN_NEGATIVE_PROMPT,
    concept_prompts=DIGIT_SEVEN_CONCEPTS,
    build_negation_bank=_mini_digit_bank,
    # Tuned on mini-dev; the values and the sweep that chose them are in benchmark/mini/TUNING.md.
    safe_denoiser_settings={
        "reference": {"bandwidth": 2.0, "scale": 1.0, "t_min": 300, "gate": None},
        "paper": {"log_eta": 370.0, "t_min": 500, "max_weight": 5.0, "log_beta_threshold": None},
    },
    # The text-to-image setting wrecks the other digits of the prompt-less models (scale 1.0 turns most
    # unconditional samples into 1s); scale 0.5 keeps them. Chosen from a sweep on seeds outside the
    # mini-class and mini-uncond suites (see the model cards in benchmark/mini/weights/classcond, uncond).
    safe_denoiser_settings_by_model={
        "mini-class": {"reference": {"bandwidth": 2.0, "scale": 0.5, "t_min": 300, "gate": None}},
        "mini-uncond": {"reference": {"bandwidth": 2.0, "scale": 0.5, "t_min": 300, "gate": None}},
    },
    unlearned_weights={"esd-u": Path(baselines.__file__).resolve().parent / "weights" / "mini-esd-u"},
    uce_erase=("7",),
    description="the handwritten digit 7, standing in for an unsafe concept in the embedded model",
)

def _folder_bank(pipeline: Any, cache_dir: Path, images_dir: Path | None):
    """Encode a user folder of unwanted images the way the safe denoiser's released code does.

    Images are resized to the model's resolution and encoded with the pipeline's VAE (a posterior
    sample times the scaling factor). Every spatial position's latent vector is then scaled to
    unit L2 norm, and at most 3,200 images are kept.
    """
    from safedenoise import NegationBank

    if images_dir is None:
        raise ValueError("this concept's negation set is user-supplied: pass --negation-images DIR")
    resolution = int(pipeline.unet.config.sample_size) * int(getattr(pipeline, "vae_scale_factor", 8))
    return NegationBank.from_vae(
        images_dir,
        pipeline.vae,
        image_size=resolution,
        normalisation="channel_l2",
        max_size=3200,
        cache_dir=cache_dir,
    )


# Settings of the safe denoiser's released code for nudity on Stable Diffusion v1.4: kernel
# bandwidth 3.15, scale 0.33, window t >= 780 (11 of 50 DDPM steps), gate calibrated on the
# negation set with a margin of 1.6. Its 515 negation images were SD-v1.4 generations of I2P
# "sexual" prompts; they are not distributed, so the user supplies a folder.
NUDITY = Concept(
    name="nudity",
    negative_prompt=NUDITY_NEGATIVE_PROMPT,
    concept_prompts=NUDITY_CONCEPTS,
    build_negation_bank=_folder_bank,
    needs_negation_images=True,
    safe_denoiser_settings={
        "reference": {"bandwidth": 3.15, "scale": 0.33, "t_min": 780, "gate": "calibrated", "gate_margin": 1.6},
        "paper": {"log_eta": 0.0, "t_min": 780, "max_weight": 5.0, "log_beta_threshold": None},
    },
    uce_erase=("nudity",),
    description="nudity and sexual content, the concept of the safe denoiser paper's main experiments",
)

# Every I2P category at once, as SLD's default safety concept lists them. The safe denoiser's
# released code ran this setting (CoPro) with 3,000 negation images over all I2P categories, kernel
# bandwidth 3.55, scale 0.03, window t >= 800 and no gate.
# NOTE: that code never passed its configured bandwidth on this path, so its published CoPro
# numbers used a bandwidth of 1.0. The configured 3.55 is used here.
INAPPROPRIATE = Concept(
    name="inappropriate",
    negative_prompt=INAPPROPRIATE_NEGATIVE_PROMPT,
    concept_prompts=INAPPROPRIATE_CONCEPTS,
    build_negation_bank=_folder_bank,
    needs_negation_images=True,
    safe_denoiser_settings={
        "reference": {"bandwidth": 3.55, "scale": 0.03, "t_min": 800},
        "paper": {"log_eta": 0.0, "t_min": 800, "max_weight": 5.0, "log_beta_threshold": None},
    },
    uce_erase=INAPPROPRIATE_CONCEPTS,
    sld_safety_concept=DEFAULT_SAFETY_CONCEPT,
    description="inappropriate content of every I2P category, in the words of SLD's default safety concept",
)


def _no_bank(pipeline: Any, cache_dir: Path, images_dir: Path | None):
    raise ValueError("no unsafe concept was given, so no negation set exists; pass --concept")


# The concept of runs whose methods use none (the undefended model alone).
NO_CONCEPT = Concept(
    name="none",
    negative_prompt="",
    concept_prompts=(),
    build_negation_bank=_no_bank,
    description="no concept: every method of the run is undefended",
)

CONCEPTS: dict[str, Concept] = {concept.name: concept for concept in (MINI_DIGIT_7, NUDITY, INAPPROPRIATE)}


def get_concept(name: str) -> Concept:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise KeyError(f"unknown concept {name!r}; known concepts are {sorted(CONCEPTS)}") from None
