"""Toy verifiers and backends shared by several test files."""

from __future__ import annotations

from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import RewardBatch, Verifier

DIGITS = "0123456789"


class StartsWithDigit(Verifier):
    """Toy task: reward 1 iff the completion starts with a digit (about 10% of a random char-level model's
    samples, so most groups of 8 hold both outcomes)."""

    def __call__(self, completions, answers):
        return RewardBatch([1.0 if c[:1] in DIGITS else 0.0 for c in completions])


class CountingRollout(HFRollout):
    """HF generate that counts its calls (class-wide), to prove a collection was reused, not redone."""

    calls = 0

    def generate(self, *args, **kwargs):
        CountingRollout.calls += 1
        return super().generate(*args, **kwargs)
