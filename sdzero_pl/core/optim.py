"""Optimizer and learning-rate schedule of every training module (docs/method.md, "Hyper-parameters"): AdamW, a
linear warm-up, then constant / cosine / linear decay. Paper: AdamW lr 5e-6; Phase 1 cosine with 5% warm-up, weight
decay 1e-4, betas (0.9, 0.95); Phase 2 20 warm-up steps. Each module gives :class:`OptimArgs` its own defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimArgs:
    """AdamW and its learning-rate schedule (``--model.optim.*``)."""

    lr: float = 5e-6
    """AdamW learning rate (paper: 5e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """linear warm-up in optimizer steps; overrides ``warmup_ratio`` when > 0."""
    warmup_ratio: float = 0.0
    """linear warm-up as a fraction of the (stage's) optimizer steps, used when ``warmup_steps`` is 0."""
    warmup_start: float = 0.0
    """learning-rate multiplier of the first optimizer step, rising linearly to 1 at the end of the warm-up
    (reference code, Phase 2: 0.1, i.e. from 0.1 x lr); 0: the first step is at lr / warm-up steps."""
    schedule: str = "constant"
    """after warm-up: "constant", "cosine" or "linear" decay."""
    min_lr_ratio: float = 0.0
    """floor of the decayed learning rate, as a fraction of ``lr``."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"`--model.optim.lr` must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`--model.optim.schedule` must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"`--model.optim.warmup_steps` must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"`--model.optim.warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.warmup_start < 1.0:
            raise ValueError(f"`--model.optim.warmup_start` must be in [0, 1), got {self.warmup_start}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"`--model.optim.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def hold(cls, module, value: OptimArgs | dict) -> OptimArgs:
        """``value`` as OptimArgs (rebuilt from its dict form: LightningCLI's and a checkpoint's hyper-parameters),
        recorded in ``module.hparams`` as plain types, so checkpoints load with ``weights_only=True``."""
        optim = value if isinstance(value, cls) else cls(**value)
        module.hparams["optim"] = asdict(optim)
        return optim

    def warmup(self, total_steps: int) -> int:
        """Warm-up optimizer steps of a schedule ``total_steps`` long."""
        return self.warmup_steps or int(round(self.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0,
              warmup_start: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based). Warm-up: ``(step + 1) / W``, or
    with ``warmup_start`` s > 0 ``s + (1 - s) * step / W`` (torch's ``LinearLR(start_factor=s, total_iters=W)``, the
    reference code's Phase-2 schedule)."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps if warmup_start else (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def staged_lr_factor(step: int, stage_steps: list[int], optim: OptimArgs) -> float:
    """LR multiplier when each stage has its own warm-up and decay (:func:`lr_factor` within the stage), as two
    separate runs would (the reference code's two SFT stages)."""
    for index, total in enumerate(stage_steps):
        if step < total or index == len(stage_steps) - 1:
            return lr_factor(step, total, optim.warmup(total), optim.schedule, optim.min_lr_ratio, optim.warmup_start)
        step -= total
    return 1.0


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim: OptimArgs, stage_steps: list[int]) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW plus a per-step LambdaLR over the stages' optimizer steps
    (one stage: one warm-up and decay over the whole fit)."""
    optimizer = torch.optim.AdamW(list(parameters), lr=optim.lr, weight_decay=optim.weight_decay,
                                  betas=tuple(optim.betas))
    if len(stage_steps) == 1:
        total, warmup = stage_steps[0], optim.warmup(stage_steps[0])
        schedule = lambda step: lr_factor(step, total, warmup, optim.schedule, optim.min_lr_ratio,  # noqa: E731
                                          optim.warmup_start)
    else:
        schedule = lambda step: staged_lr_factor(step, stage_steps, optim)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def optimizer_for(parameters: Iterable[torch.nn.Parameter], optim: OptimArgs, trainer, steps_per_epoch: int) -> dict:
    """:func:`build_optimizer` for a one-stage fit of ``steps_per_epoch`` optimizer steps per epoch."""
    return build_optimizer(parameters, optim, [total_optimizer_steps(trainer, steps_per_epoch)])


def total_optimizer_steps(trainer, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole fit, without building a dataloader (``estimated_stepping_batches`` would,
    and in on-policy training that means generating)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("set `--trainer.max_steps` or `--trainer.max_epochs` so the LR schedule has a length")
    return trainer.max_epochs * steps_per_epoch
