"""Train the judge ``DigitClassifier`` on the augmented train split of the digits.

Run ``python -m benchmark.mini.train_judge --out DIR``; the defaults are the settings that
produced the shipped ``weights/judge``. With ``--vae DIR`` the script also measures the accuracy on
the VAE's reconstructions of the val split (decoded posterior means).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmark.mini.data import augment_digits, load_digits
from benchmark.mini.judge_model import DigitClassifier
from benchmark.mini.training import warmup_cosine_schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeTrainConfig:
    """Settings of one judge training run."""

    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of ``images`` (N, 3, 32, 32) in [0, 1] classified as ``labels``."""
    model.eval()
    predictions = torch.cat([model(batch).argmax(dim=1) for batch in images.split(256)])
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def reconstruct_with_vae(vae_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """Return the VAE's reconstructions (decoded posterior means) of ``images`` in [0, 1]."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    decoded = [
        vae.decode(vae.encode(batch * 2 - 1).latent_dist.mean).sample for batch in images.split(256)
    ]
    return (torch.cat(decoded) / 2 + 0.5).clamp(0, 1)


def train_judge(config: JudgeTrainConfig, out_dir: Path, vae_dir: Path | None = None) -> dict[str, float]:
    """Train the judge, save it to ``out_dir`` and return ``val_accuracy`` and other metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_images, train_labels = load_digits("train")
    val_images, val_labels = load_digits("val")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    scheduler = warmup_cosine_schedule(optimizer, config.steps)

    start = time.perf_counter()
    recent_losses: list[float] = []
    for step in range(config.steps):
        model.train()
        index = torch.randint(len(train_images), (config.batch_size,), generator=generator)
        batch = augment_digits(train_images[index], generator)
        # Random contrast and pixel noise, meant to make the judge less sensitive to generated images.
        batch = (batch * (0.7 + 0.6 * torch.rand(len(batch), 1, 1, 1, generator=generator))).clamp(0, 1)
        batch = (batch + 0.05 * torch.randn(batch.shape, generator=generator)).clamp(0, 1)
        loss = F.cross_entropy(model(batch), train_labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent_losses = (recent_losses + [loss.item()])[-100:]
        if step % 200 == 0 or step == config.steps - 1:
            logger.info(
                "step %d/%d loss %.4f %.0f s", step + 1, config.steps, loss.item(), time.perf_counter() - start
            )
    wall_time = time.perf_counter() - start

    model.eval()
    metrics = {
        "final_loss": sum(recent_losses) / max(len(recent_losses), 1),
        "val_accuracy": accuracy(model, val_images, val_labels),
        "wall_time_s": wall_time,
    }
    if vae_dir is not None:
        reconstructions = reconstruct_with_vae(vae_dir, val_images)
        metrics["val_vae_reconstruction_accuracy"] = accuracy(model, reconstructions, val_labels)
    model.save_pretrained(out_dir)
    (out_dir / "training_metrics.json").write_text(
        json.dumps({"config": asdict(config), "metrics": metrics}, indent=2) + "\n"
    )
    logger.info("judge saved to %s: %s", out_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    defaults = JudgeTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument("--vae", type=Path, default=None, help="VAE folder whose reconstructions to score")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = JudgeTrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed
    )
    train_judge(config, args.out, args.vae)


if __name__ == "__main__":
    main()
