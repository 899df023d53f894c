"""Train the miniature ``AutoencoderKL`` (32×32×3 images ↔ 8×8×4 latents) on the digits.

Run ``python -m benchmark.mini.train_vae --out DIR``; the defaults are the settings that produced
the shipped ``weights/text2img/vae``. The loss is the per-pixel mean squared error of the
reconstruction (images in [-1, 1]) plus ``kl_weight`` times the mean per-element KL divergence of
the posterior from N(0, I). After training, ``scaling_factor`` is set to 1 / std of the posterior
samples on the train split, so scaled latents have unit standard deviation, as in Stable Diffusion.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from benchmark.mini.data import IMAGE_SIZE, augment_digits, load_digits
from benchmark.mini.training import warmup_cosine_schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig:
    """Settings of one VAE training run."""

    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    kl_weight: float = 1e-4
    seed: int = 0


def build_vae() -> AutoencoderKL:
    """Build the untrained miniature VAE: 3 blocks (32/64/64 channels), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def measure_latent_std(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> float:
    """Return the standard deviation of unscaled posterior samples for ``images`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with torch.no_grad():
        for batch in images.split(256):
            posterior = vae.encode(batch * 2 - 1).latent_dist
            samples.append(posterior.sample(generator=generator))
    return torch.cat(samples).std().item()


def train_vae(config: VAETrainConfig, out_dir: Path) -> dict[str, float]:
    """Train the VAE, save it in diffusers format under ``out_dir`` and return its metrics.

    Metrics: ``final_loss`` (mean of the last 100 steps), ``val_mse`` (per-pixel MSE in [0, 1]
    units of the reconstruction from the posterior mean on the val split), ``latent_std`` and
    ``scaling_factor``, ``wall_time_s``.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_images, _ = load_digits("train")
    val_images, _ = load_digits("val")
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    scheduler = warmup_cosine_schedule(optimizer, config.steps)
    logger.info("VAE: %d parameters, %d steps", sum(p.numel() for p in vae.parameters()), config.steps)

    start = time.perf_counter()
    recent_losses: list[float] = []
    vae.train()
    for step in range(config.steps):
        index = torch.randint(len(train_images), (config.batch_size,), generator=generator)
        batch = augment_digits(train_images[index], generator) * 2 - 1
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        reconstruction = vae.decode(latents).sample
        reconstruction_loss = torch.nn.functional.mse_loss(reconstruction, batch)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = reconstruction_loss + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent_losses = (recent_losses + [loss.item()])[-100:]
        if step % 100 == 0 or step == config.steps - 1:
            logger.info(
                "step %d/%d loss %.5f (mse %.5f, kl %.3f) %.0f s",
                step + 1, config.steps, loss.item(), reconstruction_loss.item(), kl.item(),
                time.perf_counter() - start,
            )
    wall_time = time.perf_counter() - start

    vae.eval()
    latent_std = measure_latent_std(vae, train_images, config.seed)
    scaling_factor = 1.0 / latent_std
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(val_images * 2 - 1).latent_dist.mean).sample
        val_mse = torch.nn.functional.mse_loss((decoded / 2 + 0.5).clamp(0, 1), val_images).item()

    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)
    metrics = {
        "final_loss": sum(recent_losses) / max(len(recent_losses), 1),
        "val_mse": val_mse,
        "latent_std": latent_std,
        "scaling_factor": scaling_factor,
        "wall_time_s": wall_time,
    }
    (out_dir / "training_metrics.json").write_text(
        json.dumps({"config": asdict(config), "metrics": metrics}, indent=2) + "\n"
    )
    logger.info("VAE saved to %s: %s", out_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    defaults = VAETrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (diffusers format)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="KL term weight")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = VAETrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        kl_weight=args.kl_weight, seed=args.seed,
    )
    train_vae(config, args.out)


if __name__ == "__main__":
    main()
