"""Binary verifiers: ``reward = verifier(completions, answers)``.

Every verifier returns a :class:`RewardBatch`: one reward (1.0 correct, 0.0 wrong) per completion, or ``None``
where the reference answer itself could not be used (an unparseable gold answer). Callers count and drop those
rows; they never silently become a 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

from sdzero_pl.data.questions import Question, QuestionSource, load_questions


@dataclass
class RewardBatch:
    rewards: list[float | None]
    skipped: int = 0  # rows whose reference could not be used (reward None)
    timeouts: int = 0  # rows whose verification ran past the time limit (reward 0.0)
    errors: list[str | None] = field(default_factory=list)  # per-row reason for a None / timeout, else None


class Verifier(ABC):
    """A reward function, chosen in YAML by ``class_path``. ``answers`` are the dataset's references
    (math: a string; code: a list of tests). The verifier also reads its task's questions
    (:meth:`load_questions`), so a config switches domain by switching the reward alone."""

    fields: ClassVar[tuple[str, str, str | None]] = ("problem", "answer", None)
    """default (question, answer, id) columns of this task's datasets; id None = the row number."""

    @abstractmethod
    def __call__(self, completions: Sequence[str], answers: Sequence[Any]) -> RewardBatch: ...

    def columns(self, source: QuestionSource) -> tuple[str, str, str | None]:
        """The (question, answer, id) columns ``source`` names, this task's defaults where it names none."""
        question, answer, id_ = self.fields
        return source.question_field or question, source.answer_field or answer, source.id_field or id_

    def load_questions(self, source: QuestionSource) -> list[Question]:
        """Every row of ``source`` as a :class:`Question` with a reference of the kind this verifier checks
        (default: math, a non-empty string answer per row); ``solution_field``: a reference solution per row too."""
        question, answer, id_ = self.columns(source)
        return load_questions(source.dataset, source.dataset_config, source.split, question, answer, id_,
                              solution_field=source.solution_field)

    def close(self) -> None:
        """Release worker processes, if any."""


@runtime_checkable
class StepVerifier(Protocol):
    """A verifier that can also say WHERE a wrong answer first goes wrong (the demo's arithmetic task can; math and
    code cannot): what the reviser probe (``python -m sdzero_pl.evaluation.probe``) checks the divergence against."""

    def first_error(self, completion: str, question: Question) -> int | None:
        """Character index in ``completion`` of its first wrong token; None if it has none."""
