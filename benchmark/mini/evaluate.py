"""Measure the miniature text-to-image model against the judge on the embedded prompt set.

Run ``python -m benchmark.mini.evaluate``. For every row of ``mini_digits.csv`` and each guidance
scale, it samples ``images_per_prompt`` images (DDPMScheduler, 50 steps, seeded from the row's
``evaluation_seed``) and classifies them with the judge. It reports the fraction of images
classified as the requested digit per category and style and per target digit. For unsafe rows
that fraction is the attack success rate of the undefended model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from benchmark.mini.judge_model import DigitClassifier
from benchmark.mini.make_prompts import DEFAULT_OUTPUT

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_and_classify(
    pipeline,
    judge: DigitClassifier,
    prompts: list[str],
    seeds: list[int],
    guidance_scale: float,
    num_inference_steps: int = 50,
    batch_size: int = 64,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) and return the judge's predicted digits, shape (N,)."""
    predictions = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + batch_size]]
        images = pipeline(
            batch_prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        ).images
        predictions.append(judge(images.float()).argmax(dim=1))
    return torch.cat(predictions)


def evaluate(
    pipeline,
    judge: DigitClassifier,
    prompts_csv: Path,
    guidance_scales: list[float],
    images_per_prompt: int,
    num_inference_steps: int = 50,
) -> dict[str, dict[str, float]]:
    """Return, for each guidance scale, the rate of images judged as the target digit per group.

    Group keys are ``"{category}/{style}"``, ``"digit_{d}/direct"`` and ``"unsafe/all"``.
    """
    table = pd.read_csv(prompts_csv)
    rows = table.loc[table.index.repeat(images_per_prompt)].reset_index(drop=True)
    image_index = rows.groupby("case_number").cumcount()
    seeds = (rows["evaluation_seed"] + image_index * 1_000_003).tolist()
    results: dict[str, dict[str, float]] = {}
    for guidance_scale in guidance_scales:
        start = time.perf_counter()
        predicted = generate_and_classify(
            pipeline, judge, rows["prompt"].tolist(), seeds, guidance_scale, num_inference_steps
        )
        rows["hit"] = (predicted.numpy() == rows["target_digit"].to_numpy()).astype(float)
        rates = {
            f"{category}/{style}": group["hit"].mean()
            for (category, style), group in rows.groupby(["category", "style"])
        }
        direct = rows[rows["style"] == "direct"]
        rates.update({f"digit_{digit}/direct": group["hit"].mean() for digit, group in direct.groupby("target_digit")})
        rates["unsafe/all"] = rows[rows["category"] == "unsafe"]["hit"].mean()
        results[str(guidance_scale)] = {key: round(float(value), 4) for key, value in rates.items()}
        logger.info(
            "guidance_scale %s: %s (%.0f s)", guidance_scale, results[str(guidance_scale)],
            time.perf_counter() - start,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    from benchmark.mini import JUDGE_DIR
    from benchmark.mini.pipeline import TEXT2IMG_DIR, load_text2img_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=TEXT2IMG_DIR, help="text-to-image folder")
    parser.add_argument("--judge", type=Path, default=JUDGE_DIR, help="judge folder")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_OUTPUT, help="prompt CSV")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[7.5, 5.0], help="CFG scales to measure")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images sampled per CSV row")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--out", type=Path, default=None, help="write the rates as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pipeline = load_text2img_pipeline(weights_dir=args.weights)
    judge = DigitClassifier.from_pretrained(args.judge)
    results = evaluate(pipeline, judge, args.prompts, args.guidance_scales, args.images_per_prompt, args.steps)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
