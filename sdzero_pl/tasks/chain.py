"""``chain``: the demo task's second variant, built so that SD-Zero's premise can hold (issue 19, item 4).

Not part of the paper. On the default arithmetic task (:mod:`sdzero_pl.tasks.arithmetic`: 2-3 additions and
subtractions of small numbers) the base model's errors are one-token sampling slips it already rates unlikely, so
plain sharpening removes them and the reviser has nothing to add (docs/demo_task.md). This variant changes two
things, and reuses everything else (rendering, hash splits, :class:`~sdzero_pl.tasks.ArithmeticReward`,
:func:`~sdzero_pl.tasks.arithmetic.first_error`):

- **harder problems** (:data:`CHAIN`): 3-5 steps, two-digit operands, doublings and triplings, so results carry
  across digits and operands must be re-read from a longer question: errors the generator makes with confidence;
- **localized retry examples** (:func:`localized_retry_example`) for the base model's training
  (``scripts/train_tiny_base.py --task chain --retry_style localized``): the attempt is one of the model's OWN
  sampled answers, the interjection says whether it is right (never one of SD-Zero's control phrases), and the
  target is the task's canonical worked solution. Because the solution is canonical, after a wrong attempt the
  target repeats the attempt's correct steps verbatim, fixes its first wrong step and recomputes what follows
  (:func:`first_wrong_step` says where); after a right attempt it restates it. Trained on its own errors, the
  reviser learns where ITS attempts go wrong, which is what the Phase-2 teacher must know at the first wrong token.

Question files of the variant (ids ``chain-<split>-<seed>-<i>``), including a validation split for tuning that
shares nothing with the held-out set or the base model's training problems (:func:`validation_split`):

    python -m sdzero_pl.tasks.chain --demo-data data/chain
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable

from sdzero_pl.tasks.arithmetic import (
    FEEDBACK_PHRASES, Problem, TaskSettings, generate_split, iter_problems, parse_steps, worked_steps_valid, write_jsonl
)
from sdzero_pl.tasks.math import extract_last_boxed

CHAIN = TaskSettings(min_steps=3, max_steps=5, max_start=40, max_operand=30, max_factor=3, ops="+-*", max_value=999)
"""The variant's difficulty: what ``checkpoints/tiny-chain`` was trained and measured on."""
PREFIX = "chain"
BASE_TRAIN = 40_000
"""How many ``train``-split problems (seed 0) the shipped base model trained on (``--n_train``)."""
VALIDATION_SEED = 2_000_003  # another stream than the base's own checkpoint selection (seed + 1_000_003)
DEMO_SIZES = {"phase1": 512, "phase2": 1024, "heldout": 200, "validation": 200}
_EQUATION = re.compile(r"\d+[+\-*]\d+=\d+\.")


def chain_split(split: str, n: int, seed: int = 0, settings: TaskSettings = CHAIN) -> list[Problem]:
    """The first ``n`` problems of the variant's ``split`` (the arithmetic task's generator at :data:`CHAIN`)."""
    return generate_split(split, n, seed, settings, prefix=PREFIX)


def arithmetic_key(problem: Problem) -> str:
    """A problem's arithmetic (start, operations, operands) read back from its solution, e.g. ``"7+5*2"``."""
    start, steps = parse_steps(problem.solution)
    return f"{start}" + "".join(f"{op}{operand}" for op, operand in steps)


def validation_split(n: int, exclude: Iterable[Problem], settings: TaskSettings = CHAIN,
                     seed: int = VALIDATION_SEED) -> list[Problem]:
    """``n`` problems of the ``train`` split (another seed than training) sharing neither text nor arithmetic
    with ``exclude`` (the base model's training problems): the data SRT and Phase-2 settings are tuned on. The
    held-out split is disjoint from it by construction (another hash split)."""
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    seen = {arithmetic_key(p) for p in exclude} | {p.problem for p in exclude}
    out: list[Problem] = []
    for index, p in enumerate(iter_problems("train", seed, settings, PREFIX)):
        if len(out) == n:
            return out
        if p.problem in seen or arithmetic_key(p) in seen:
            continue
        seen.add(arithmetic_key(p))
        out.append(Problem(id=f"{PREFIX}-validation-{len(out)}", problem=p.problem, answer=p.answer,
                           solution=p.solution))
        if index > 100 * (n + 1):
            raise RuntimeError(f"found only {len(out)} validation problems outside the excluded set")
    return out


