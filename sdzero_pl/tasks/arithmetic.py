"""Multi-step integer arithmetic word problems: the verifiable task of the embedded CPU demo.

Not part of the paper (which trains on OpenR1-Math); it stands in for it so that SD-Zero can be run end to end on
a CPU in minutes with a tiny model trained here (``scripts/train_tiny_base.py``). A problem reads like

    Tom has 7 apples. He buys 5 more and gives away 3. How many apples does he have now?

and its worked solution is one equation per step, then the boxed answer: ``7+5=12. 12-3=9. \\boxed{9}``.

Everything is deterministic from ``(split, seed, settings)``. Splits are disjoint by construction: every problem
is assigned to exactly one split by a hash of its arithmetic (start value, operations, operands; see
:func:`split_of`), and a split's generator keeps only the problems assigned to it. Held-out questions therefore
never share their arithmetic (let alone their text) with any training question, whatever ``n`` and ``seed`` each
split was generated with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sdzero_pl.data.questions import Question
from sdzero_pl.tasks.base import RewardBatch
from sdzero_pl.tasks.math import MathReward

# Share of the problem space owned by each split (hash partition, see `split_of`).
SPLIT_SHARES = {"train": 0.70, "phase1": 0.10, "phase2": 0.10, "heldout": 0.10}
SPLITS = tuple(SPLIT_SHARES)

NAMES = {
    "Tom": "he", "Sam": "he", "Ben": "he", "Max": "he", "Leo": "he",
    "Ann": "she", "Mia": "she", "Eva": "she", "Zoe": "she", "Ivy": "she",
}  # fmt: skip
ITEMS = ("apples", "coins", "books", "cards", "stamps", "pens", "eggs", "shells", "marbles", "cookies")
ADD_PHRASES = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
SUB_PHRASES = ("gives away {n}", "loses {n}", "sells {n}", "eats {n}")
MUL_PHRASES = {2: "doubles them", 3: "triples them"}  # larger factors use MUL_GENERIC
MUL_GENERIC = "ends up with {k} times as many"
OPS = "+-*"


@dataclass(frozen=True)
class TaskSettings:
    """Difficulty knobs. The defaults are the settings the embedded base model was trained and measured on."""

    min_steps: int = 2  # operations per problem (inclusive range)
    max_steps: int = 3
    max_start: int = 20  # the starting amount is drawn from [1, max_start]
    max_operand: int = 10  # added / subtracted amounts are drawn from [1, max_operand]
    max_factor: int = 3  # multiplications use a factor in [2, max_factor]
    ops: str = "+-"  # allowed operations, a subset of "+-*"
    max_value: int = 999  # no running total exceeds this (a multiplication that would becomes a subtraction)

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_start < 1 or self.max_operand < 1:
            raise ValueError(f"max_start and max_operand must be >= 1, got {self.max_start}, {self.max_operand}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"`ops` must be a non-empty subset of {OPS!r}, got {self.ops!r}")
        if "*" in self.ops and self.max_factor < 2:
            raise ValueError(f"`max_factor` must be >= 2 when '*' is allowed, got {self.max_factor}")
        if self.max_value < self.max_start + self.max_operand:
            raise ValueError(f"`max_value` must be >= max_start + max_operand, got {self.max_value}")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    solution: str

    def to_row(self) -> dict:
        return asdict(self)


def split_of(key: str) -> str:
    """The split that owns a problem, from a stable hash of its arithmetic ``key`` (e.g. ``"7+5-3"``)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for split, share in SPLIT_SHARES.items():
        cumulative += share
        if bucket < cumulative:
            return split
    return SPLITS[-1]


