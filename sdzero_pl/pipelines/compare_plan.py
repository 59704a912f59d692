"""What the comparison runs, in which order, what each step waits on and where it writes (pure planning and
layout; the steps themselves are :mod:`sdzero_pl.pipelines.compare`'s)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

METHODS = ("base", "rft", "grpo", "sdft", "sdft_answer", "srt", "sdzero", "control")
LABELS = {"base": "base", "rft": "RFT", "grpo": "GRPO", "sdft": "SDFT", "sdft_answer": "SDFT (final answer only)",
          "srt": "SRT (Phase 1)", "sdzero": "SD-Zero", "control": "control (shuffled reward)"}
START = {"sdzero": "srt", "control": "srt"}  # trained from another method's model; the rest start from the base
REFERENCE = "sdzero"

# ----------------------------------------------------------------------------------------------------- steps
KINDS = ("train", "eval", "premise")


@dataclass(frozen=True)
class Step:
    seed: int
    method: str
    kind: str  # "train" | "eval" | "premise" (the measurement of its premise, on the validation split)
    point: int | None = None  # a tuning grid point: trained on the tuning seed, evaluated on the validation split

    def __str__(self) -> str:
        return f"{self.seed}:{self.method}:{self.kind}" + ("" if self.point is None else f":{self.point}")

    @classmethod
    def parse(cls, text: str) -> Step:
        parts = text.split(":")
        if (len(parts) not in (3, 4) or not parts[0].isdigit() or parts[1] not in METHODS or parts[2] not in KINDS
                or parts[1:3] == ["base", "train"] or (parts[2] == "premise" and parts[1] not in KIND_OF_PREMISE)
                or (len(parts) == 4 and (not parts[3].isdigit() or parts[2] == "premise"))):
            raise ValueError(f"`--only-step` must be SEED:METHOD:KIND[:POINT] (KIND train | eval | premise; base has "
                             f"no train; premise: {' | '.join(KIND_OF_PREMISE)}), got {text!r}")
        return cls(int(parts[0]), parts[1], parts[2], int(parts[3]) if len(parts) == 4 else None)


KIND_OF_PREMISE = ("srt", "sdft", "sdft_answer")


@dataclass(frozen=True)
class TunePlan:
    seed: int  # the tuning seed (not one of the final seeds)
    sizes: dict[str, int]  # method -> number of grid points


def plan(methods: Sequence[str], seeds: Sequence[int], tune: TunePlan | None = None,
         premise: Sequence[str] = ()) -> list[Step]:
    """Every step, in the order they are started: tuning first, then training, SRT's first of all (two methods
    wait on it), the premise measurements (``premise``: :func:`premise_methods`), the evaluations."""
    order = sorted(methods, key=lambda m: (m != "srt", METHODS.index(m)))
    tuned = [m for m in order if tune is not None and m in tune.sizes]
    steps = [Step(tune.seed, m, kind, p) for kind in ("train", "eval") for m in tuned for p in range(tune.sizes[m])]
    return (steps + [Step(s, m, "train") for m in order if m != "base" for s in seeds]
            + [Step(s, m, "premise") for m in premise for s in seeds]
            + [Step(s, m, "eval") for m in order for s in seeds])


def _grid_evals(tune: TunePlan | None, method: str) -> list[Step]:
    if tune is None or method not in tune.sizes:
        return []
    return [Step(tune.seed, method, "eval", p) for p in range(tune.sizes[method])]


def needs(step: Step, tune: TunePlan | None = None) -> list[Step]:
    """The steps ``step`` reads. A grid point of SD-Zero / the control starts from the SRT grid point chosen on
    validation (so it waits on every SRT grid evaluation); a final run of a tuned method waits on its own grid."""
    if step.kind == "premise":
        return [Step(step.seed, "srt", "train")] if step.method == "srt" else []
    if step.kind == "eval":
        return [] if step.method == "base" else [Step(step.seed, step.method, "train", step.point)]
    start = START.get(step.method)
    if step.point is not None:
        return _grid_evals(tune, start) if start else []
    return ([Step(step.seed, start, "train")] if start else []) + _grid_evals(tune, step.method)


# ---------------------------------------------------------------------------------------------------- layout
def seed_dir(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"seed{seed}"


def run_dir(args: argparse.Namespace, seed: int, method: str, point: int | None = None) -> Path:
    """``<out>/seed<s>/<method>``; a grid point: ``<out>/tune/seed<s>/<method>/p<i>``."""
    if point is None:
        return seed_dir(args, seed) / method
    return args.out / "tune" / f"seed{seed}" / method / f"p{point}"


def export_dir(args: argparse.Namespace, seed: int, method: str, point: int | None = None) -> Path:
    return run_dir(args, seed, method, point) / "hf_model"


def eval_dir(args: argparse.Namespace, seed: int, method: str, point: int | None = None) -> Path:
    return run_dir(args, seed, method, point) / "eval" / ("heldout" if point is None else "validation")


def premise_dir(args: argparse.Namespace, seed: int, method: str) -> Path:
    return run_dir(args, seed, method) / "premise"


def log_path(args: argparse.Namespace, step: Step) -> Path:
    if step.point is not None:
        return run_dir(args, step.seed, step.method, step.point).parent.parent / f"{step.method}-p{step.point}.log"
    return seed_dir(args, step.seed) / f"{step.method}{'-premise' if step.kind == 'premise' else ''}.log"


def sample_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("samples_val_rank*.jsonl"))
