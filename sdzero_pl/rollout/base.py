"""The rollout interface: token ids in, token ids (+ finish reason, + optional log-probs) out.

Backends are chosen in YAML by ``class_path`` (HF ``generate`` for CPU and tests, vLLM on GPU). A backend is bound
once to the policy it samples from (:meth:`RolloutBackend.setup`); each :meth:`generate` call samples from the
policy's CURRENT weights with an explicit seed, so every rank and every epoch has its own seed stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    completion_ids: list[int]  # sampled tokens, up to and including the stop token if one was sampled
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    logps: list[float] | None = field(default=None)  # the engine's log-prob of each sampled token, if known

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutBackend(ABC):
    """Samples completions for token-id prompts from the current policy."""

    def __init__(self, temperature: float, top_p: float, max_new_tokens: int) -> None:
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens

    @abstractmethod
    def setup(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> None:
        """Bind to the policy (the trained model) and its tokenizer; called once before the first generate."""

    @abstractmethod
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], seed: int, desc: str = "generate", max_new_tokens: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[Rollout]:
        """One completion per prompt, sampled from the policy's current weights with this seed. ``on_progress(n)``
        is called as completions are ready (n = how many more), so a caller can show progress within a long
        call (the evaluation's progress bar)."""


def rollout_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed stream per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 65_537 + rank) % (2**63)


def split_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> Rollout:
    """Cut a generated tail at the first stop token (kept); what follows it is padding."""
    stops = set(stop_ids)
    for i, token in enumerate(token_ids):
        if token in stops:
            return Rollout(list(token_ids[: i + 1]), "stop")
    return Rollout(list(token_ids), "length")


class RolloutCallback(L.Callback):
    """A callback with one more hook, ``on_before_rollout``: run by every data module that generates, on every
    rank, right before each epoch's rollouts (Lightning builds the dataloader BEFORE ``on_train_epoch_start``, so
    a weight refresh cannot wait for that hook)."""

    def on_before_rollout(
        self, trainer: L.Trainer, pl_module: L.LightningModule, rollout: RolloutBackend, policy: torch.nn.Module
    ) -> None:
        """``policy`` is the model the rollouts must come from (Phase 2: the student; GRPO: the policy)."""


def before_rollout(trainer: L.Trainer, rollout: RolloutBackend, policy: torch.nn.Module) -> None:
    """Run the trainer's :class:`RolloutCallback` hooks."""
    for callback in trainer.callbacks:
        if isinstance(callback, RolloutCallback):
            callback.on_before_rollout(trainer, trainer.lightning_module, rollout, policy)
