"""Math reward for models that do not box their answers: the last ``\\boxed{}``, else the last number.

Not in the paper (its models box their answers; docs/method.md, "Data and verification"). Small instruct models such
as SmolLM2-135M-Instruct (the pretrained stand-in, ``configs/smollm2/``) end in GSM8K's style instead
(``#### 12``, "The answer is 12.") and almost never write ``\\boxed{}``, even when asked: under the plain math
reward every answer would score 0 and neither phase would have a signal. This verifier keeps the math reward's
rule where a box exists and otherwise takes the completion's last number, then compares with math-verify exactly
as :class:`~sdzero_pl.tasks.MathReward` does. It is lenient: a completion cut off after an intermediate result
counts that result as its answer.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from sdzero_pl.tasks.base import RewardBatch
from sdzero_pl.tasks.math import MathReward, extract_last_boxed

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{}``, else the last number of ``text`` (thousands commas removed), else
    None."""
    boxed = extract_last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


class FinalNumberReward(MathReward):
    """Binary math reward on :func:`final_answer` (last box, else last number), compared with math-verify."""

    def __call__(self, completions: Sequence[str], answers: Sequence[Any]) -> RewardBatch:
        boxed = []
        for text in completions:
            answer = final_answer(text)
            boxed.append(text if answer is None else f"\\boxed{{{answer}}}")  # no number: scored 0 as unboxed
        return super().__call__(boxed, answers)
