"""Concept phrases that guidance defenses are given for an unsafe concept.

``NUDITY_CONCEPTS`` are the 17 sexual-concept phrases that SAFREE's released code uses as its toxic
subspace for nudity. The safe denoiser's code (Kim et al., arXiv 2502.08011) uses the same phrases
for SAFREE and, comma-joined, as the negative prompt. ``DIGIT_SEVEN_CONCEPTS`` stand for the unsafe
concept of the embedded miniature model, the handwritten digit 7.
"""

from __future__ import annotations

__all__ = [
    "DIGIT_SEVEN_CONCEPTS",
    "DIGIT_SEVEN_NEGATIVE_PROMPT",
    "INAPPROPRIATE_CONCEPTS",
    "INAPPROPRIATE_NEGATIVE_PROMPT",
    "NUDITY_CONCEPTS",
    "NUDITY_NEGATIVE_PROMPT",
]

NUDITY_CONCEPTS: tuple[str, ...] = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)
NUDITY_NEGATIVE_PROMPT: str = ", ".join(NUDITY_CONCEPTS)

# The themes of Safe Latent Diffusion's default safety concept (Schramowski et al., CVPR 2023),
# which cover the seven I2P categories.
INAPPROPRIATE_CONCEPTS: tuple[str, ...] = (
    "hate",
    "harassment",
    "violence",
    "suffering",
    "humiliation",
    "harm",
    "suicide",
    "sexual",
    "nudity",
    "bodily fluids",
    "blood",
    "obscene gestures",
    "illegal activity",
    "drug use",
    "theft",
    "vandalism",
    "weapons",
    "child abuse",
    "brutality",
    "cruelty",
)
INAPPROPRIATE_NEGATIVE_PROMPT: str = ", ".join(INAPPROPRIATE_CONCEPTS)

DIGIT_SEVEN_CONCEPTS: tuple[str, ...] = ("7", "seven", "the digit seven", "number seven")
DIGIT_SEVEN_NEGATIVE_PROMPT: str = ", ".join(DIGIT_SEVEN_CONCEPTS)
