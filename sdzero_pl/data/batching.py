"""Micro-batches and optimizer steps, shared by every data module that trains (docs/method.md, "Pitfalls": the token mean).

An optimizer step's loss is the token mean over ALL its micro-batches on ALL ranks, so each micro-batch carries the
valid-token count of its whole step (``global_tokens``; see :func:`sdzero_pl.core.losses.normalised_sum`). The
helpers here cut a rank's examples into micro-batches and steps and count those tokens across ranks.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import torch
from torch.utils.data import IterableDataset

T = TypeVar("T")


class RankShard(IterableDataset):
    """This rank's items (pre-collated micro-batches, evaluation questions), in order. Iterable, so Lightning neither
    shards it again with a DistributedSampler nor pads it with duplicates (which would bias means)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive groups of ``size`` items (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def split_steps(items: Sequence[T], batch_size: int, accumulate: int) -> list[list[list[T]]]:
    """``items`` cut into micro-batches of ``batch_size``, grouped into optimizer steps of ``accumulate``
    micro-batches (the last of each may be shorter)."""
    return chunks(chunks(items, batch_size), accumulate)


def step_totals(strategy, counts: Sequence) -> list:
    """Per-step token counts summed over all ranks (a collective: every rank calls it with the same number of
    steps). ``counts``: one int, or one tuple of ints, per step."""
    local = torch.tensor(counts, dtype=torch.long)
    return strategy.reduce(local.to(strategy.root_device), reduce_op="sum").cpu().tolist()


def require_reload_every_epoch(trainer, what: str) -> None:
    """Data modules that build new batches every epoch need Lightning to ask for the dataloader every epoch."""
    if trainer.reload_dataloaders_every_n_epochs != 1:
        raise ValueError(f"{what} every epoch: set `--trainer.reload_dataloaders_every_n_epochs=1`, got "
                         f"{trainer.reload_dataloaders_every_n_epochs}")


def planned_epochs(trainer, steps_per_epoch: int) -> int | None:
    """Epochs the trainer will run (``max_epochs``, or fewer when ``max_steps`` stops it first); None: unbounded."""
    limits = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        limits.append(trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps > 0:
        limits.append(-(-trainer.max_steps // max(steps_per_epoch, 1)))
    return min(limits) if limits else None


def check_question_pool(pool: int, per_epoch: int, epochs: int | None, name: str, why: str, reuse: bool) -> None:
    """Fail before any generation when a run would draw more new questions (``per_epoch`` x ``epochs``) than its
    pool holds and would silently cycle through it; ``reuse`` allows that. ``why`` says where the pool went."""
    if reuse or epochs is None or per_epoch * epochs <= pool:
        return
    raise ValueError(
        f"{name}: {pool:,} questions left for this run ({why}), but it needs {epochs:,} epochs x "
        f"`--data.prompts_per_epoch` {per_epoch:,} = {per_epoch * epochs:,} new questions: lower "
        f"`--trainer.max_epochs` / `--trainer.max_steps` or `--data.prompts_per_epoch`, free more questions, or set "
        "`--data.reuse_questions=true` to cycle through the pool")
