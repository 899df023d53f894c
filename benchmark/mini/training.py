"""Helpers shared by the training scripts of the miniature models."""

from __future__ import annotations

import math

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
