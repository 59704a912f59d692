"""What a training module and its data module need from each other, as typed protocols.

Wiring is one way, as litgpt's ``DataModule.connect()``: in its ``setup`` hook the training module calls
:func:`connect`, which checks that ``trainer.datamodule`` provides the protocol the module reads and hands the module
to it (``datamodule.connect(module)``). From then on the data module holds the module as the protocol it needs (the
tokenizer, the policy it samples from, a scorer) and never looks the module up through the trainer; the module
reads the data module only through the protocol it asked for. Callbacks check the same protocols in their ``setup``.

Names: the trained model is ``policy`` on every training module (Phase 2: the student; GRPO: the policy; SRT and
RFT: the model being fine-tuned), possibly a sharding wrapper around the Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class PolicyModule(Protocol):
    """What data modules and callbacks need from a training module."""

    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module | None  # None until ``configure_model`` ran

    @property
    def start_model(self) -> str:
        """The directory or hub id the policy was loaded from (its ``model_name_or_path``)."""

    def configure_model(self) -> None:
        """Load the policy (idempotent): a data module that samples before training calls it early."""


@runtime_checkable
class DistillPolicy(PolicyModule, Protocol):
    """A Phase-2-style module: roles scored through one entry point (sharding-safe)."""

    chunk_size: int

    def score(self, role: str, fn: Callable, *args: Any) -> Any:
        """``fn(hf_model, *args)`` on the "policy" or the "teacher" role."""


@runtime_checkable
class GroupPolicy(PolicyModule, Protocol):
    """A GRPO-style module: scores each epoch's rollouts with the generating policy (the PPO ratio's "old")."""

    def score_rollouts(self, batch: dict) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class RolloutData(Protocol):
    """What an on-policy training module (and the behaviour logger) needs from its data module."""

    rollout_stats: dict[str, float]  # this epoch's rollout metrics, ready before ``on_train_epoch_start``
    last_completions: list[str]  # this rank's completion texts of the latest rollouts

    def optimizer_steps_per_epoch(self, world_size: int, accumulate: int) -> int: ...

    def connect(self, module: PolicyModule) -> None: ...


@runtime_checkable
class GroupRollouts(RolloutData, Protocol):
    """GRPO's data module: on-policy groups, and the ledger of their generations (copied next to the export)."""

    def budget_path(self) -> Path: ...


@runtime_checkable
class SFTData(Protocol):
    """What the SFT module (SRT, RFT) needs from its data module: the stage plan and the data statistics."""

    stats: dict[str, float]

    def connect(self, module: PolicyModule) -> None:
        """Prepare the examples with the module's tokenizer (collecting them with its policy if needed)."""

    def stage_of_epoch(self, epoch: int) -> int: ...

    def stage_steps(self, trainer: Any) -> list[int]:
        """Optimizer steps of each stage over the whole fit (the LR schedule's lengths)."""

    def paths(self) -> Any:
        """The collection's files (:class:`~sdzero_pl.data.records.CollectionPaths`: records, budget.json)."""

    def handoff(self) -> Any:
        """What Phase 2 must match (a :class:`~sdzero_pl.phase1.handoff.Handoff`), or None (RFT: no Phase 2)."""


P = TypeVar("P")


def require(obj: Any, protocol: type[P], what: str) -> P:
    """``obj`` if it provides ``protocol``, else a TypeError naming ``what`` needs, the protocol and the missing
    members (a clear error instead of an AttributeError deep inside a hook)."""
    if isinstance(obj, protocol):
        return obj
    members = [m for m in _members(protocol) if not hasattr(type(obj), m) and not hasattr(obj, m)]
    missing = f"; missing: {', '.join(members)}" if members else ""
    raise TypeError(f"{what} needs a {protocol.__name__} ({protocol.__doc__.splitlines()[0]}), got "
                    f"{type(obj).__name__}{missing}")


def connect(module: PolicyModule, datamodule: Any, protocol: type[P]) -> P:
    """Check that ``datamodule`` provides ``protocol`` and hand it the module (``datamodule.connect(module)``);
    returns the data module, typed."""
    data = require(datamodule, protocol, type(module).__name__)
    data.connect(module)
    return data


def _members(protocol: type) -> list[str]:
    names: list[str] = []
    for klass in protocol.__mro__:
        if klass in (Protocol, object) or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in (*getattr(klass, "__annotations__", {}), *vars(klass)) if not n.startswith("_")]
    return list(dict.fromkeys(names))
