"""Unsafe concepts: what a defense is told to avoid, per base model.

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
from baselines.concepts import DIGIT_SEVEN_CONCEPTS, DIGIT_SEVEN_NEGATIVE_PROMPT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    """An unsafe concept and the defense inputs that stand for it."""

    name: str
    negative_prompt: str
    concept_prompts: tuple[str, ...]
    build_negation_bank: Callable[[Any, Path], Any] = field(repr=False)
    safe_denoiser_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Replacement UNet folders of fine-tuned unlearning methods for this concept's model, by method.
    unlearned_weights: Mapping[str, Path] = field(default_factory=dict)
    # Concepts UCE maps to the empty prompt.
    uce_erase: tuple[str, ...] = ()
    description: str = ""


def _mini_digit_bank(pipeline: Any, cache_dir: Path):
    """Encode the training images of the unsafe digit with the miniature model's own VAE."""
    from benchmark.mini import UNSAFE_DIGIT, load_digits
    from safedenoise import NegationBank

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
    unlearned_weights={"esd-u": Path(baselines.__file__).resolve().parent / "weights" / "mini-esd-u"},
    uce_erase=("7",),
    description="the handwritten digit 7, standing in for an unsafe concept in the embedded model",
)

CONCEPTS: dict[str, Concept] = {MINI_DIGIT_7.name: MINI_DIGIT_7}


def get_concept(name: str) -> Concept:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise KeyError(f"unknown concept {name!r}; known concepts are {sorted(CONCEPTS)}") from None