def is_correct(completion: str, problem: Problem) -> bool:
    """What :class:`~sdzero_pl.tasks.ArithmeticReward` checks: the last boxed value is the answer and the final
    attempt is a valid chain of worked steps."""
    return extract_last_boxed(completion) == problem.answer and worked_steps_valid(completion)


def final_attempt(completion: str) -> str:
    """The text after the completion's last blank line (what the reward and :func:`first_error` judge)."""
    return completion.strip().split("\n\n")[-1].strip()


def first_wrong_step(attempt: str, solution: str) -> int | None:
    """Index of the first equation of ``attempt``'s final attempt that is not the reference ``solution``'s
    equation at that place (a missing or extra equation counts); None when every equation and the box match."""
    mine, reference = _EQUATION.findall(final_attempt(attempt)), _EQUATION.findall(solution)
    for i, (a, b) in enumerate(zip(mine, reference)):
        if a != b:
            return i
    if len(mine) != len(reference):
        return min(len(mine), len(reference))
    return None if extract_last_boxed(attempt) == extract_last_boxed(solution) else len(reference)


def localized_retry_example(problem: Problem, attempt: str, rng: random.Random) -> tuple[str, str, str]:
    """(attempt, interjection, target) for one of the model's own ``attempt`` at ``problem``: the interjection
    says whether the attempt is right (:data:`~sdzero_pl.tasks.arithmetic.FEEDBACK_PHRASES`, none of them an
    SD-Zero control phrase); the target is the canonical worked solution, i.e. the attempt's correct steps
    repeated, its first wrong step fixed and what follows recomputed, or the attempt restated when it is right."""
    phrase = rng.choice(FEEDBACK_PHRASES[int(is_correct(attempt, problem))])
    return final_attempt(attempt), phrase, problem.solution


def write_demo_data(directory: str | Path, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """The variant's question files for the demo and the comparison: ``phase1``, ``phase2``, ``heldout`` (seed 0),
    ``validation`` (:func:`validation_split` against the base model's :data:`BASE_TRAIN` training problems) and
    ``train`` (phase1 + phase2 shuffled once, seed 0: the baselines' pool). Deterministic; files that exist are
    kept (written aside and renamed, so parallel runs can share the folder)."""
    sizes = dict(DEMO_SIZES if sizes is None else sizes)
    directory = Path(directory)
    paths = {split: directory / f"{split}.jsonl" for split in (*sizes, "train")}
    if all(path.exists() for path in paths.values()):  # the comparison asks once per step: 1.6 s of generation
        return paths
    problems: dict[str, list[Problem]] = {}
    for split, n in sizes.items():
        if split == "validation":
            problems[split] = validation_split(n, chain_split("train", BASE_TRAIN, 0))
        else:
            problems[split] = chain_split(split, n, 0)
    union = problems.get("phase1", []) + problems.get("phase2", [])
    random.Random(0).shuffle(union)
    problems["train"] = union
    for split, path in paths.items():
        if not path.exists():
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            write_jsonl(problems[split], tmp)
            os.replace(tmp, path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the chain variant's question files as JSONL.")
    parser.add_argument("--demo-data", type=Path, default=None, metavar="DIR",
                        help="write every demo split (phase1, phase2, heldout, validation, train) into DIR")
    parser.add_argument("--split", choices=("train", "phase1", "phase2", "heldout"), default=None)
    parser.add_argument("--n", type=int, default=None, help="number of problems (with --split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output .jsonl path (with --split)")
    args = parser.parse_args(argv)
    if args.demo_data is not None:
        paths = write_demo_data(args.demo_data)
        print(json.dumps({split: str(path) for split, path in paths.items()}))
        return
    if args.split is None or args.n is None or args.out is None:
        parser.error("give --demo-data DIR, or --split, --n and --out")
    write_jsonl(chain_split(args.split, args.n, args.seed), args.out)
    print(f"wrote {args.n} {args.split} problems to {args.out}")


if __name__ == "__main__":
    main()
