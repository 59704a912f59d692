"""Binary verifiers: ``reward = verifier(completions, answers)``.

Every verifier returns a :class:`RewardBatch`: one reward (1.0 correct, 0.0 wrong) per completion, or ``None``
where the reference answer itself could not be used (an unparseable gold answer). Callers count and drop those
rows; they never silently become a 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Any, Sequence

from sdzero_pl.data.questions import load_questions


@dataclass
class RewardBatch:
    rewards: list[float | None]
    skipped: int = 0  # rows whose reference could not be used (reward None)
    timeouts: int = 0  # rows whose verification ran past the time limit (reward 0.0)
    errors: list[str | None] = field(default_factory=list)  # per-row reason for a None / timeout, else None


class Verifier(ABC):
    """A reward function, chosen in YAML by ``class_path``. ``answers`` are the dataset's references
    (math: a string; code: a list of tests)."""

    @abstractmethod
    def __call__(self, completions: Sequence[str], answers: Sequence[Any]) -> RewardBatch: ...

    def load_questions(
        self,
        source: str,
        config: str | None = None,
        split: str = "train",
        question_field: str = "problem",
        answer_field: str = "answer",
        id_field: str | None = None,
        solution_field: str | None = None,
    ) -> list:
        """The dataset's questions with references of the kind this verifier checks (default: math, a string
        answer per row). The data modules load through their verifier, so a code config only swaps the reward.
        ``solution_field``: also read a reference solution per row (SDFT's demonstration)."""
        return load_questions(source, config, split, question_field, answer_field, id_field,
                              solution_field=solution_field)

    def close(self) -> None:
        """Release worker processes, if any."""


