"""Train the miniature class-conditional or unconditional UNet on VAE latents of the digits.

Run ``python -m benchmark.mini.train_classcond --out DIR`` for the class-conditional model or add
``--unconditional`` for the unconditional one; the defaults are the settings that produced the
shipped ``weights/classcond`` and ``weights/uncond``. The script writes a diffusers
``UNet2DModel`` folder (``config.json``, ``diffusion_pytorch_model.safetensors``), ``scheduler/``
and ``training_metrics.json`` to ``DIR``. The VAE is not copied: both models use the text-to-image
model's VAE (``weights/text2img/vae``) and its scaled 4×8×8 latents.

Training follows ``train_text2img``. The loss is epsilon-prediction MSE under Stable Diffusion's
DDPM noise schedule, and latents are sampled from a precomputed bank of VAE posteriors of augmented
training images. The learning rate warms up and decays on a cosine, and the saved UNet is the
exponential moving average of the weights. The class-conditional UNet has ``num_class_embeds=11``: digits 0–9 and
``NULL_CLASS`` (10), which replaces the label with probability ``class_dropout`` so that one
network also gives the unconditional prediction for classifier-free guidance.
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
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from benchmark.mini.data import load_digits
from benchmark.mini.pipeline import TEXT2IMG_DIR
from benchmark.mini.train_text2img import LATENT_CHANNELS, LATENT_SIZE, build_latent_bank, build_scheduler
from benchmark.mini.training import (
    add_training_noise,
    log_training_progress,
    optimizer_step_with_ema,
    warmup_cosine_schedule,
)

logger = logging.getLogger(__name__)

NUM_DIGITS: int = 10
# Class index of the "no class" embedding used for the unconditional branch of guidance.
NULL_CLASS: int = NUM_DIGITS
NUM_CLASS_EMBEDS: int = NUM_DIGITS + 1
DEFAULT_VAE_DIR: Path = TEXT2IMG_DIR / "vae"


@dataclass(frozen=True)
class ClassCondTrainConfig:
    """Settings of one class-conditional or unconditional UNet training run."""

    unconditional: bool = False
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    class_dropout: float = 0.1
    augmentations_per_image: int = 12
    ema_decay: float = 0.999
    seed: int = 0


def build_unet(unconditional: bool) -> UNet2DModel:
    """Build the untrained UNet: 8×8×4 latents, two levels (32/64 channels), attention at 4×4.

    The class-conditional UNet has 704,484 parameters and an 11-entry class embedding; the
    unconditional one has no class embedding.
    """
    return UNet2DModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=16,
        norm_num_groups=16,
        num_class_embeds=None if unconditional else NUM_CLASS_EMBEDS,
    )


def save_unet_folder(out_dir: Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Write the UNet's ``config.json`` and safetensors weights and ``scheduler/`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")


def train_classcond(config: ClassCondTrainConfig, vae_dir: Path, out_dir: Path) -> dict[str, float]:
    """Train the UNet, write its folder to ``out_dir`` and return the training metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    scaling_factor = float(vae.config.scaling_factor)
    images, labels = load_digits("train")
    latent_mean, latent_std, latent_labels = build_latent_bank(
        vae, images, labels, config.augmentations_per_image, config.seed
    )
    del vae
    logger.info("latent bank: %d entries, %.0f s", len(latent_labels), time.perf_counter() - start)

    unet = build_unet(config.unconditional)
    ema_unet = build_unet(config.unconditional)
    ema_unet.load_state_dict(unet.state_dict())
    ema_unet.requires_grad_(False)
    noise_scheduler = build_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    lr_schedule = warmup_cosine_schedule(optimizer, config.steps)
    num_parameters = sum(p.numel() for p in unet.parameters())
    kind = "unconditional" if config.unconditional else "class-conditional"
    logger.info("%s UNet: %d parameters, %d steps", kind, num_parameters, config.steps)

    train_start = time.perf_counter()
    recent_losses: list[float] = []
    unet.train()
    for step in range(config.steps):
        index = torch.randint(len(latent_labels), (config.batch_size,), generator=generator)
        noise_sample = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise_sample) * scaling_factor

        class_labels = None
        if not config.unconditional:
            class_labels = latent_labels[index].clone()
            dropped = torch.rand(config.batch_size, generator=generator) < config.class_dropout
            class_labels[dropped] = NULL_CLASS

        noisy_latents, timestep, noise = add_training_noise(
            latents, alphas_cumprod, noise_scheduler.config.num_train_timesteps, generator
        )
        noise_pred = unet(noisy_latents, timestep, class_labels=class_labels).sample
        loss = F.mse_loss(noise_pred, noise)

        optimizer_step_with_ema(loss, unet, ema_unet, optimizer, lr_schedule, step, config.ema_decay)
        recent_losses = (recent_losses + [loss.item()])[-200:]
        log_training_progress(logger, step, config.steps, loss.item(), recent_losses, train_start)
    wall_time = time.perf_counter() - start

    save_unet_folder(out_dir, ema_unet.eval(), noise_scheduler)
    metrics = {
        "final_loss": sum(recent_losses) / max(len(recent_losses), 1),
        "wall_time_s": wall_time,
        "unet_parameters": float(num_parameters),
    }
    (out_dir / "training_metrics.json").write_text(
        json.dumps({"config": asdict(config), "metrics": metrics}, indent=2) + "\n"
    )
    logger.info("UNet saved to %s: %s", out_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    defaults = ClassCondTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output UNet folder")
    parser.add_argument(
        "--vae", type=Path, default=DEFAULT_VAE_DIR,
        help="VAE folder whose latents the UNet learns (default: the text-to-image model's VAE)",
    )
    parser.add_argument(
        "--unconditional", action="store_true",
        help="train without a class embedding (default: class-conditional with a null class)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="latents per step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument(
        "--class-dropout", type=float, default=defaults.class_dropout,
        help="probability of replacing a label by the null class (class-conditional only)",
    )
    parser.add_argument(
        "--augmentations", type=int, default=defaults.augmentations_per_image,
        help="augmented copies of each training image in the latent bank",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument(
        "--num-threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice); 1 avoids oversubscription on shared machines",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    if not 0.0 <= args.class_dropout < 1.0:
        parser.error(f"--class-dropout must be in [0, 1), got {args.class_dropout}")

    config = ClassCondTrainConfig(
        unconditional=args.unconditional, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, class_dropout=args.class_dropout,
        augmentations_per_image=args.augmentations, seed=args.seed,
    )
    train_classcond(config, args.vae, args.out)


if __name__ == "__main__":
    main()
