"""Optimizer and learning-rate schedule shared by both phases: AdamW, linear warm-up, then constant / cosine /
linear decay (paper: AdamW lr 5e-6; Phase 1 cosine with 5% warm-up, Phase 2 20 warm-up steps)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

SCHEDULES = ("constant", "cosine", "linear")


def check_schedule(schedule: str, warmup_steps: int, warmup_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"`lr_schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"`warmup_ratio` must be in [0, 1), got {warmup_ratio}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    total_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    schedule: str,
    min_lr_ratio: float,
) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW plus a per-step LambdaLR."""
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    warmup = warmup_steps or int(round(warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(list(parameters), lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule, min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def total_optimizer_steps(trainer, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole fit, without building a dataloader (``estimated_stepping_batches`` would,
    and in on-policy training that means generating)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("set `--trainer.max_steps` or `--trainer.max_epochs` so the LR schedule has a length")
    return trainer.max_epochs * steps_per_epoch
