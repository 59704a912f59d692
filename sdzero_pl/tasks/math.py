"""Math reward (docs/method.md, "Data and verification"): the LAST ``\\boxed{...}`` of the completion, compared with the
reference answer by math-verify, gold first: ``verify(parse(gold), parse(pred))``.

math-verify's own timeouts use SIGALRM and only work in the main thread, so they are switched off here and the
time limit is enforced by running each check in a worker process that is killed when it runs past ``timeout_s``.
That makes the reward safe from any thread (DataLoader workers, Lightning callbacks, a thread pool).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any, Sequence

from sdzero_pl.tasks.base import RewardBatch, Verifier

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched; None if none."""
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command + "{")
        while start != -1:
            content = _braced(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(command + "{", 0, start)
    return None if best is None else best[1]


def _braced(text: str, open_index: int) -> str | None:
    """The text inside the brace group opening at ``open_index``; None if it is never closed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def check_math(gold: str, predicted: str) -> float | None:
    """1.0 / 0.0 for a boxed prediction against the gold answer; None if the gold answer cannot be parsed.

    Runs math-verify with its SIGALRM timeouts disabled (the caller enforces time limits).
    """
    from math_verify import parse, verify

    # We disable math-verify's SIGALRM timeouts on purpose (see module docstring); silence its warning about it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        return None
    pred_parsed = parse(_as_latex(predicted), parsing_timeout=None)
    if not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def _as_latex(answer: str) -> str:
    # math-verify extracts from LaTeX environments; a bare answer ("3/4", "\\frac{1}{2}") is wrapped in a box.
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def _check_row(gold: str, predicted: str) -> float | None:
    return check_math(gold, predicted)


def _warm_up() -> None:
    """Worker initializer: import math-verify (sympy) and run one check, so that the first timed check does not
    pay the start-up (seconds on a loaded machine) and time out."""
    check_math("1", "\\boxed{1}")


# Seconds a fresh worker pool may take to start and warm up; separate from the per-check ``timeout_s``.
STARTUP_TIMEOUT_S = 300.0


class MathReward(Verifier):
    """Binary math reward: last ``\\boxed{}`` wins, no box means 0, compared with math-verify (gold first)."""

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 1) -> None:
        """
        Args:
            timeout_s: seconds one parse + verify may take before the row counts as wrong (reward 0).
            num_workers: verifier worker processes (each check runs in a killable process, so the time
                limit holds from any thread).
        """
        if timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"`num_workers` must be >= 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self._pool: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # a process pool is not picklable; a copy starts its own
        return state

    def _get_pool(self) -> Any:
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_workers, initializer=_warm_up)
            # Wait until every worker has started and imported math-verify before any check is timed.
            warm = [self._pool.apply_async(_warm_up) for _ in range(self.num_workers)]
            for job in warm:
                job.get(timeout=STARTUP_TIMEOUT_S)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    def __call__(self, completions: Sequence[str], answers: Sequence[Any]) -> RewardBatch:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        rewards: list[float | None] = [0.0] * len(completions)
        errors: list[str | None] = [None] * len(completions)
        pending = []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            if not isinstance(answer, str):
                raise TypeError(f"row {i}: answer must be a string, got {type(answer).__name__}: {answer!r}")
            boxed = extract_last_boxed(completion)
            if boxed is None:
                errors[i] = "no \\boxed{} answer"
                continue
            pending.append((i, answer, f"\\boxed{{{boxed}}}"))
        timeouts = 0
        queue = pending
        while queue:
            pool = self._get_pool()
            jobs = [(i, pool.apply_async(_check_row, (gold, pred))) for i, gold, pred in queue]
            queue = []
            for n, (i, job) in enumerate(jobs):
                try:
                    rewards[i] = job.get(timeout=self.timeout_s)
                except mp.TimeoutError:
                    rewards[i], errors[i] = 0.0, f"verification took longer than {self.timeout_s}s"
                    timeouts += 1
                    # A stuck worker cannot be interrupted: replace the pool and resubmit what is still pending.
                    self.close()
                    queue = [row for row in pending if row[0] in {j for j, _ in jobs[n + 1 :]}]
                    break
        skipped = 0
        for i, r in enumerate(rewards):
            if r is None:
                skipped += 1
                errors[i] = f"reference answer {answers[i]!r} could not be parsed"
        return RewardBatch(rewards=rewards, skipped=skipped, timeouts=timeouts, errors=errors)
