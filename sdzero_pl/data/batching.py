"""Micro-batches and optimizer steps, shared by every data module that trains (docs/method.md, "Pitfalls": the token mean).

An optimizer step's loss is the token mean over ALL its micro-batches on ALL ranks, so each micro-batch carries the
valid-token count of its whole step (``global_tokens``; see :func:`sdzero_pl.core.losses.normalised_sum`). The
helpers here cut a rank's examples into micro-batches and steps and count those tokens across ranks.

Because of that token mean, ANY partition of a step's samples into micro-batches gives the same update. Length-aware
micro-batching (:class:`Batching` ``mode="tokens"``, NeMo-RL's dynamic batching / verl's max tokens per GPU) uses
this: each step keeps the samples fixed-count batching would give it (``batch_size x accumulate_grad_batches`` per
rank), sorted by length and cut into micro-batches of at most ``max_tokens`` padded tokens, as many as minimise the
padded tokens plus a fixed cost per micro-batch. Every rank runs the same number of micro-batches per step (the
most any step of any rank wants; the others are cut into as many, padded with masked micro-batches), and the
trainer's ``accumulate_grad_batches`` is set to that number for the epoch (as Lightning's own
``GradientAccumulationScheduler`` sets it), so Lightning steps the optimizer exactly at the step boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
from torch.utils.data import IterableDataset

T = TypeVar("T")

BATCHING_MODES = ("count", "tokens")
PAD = -1  # the index of a padding row in a planned micro-batch: context only, no target


@dataclass(frozen=True)
class Batching:
    """How each rank's samples of an optimizer step are cut into micro-batches (``--data.batching.*``). A step
    always takes ``batch_size x accumulate_grad_batches`` samples per rank, so the mode never changes the update."""

    mode: str = "count"
    """"count": micro-batches of ``batch_size`` samples, each padded to its longest; "tokens": the step's samples
    sorted by length and cut into micro-batches of at most ``max_tokens`` padded tokens, as many as minimise the
    padding plus ``micro_batch_cost`` each (the trainer's accumulation is set each epoch to that number)."""
    max_tokens: int = 16384
    """"tokens" mode: padded tokens per micro-batch, rows x its longest sequence (Phase 2: the longer of the
    student and teacher sequences). A longer sample gets a micro-batch of its own (counted in
    ``train/over_budget``). Safe choice: ``batch_size`` x the longest sequence, never more than count mode's worst
    micro-batch."""
    micro_batch_cost: int = 512
    """"tokens" mode: the fixed cost of one more micro-batch (kernel launches, FSDP gathers), in padded tokens: a
    step is cut further only where that saves more padding than this; 0 = as finely as saves any padding."""

    def __post_init__(self) -> None:
        if self.mode not in BATCHING_MODES:
            raise ValueError(f"`--data.batching.mode` must be one of {BATCHING_MODES}, got {self.mode!r}")
        if self.max_tokens < 1:
            raise ValueError(f"`--data.batching.max_tokens` must be >= 1, got {self.max_tokens}")
        if self.micro_batch_cost < 0:
            raise ValueError(f"`--data.batching.micro_batch_cost` must be >= 0, got {self.micro_batch_cost}")

    @classmethod
    def of(cls, value: Batching | dict) -> Batching:
        """``value`` as Batching (LightningCLI and checkpoints hand groups over as dicts)."""
        return value if isinstance(value, cls) else cls(**value)


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


# ------------------------------------------------------------------------------------ length-aware micro-batches
def cut_micro_batches(lengths: Sequence[int], max_tokens: int, micro_batch_cost: int = 0,
                      count: int | None = None) -> list[list[int]]:
    """Indices of the samples cut into micro-batches of at most ``max_tokens`` padded tokens (rows x longest; a
    longer sample alone), as consecutive runs of the longest-first order (some optimal partition always is one:
    exchanging a longer sample into the run of the longer ones never makes a micro-batch larger).

    ``count=None``: as many micro-batches as minimise padded tokens + ``micro_batch_cost`` per micro-batch (its
    fixed cost in tokens); ``count=m`` (``m <= len(lengths)``): exactly m, minimising padded tokens. Dynamic
    programming over the sorted order, O(m n^2) (n: one rank's samples of one step)."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    ordered = [lengths[i] for i in order]

    def run_cost(i: int, j: int) -> float:  # the run order[i:j], whose longest is ordered[i]
        rows = j - i
        return rows * ordered[i] if rows == 1 or rows * ordered[i] <= max_tokens else math.inf

    if count is None:
        best, back = [0.0] + [math.inf] * n, [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):
                cost = run_cost(i, j)
                if cost == math.inf:
                    break  # longer runs starting earlier are larger still
                if best[i] + cost + micro_batch_cost < best[j]:
                    best[j], back[j] = best[i] + cost + micro_batch_cost, i
        backs = [back]
    else:
        assert 1 <= count <= n, f"{count} micro-batches for {n} samples"
        best = [0.0] + [math.inf] * n
        backs = []
        for _ in range(count):
            new, back = [math.inf] * (n + 1), [0] * (n + 1)
            for j in range(1, n + 1):
                for i in range(j - 1, -1, -1):
                    cost = run_cost(i, j)
                    if cost == math.inf:
                        break
                    if best[i] + cost < new[j]:
                        new[j], back[j] = best[i] + cost, i
            best = new
            backs.append(back)
    runs, j = [], n
    while j > 0:  # walk the back pointers from the end: the free count's own, or one table per micro-batch
        i = (backs[0] if count is None else backs[count - 1 - len(runs)])[j]
        runs.append(order[i:j])
        j = i
    assert count is None or len(runs) == count, f"cut into {len(runs)} micro-batches, wanted {count}"
    return runs[::-1]


@dataclass
class StepPlan:
    """One epoch's micro-batches of this rank, by optimizer step."""

    steps: list[list[list[int]]]  # per step, its micro-batches: indices into the samples (PAD: a padding row)
    micro_batches_per_step: int | None  # "tokens" mode: the trainer's accumulation for the epoch; None: unchanged
    over_budget: int = 0  # samples longer than ``max_tokens`` (each alone in its micro-batch)


class MicroBatcher:
    """The micro-batch planner of a data module: remembers the accumulation the user gave the trainer (it sizes the
    steps), re-cuts each step by tokens in "tokens" mode and sets the trainer's accumulation for the epoch."""

    def __init__(self, batching: Batching | dict = Batching()) -> None:
        self.batching = Batching.of(batching)
        self.accumulate: int | None = None  # the user's accumulate_grad_batches: micro-batches of a count-mode step
        self._trainer = None

    def accumulation(self, trainer) -> int:
        """Micro-batches of a count-mode step: the trainer's ``accumulate_grad_batches`` as the user set it (read the
        first time this planner sees the trainer, before any plan changed it)."""
        if self._trainer is not trainer:
            self._trainer, self.accumulate = trainer, trainer.accumulate_grad_batches
        return self.accumulate

    def release(self, trainer) -> None:
        """Call in ``teardown("fit")``: give the trainer its own accumulation back."""
        if self._trainer is trainer and self.accumulate is not None:
            trainer.accumulate_grad_batches = self.accumulate

    def plan(self, trainer, steps: list[list[list[int]]], lengths: Sequence[int]) -> StepPlan:
        """``steps``: count mode's steps of this rank (micro-batches of sample indices, PAD = padding row; the same
        number of steps on every rank). "count": as given. "tokens": each step's samples re-cut by ``max_tokens``
        into as many micro-batches as the fullest step of any rank needs (a collective), and the trainer's
        ``accumulate_grad_batches`` set to that number."""
        self.accumulation(trainer)
        if self.batching.mode == "count":
            return StepPlan(steps, None)
        budget, cost = self.batching.max_tokens, self.batching.micro_batch_cost
        samples = [[i for mb in step for i in mb if i != PAD] for step in steps]
        local = max((len(cut_micro_batches([lengths[i] for i in s], budget, cost)) for s in samples if s), default=1)
        count = max(1, int(trainer.strategy.reduce(torch.tensor(local, device=trainer.strategy.root_device),
                                                   reduce_op="max")))
        planned = []
        for step in samples:
            cut = min(count, len(step))
            runs = cut_micro_batches([lengths[i] for i in step], budget, count=cut) if step else []
            planned.append([[step[j] for j in run] for run in runs] + [[PAD]] * (count - cut))
        trainer.accumulate_grad_batches = count
        return StepPlan(planned, count, sum(lengths[i] > budget for s in samples for i in s))


def padding_fraction(batches: Sequence[dict], mask_keys: Sequence[str]) -> float:
    """Padded share of the token slots of collated micro-batches, over the given attention-mask keys."""
    slots = sum(b[k].numel() for b in batches for k in mask_keys)
    real = sum(int(b[k].sum()) for b in batches for k in mask_keys)
    return 1.0 - real / slots if slots else 0.0


def planned_padding(steps: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int], pad_length: int) -> float:
    """Padded share of the token slots of planned micro-batches (rows x longest each), from the sample lengths;
    a PAD row is ``pad_length`` long."""
    slots = real = 0
    for step in steps:
        for mb in step:
            sizes = [lengths[i] if i != PAD else pad_length for i in mb]
            slots += len(sizes) * max(sizes)
            real += sum(sizes)
    return 1.0 - real / slots if slots else 0.0
