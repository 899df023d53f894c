"""Helpers shared by the training scripts of the miniature models."""

from __future__ import annotations

import logging
import math
import time

import torch


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a schedule with linear warm-up then cosine decay to 10% of the peak learning rate."""
    warmup_steps = max(1, int(total_steps * warmup_fraction))
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def add_training_noise(
    latents: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a timestep and noise per latent, then return (noisy latents, timesteps, noise).

    The timesteps are drawn before the noise, so a fixed generator gives the same batch every run.
    """
    batch_size = latents.shape[0]
    timestep = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = alphas_cumprod[timestep].view(-1, 1, 1, 1)
    noisy_latents = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    return noisy_latents, timestep, noise


def optimizer_step_with_ema(
    loss: torch.Tensor,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    ema_decay: float,
) -> None:
    """Back-propagate ``loss`` with gradient clipping at 1.0, step, and update the EMA copy.

    The EMA decay ramps up as (1 + step) / (10 + step) until it reaches ``ema_decay``.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    lr_schedule.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_param, param in zip(ema_model.parameters(), model.parameters()):
            ema_param.lerp_(param, 1 - decay)


def log_training_progress(
    logger: logging.Logger, step: int, total_steps: int, loss: float, recent_losses: list[float], start: float
) -> None:
    """Log the loss every 100 steps and at the last step, with the mean of ``recent_losses``."""
    if step % 100 == 0 or step == total_steps - 1:
        logger.info(
            "step %d/%d loss %.4f (mean of last %d: %.4f) %.0f s",
            step + 1, total_steps, loss, len(recent_losses),
            sum(recent_losses) / len(recent_losses), time.perf_counter() - start,
        )
