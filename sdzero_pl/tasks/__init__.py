"""Verifiable tasks: each domain owns how its questions are read and how an answer is graded.

``reward = verifier(completions, answers)`` returns a :class:`RewardBatch`; verifiers are chosen in YAML by
``class_path`` (``sdzero_pl.tasks.MathReward``, ``sdzero_pl.tasks.CodeReward``, ``sdzero_pl.tasks.ArithmeticReward``, ``sdzero_pl.tasks.FinalNumberReward``).
"""

from sdzero_pl.tasks.arithmetic import ArithmeticReward
from sdzero_pl.tasks.base import RewardBatch, StepVerifier, Verifier
from sdzero_pl.tasks.code import CodeReward, extract_code
from sdzero_pl.tasks.final_number import FinalNumberReward
from sdzero_pl.tasks.math import MathReward, extract_last_boxed

__all__ = ["RewardBatch", "StepVerifier", "Verifier", "MathReward", "CodeReward", "ArithmeticReward",
           "extract_last_boxed", "extract_code", "FinalNumberReward"]