def _split_rng(split: str, seed: int) -> random.Random:
    # Not Python's hash(): that is salted per process.
    digest = hashlib.sha256(f"arithmetic:{split}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_steps(rng: random.Random, settings: TaskSettings) -> tuple[int, list[tuple[str, int]]]:
    """A start value and a list of (op, operand) steps; running totals stay in [0, max_value].

    An operation that cannot apply (a multiplication past ``max_value``, a subtraction from 0, an addition at
    ``max_value``) is replaced by one that can, so every problem has exactly the drawn number of steps.
    """
    start = rng.randint(1, settings.max_start)
    value, steps = start, []
    for _ in range(rng.randint(settings.min_steps, settings.max_steps)):
        op = rng.choice(settings.ops)
        if op == "*":
            factor = rng.randint(2, settings.max_factor)
            if value * factor <= settings.max_value:
                steps.append(("*", factor))
                value *= factor
                continue
            op = "-"
        if op == "-" and value == 0:
            op = "+"
        elif op == "+" and value == settings.max_value:
            op = "-"
        if op == "-":
            operand = rng.randint(1, min(settings.max_operand, value))
            value -= operand
        else:
            operand = rng.randint(1, min(settings.max_operand, settings.max_value - value))
            value += operand
        steps.append((op, operand))
    return start, steps


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def _phrase(rng: random.Random, op: str, operand: int) -> str:
    if op == "+":
        return rng.choice(ADD_PHRASES).format(n=operand)
    if op == "-":
        return rng.choice(SUB_PHRASES).format(n=operand)
    return MUL_PHRASES.get(operand, MUL_GENERIC).format(k=operand)


def render(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> tuple[str, str, str]:
    """(question, worked solution, answer) for a drawn problem; wording is drawn from ``rng``."""
    name = rng.choice(sorted(NAMES))
    pronoun = NAMES[name]
    item = rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."]
    i = 0
    while i < len(steps):  # one or two steps per sentence: "He buys 5 more and gives away 3."
        take = 2 if i + 1 < len(steps) and rng.random() < 0.5 else 1
        phrases = [_phrase(rng, op, operand) for op, operand in steps[i : i + take]]
        sentences.append(f"{pronoun.capitalize()} {' and '.join(phrases)}.")
        i += take
    sentences.append(f"How many {item} does {pronoun} have now?")

    value = start
    for op, operand in steps:
        value = _apply(value, op, operand)
    return " ".join(sentences), worked_solution(start, steps), str(value)


def iter_problems(split: str, seed: int = 0, settings: TaskSettings | None = None,
                  prefix: str = "arith") -> Iterator[Problem]:
    """Endless stream of distinct problems owned by ``split``, deterministic from ``(split, seed, settings)``; ids
    read ``<prefix>-<split>-<seed>-<i>`` (``prefix`` names the task variant: ``sdzero_pl.tasks.chain``)."""
    if split not in SPLIT_SHARES:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    settings = settings or TaskSettings()
    rng = _split_rng(split, seed)
    seen: set[str] = set()
    count = misses = 0
    while True:
        start, steps = _draw_steps(rng, settings)
        key = f"{start}" + "".join(f"{op}{operand}" for op, operand in steps)
        question, solution, answer = render(rng, start, steps)
        if split_of(key) != split or question in seen:
            misses += 1
            if misses > 1000 * (count + 1):
                raise RuntimeError(f"split {split!r} ran out of distinct problems after {count}: widen the settings")
            continue
        seen.add(question)
        yield Problem(id=f"{prefix}-{split}-{seed}-{count}", problem=question, answer=answer, solution=solution)
        count += 1


def generate_split(split: str, n: int, seed: int = 0, settings: TaskSettings | None = None,
                   prefix: str = "arith") -> list[Problem]:
    """The first ``n`` problems of ``iter_problems(split, seed, settings, prefix)``."""
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    stream = iter_problems(split, seed, settings, prefix)
    return [next(stream) for _ in range(n)]


# The problems the shipped base model (checkpoints/tiny-arith, scripts/train_tiny_base.py defaults) trained on: the
# first 40,000 of the train split at seed 0. Phase 1, Phase 2 and the held-out set own other hash splits.
BASE_TRAINING = ("train", 0, 40_000)
VALIDATION_SEED = 2_000_003  # not the base model's own model-selection stream (seed + 1_000_003)


def generate_validation(n: int, seed: int = 0, settings: TaskSettings | None = None,
                        base_training: tuple[str, int, int] = BASE_TRAINING) -> list[Problem]:
    """``n`` validation problems for tuning the methods of a comparison, disjoint from every other question set.

    They come from the ``train`` split (so their arithmetic is never that of a phase1, phase2 or held-out problem,
    which own other hash buckets), drawn with another seed, minus every problem whose ARITHMETIC (start value,
    operations, operands: its worked solution) the base model trained on (``base_training`` = split, seed, count;
    default the shipped model's): not only the same text, but no re-worded copy either. Ids are
    ``arith-validation-<seed>-<i>``; the held-out, phase1 and phase2 sets are unchanged by it."""
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    split, base_seed, count = base_training
    seen = {p.solution for p in generate_split(split, count, base_seed, settings)}
    out: list[Problem] = []
    for problem in iter_problems("train", seed + VALIDATION_SEED, settings):
        if len(out) == n:
            break
        if problem.solution not in seen:
            seen.add(problem.solution)  # one wording per arithmetic within the validation set too
            out.append(Problem(f"arith-validation-{seed}-{len(out)}", problem.problem, problem.answer,
                               problem.solution))
    return out


def write_jsonl(problems: list[Problem], path: str | Path) -> Path:
    """One ``{"id", "problem", "answer", "solution"}`` row per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_row()) + "\n")
    return path


# Neutral "look again" interjections for the base model's retry examples (see `retry_example`). They say nothing
# about whether the first attempt was right and share no wording with SD-Zero's control phrases (docs/method.md), so the
# base model learns only "after an interjection, solve the problem again"; which phrase signals what is left for
# Phase 1 (self-revision training) to teach.
RETRY_PHRASES = (
    "Let me check this again.",
    "Let me go through it once more.",
    "Let me double-check the steps.",
    "Let me verify each step.",
    "Let me recompute it.",
    "Hmm, let me look again.",
    "Let me solve it again.",
    "One more time, step by step.",
    "Let me recheck the numbers.",
    "Let me try it again.",
    "OK, let me review that.",
    "Let me work through it again.",
)
_EQUATION = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")


def parse_steps(solution: str) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(op, operand), ...]) read back from a worked solution such as ``"7+5=12. 12-3=9. \\boxed{9}"``."""
    equations = _EQUATION.findall(solution)
    if not equations:
        raise ValueError(f"not a worked solution of this task: {solution!r}")
    return int(equations[0][0]), [(op, int(operand)) for _, op, operand, _ in equations]


def worked_solution(start: int, steps: list[tuple[str, int]], slip: tuple[int, int] | None = None) -> str:
    """One equation per step, then the boxed result. ``slip=(i, delta)`` adds ``delta`` to the result of step
    ``i`` and carries the wrong value through the later steps, like a real arithmetic mistake."""
    equations, value = [], start
    for i, (op, operand) in enumerate(steps):
        new = _apply(value, op, operand)
        if slip is not None and slip[0] == i:
            new += slip[1]
        equations.append(f"{value}{op}{operand}={new}.")
        value = new
    return " ".join(equations) + f" \\boxed{{{value}}}"


def retry_example(problem: Problem, rng: random.Random, slip_prob: float = 0.5) -> tuple[str, str, str]:
    """(first attempt, interjection, second attempt) for one problem; the second attempt is always the worked
    solution, the first is that solution or, with probability ``slip_prob``, one with an arithmetic slip."""
    start, steps = parse_steps(problem.solution)
    first = problem.solution
    if rng.random() < slip_prob:
        for _ in range(10):  # a slip that keeps every running total >= 0 and changes the answer
            slip = (rng.randrange(len(steps)), rng.choice((-10, -2, -1, 1, 2, 10)))
            candidate = worked_solution(start, steps, slip)
            if "-" not in "".join(re.findall(r"=(-?\d+)", candidate)) and candidate != first:
                first = candidate
                break
    return first, rng.choice(RETRY_PHRASES), problem.solution


# Feedback interjections for the "feedback" retry style (`feedback_retry_example`): what an instruct LLM brings to
# SD-Zero from pre-training - it understands "that is not correct" - taught here in the base model's own training.
# None of them is one of SD-Zero's control phrases (tests check); mapping those phrases to the reward is Phase 1's.
FEEDBACK_PHRASES = {
    0: (
        "Hmm, that is not correct. Let me fix it.",
        "That answer is wrong, let me find the error.",
        "No, this is not correct. Let me redo it.",
        "Something is wrong here. Let me check the steps.",
    ),
    1: (
        "That is correct. Let me write it once more.",
        "Yes, this checks out. Once more:",
        "Good, that is right. Again, cleanly:",
        "This is correct. Let me restate it.",
    ),
}
ERROR_KINDS = ("slip", "misread", "flip")


def attempt_with_error(start: int, steps: list[tuple[str, int]], rng: random.Random, kind: str) -> str | None:
    """A wrong attempt of the kinds the model makes itself: ``slip`` (one result off, carried on), ``misread`` (one
    operand read as another number) or ``flip`` (one operation read as its opposite), the later steps computed
    correctly from the wrong value. None when no such attempt keeps every running total >= 0 and changes the answer.
    """
    right = worked_solution(start, steps)
    for _ in range(10):
        i = rng.randrange(len(steps))
        op, operand = steps[i]
        if kind == "slip":
            candidate = worked_solution(start, steps, (i, rng.choice((-10, -2, -1, 1, 2, 10))))
        elif kind == "misread":
            other = rng.choice([n for n in range(max(1, operand - 3), operand + 4) if n != operand])
            candidate = worked_solution(start, steps[:i] + [(op, other)] + steps[i + 1 :])
        elif kind == "flip" and op in "+-":
            candidate = worked_solution(start, steps[:i] + [("-" if op == "+" else "+", operand)] + steps[i + 1 :])
        else:
            continue
        if "-" not in "".join(re.findall(r"=(-?\d+)", candidate)) and candidate.split("\\boxed")[-1] != right.split(
                "\\boxed")[-1]:
            return candidate
    return None


def feedback_retry_example(problem: Problem, rng: random.Random, error_prob: float = 0.5) -> tuple[str, str, str]:
    """(first attempt, feedback, second attempt): with probability ``error_prob`` the attempt is wrong (a slip, a
    misread operand or a flipped operation) and the feedback says so; otherwise it is right and the feedback
    confirms it. The second attempt is always the worked solution: a fix of the wrong step, or a restatement."""
    start, steps = parse_steps(problem.solution)
    if rng.random() < error_prob:
        for kind in rng.sample(ERROR_KINDS, len(ERROR_KINDS)):
            wrong = attempt_with_error(start, steps, rng, kind)
            if wrong is not None:
                return wrong, rng.choice(FEEDBACK_PHRASES[0]), problem.solution
    return problem.solution, rng.choice(FEEDBACK_PHRASES[1]), problem.solution


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """``--min_steps`` ... ``--max_value`` flags, one per :class:`TaskSettings` field, same defaults."""
    defaults = TaskSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"task difficulty (default {value})")


def settings_from_args(args: argparse.Namespace) -> TaskSettings:
    return TaskSettings(**{name: getattr(args, name) for name in asdict(TaskSettings())})


# ----------------------------------------------------------------------------------------------------- reward
def worked_steps_valid(completion: str) -> bool:
    """True when the completion's final solution is a chain of correct equations ending in its boxed value.

    The final solution is the text after the last blank line (a completion that revises itself is judged by its
    last attempt, as the math reward judges its last ``\\boxed{}``). It must read ``e1. e2. ... \\boxed{v}`` where
    every ``e_i`` is ``a<op>b=c`` with ``c`` the true result, every chain link starts from the previous result,
    and ``v`` is the last result. The answers of this task are small integers, so a wrong chain of steps lands on
    the right number by luck about one time in twenty; this check removes those lucky answers.
    """
    final = completion.strip().split("\n\n")[-1].strip()
    box = final.rfind("\\boxed{")
    if box < 0 or not final.endswith("}"):
        return False
    steps = [s.strip() for s in final[:box].strip().split(".") if s.strip()]
    if not steps:
        return False
    previous = None
    for step in steps:
        match = _EQUATION.fullmatch(step + ".")
        if match is None:
            return False
        left, op, operand, result = int(match[1]), match[2], int(match[3]), int(match[4])
        if _apply(left, op, operand) != result or (previous is not None and left != previous):
            return False
        previous = result
    return final[box + len("\\boxed{") : -1].strip() == str(previous)


def first_error(completion: str, solution: str) -> int | None:
    """Character index in ``completion`` of its first wrong token against the reference worked ``solution``: the
    step verifier of this task (the probe's "where is the first error"). The task's solutions are canonical (one
    equation per step, in the order the question tells them), so the first character where the completion's
    final attempt (after its last blank line) leaves the reference is where it went wrong: a slip in a result,
    a misread operand, a flipped operation. None when that attempt IS the reference solution."""
    start = completion.rstrip().rfind("\n\n")
    offset = start + 2 if start >= 0 else 0
    attempt = completion[offset:]
    for i, (a, b) in enumerate(zip(attempt, solution)):
        if a != b:
            return offset + i
    if attempt.strip() == solution.strip():
        return None
    return offset + min(len(attempt), len(solution))  # one is a prefix of the other: it stops or runs on there


class ArithmeticReward(MathReward):
    """The demo task's verifier: the math reward (last ``\\boxed{}`` equals the answer) AND a valid worked
    solution (:func:`worked_steps_valid`). Still one binary reward per completion from the question's answer
    alone; it only refuses right numbers reached through wrong arithmetic."""

    def __call__(self, completions: Sequence[str], answers: Sequence[Any]) -> RewardBatch:
        batch = super().__call__(completions, answers)
        for i, completion in enumerate(completions):
            if batch.rewards[i] == 1.0 and not worked_steps_valid(completion):
                batch.rewards[i] = 0.0
                if batch.errors:
                    batch.errors[i] = "the worked steps do not add up"
        return batch

    def first_error(self, completion: str, question: Question) -> int | None:
        """The :class:`~sdzero_pl.tasks.base.StepVerifier` side: :func:`first_error` against the question's
        reference solution (load the questions with ``solution_field="solution"``)."""
        if question.solution is None:
            raise ValueError(f"question {question.id} has no reference solution: load the questions with "
                             "`solution_field=solution` to locate errors")
        return first_error(completion, question.solution)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a split of the arithmetic word-problem task as JSONL.")
    parser.add_argument("--split", required=True, choices=(*SPLITS, "validation"),
                        help="a hash split, or 'validation' (train split, another seed, minus the base model's "
                             "training arithmetic: see generate_validation)")
    parser.add_argument("--n", type=int, required=True, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .jsonl path")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    problems = (generate_validation(args.n, args.seed, settings) if args.split == "validation"
                else generate_split(args.split, args.n, args.seed, settings))
    path = write_jsonl(problems, args.out)
    print(f"wrote {args.n} {args.split} problems to {path}")


if __name__ == "__main__":
    main()

