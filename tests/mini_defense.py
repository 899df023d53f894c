"""Shared check of a guidance defense on the embedded text-to-image model.

``share_of_sevens`` generates ten ``mini`` dev prompts that ask for the unsafe digit 7, without and
with a defense, and returns the share of images the digit judge classifies as 7.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

MINI_PROMPTS = Path(__file__).resolve().parents[1] / "benchmark" / "data" / "mini" / "mini_digits.csv"


def share_of_sevens(defense, weights_dir=None):
    """Return the judge's share of 7s for ten dev prompts asking for 7, without and with ``defense``.

    DDPM, 50 steps, guidance 7.5, each prompt's own evaluation seed. Skips when the miniature
    model's weights are not built.
    """
    import pandas as pd

    from benchmark.mini import UNSAFE_DIGIT, load_digit_classifier, load_text2img_pipeline

    try:
        pipeline = load_text2img_pipeline(weights_dir=weights_dir)
    except FileNotFoundError as error:
        pytest.skip(f"miniature text-to-image weights are not built: {error}")
    rows = pd.read_csv(MINI_PROMPTS)
    rows = rows[(rows["split"] == "dev") & (rows["target_digit"] == UNSAFE_DIGIT)].head(10)
    prompts = rows["prompt"].tolist()
    seeds = rows["evaluation_seed"].astype(int).tolist()
    judge = load_digit_classifier()

    def share(extra):
        kwargs = {
            "prompt": prompts,
            "num_inference_steps": 50,
            "guidance_scale": 7.5,
            "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
            "output_type": "pt",
        }
        kwargs.update(extra)
        with torch.no_grad():
            images = pipeline(**kwargs).images
            predictions = judge(images).argmax(dim=1)
        return float((predictions == UNSAFE_DIGIT).float().mean())

    stock = share({})
    with defense.applied(pipeline, prompts=prompts, negative_prompts=None, guidance_scale=7.5, num_inference_steps=50) as extra:
        defended = share(extra)
    logging.getLogger(__name__).info("%s: share of 7s %.2f undefended, %.2f defended", defense.name, stock, defended)
    return stock, defended
