"""The comparison's tuning grids and how a setting is chosen (pure functions; :mod:`sdzero_pl.pipelines.compare`
runs them with ``--tune``).

Every method gets the same budget: a grid of two axes, three values each by default (``--tune-shape 3x3``), centred
on the shipped config's values so that today's setting is a point of the grid. Each point is trained once (the
tuning seed) and scored on the VALIDATION split only (same k, same sampler as the held-out evaluation); the point
with the highest validation avg@k is chosen (:func:`choose`; ties: :data:`TIE_RULE`), and the final runs use it on
every seed, evaluated on the held-out set once per seed.

A reduced grid (``--tune-shape 2x2``, ``3x1``, ...) keeps the same values for every method: per axis the centre
first, then the value below it, then the one above (:func:`reduce_axis`), so every method loses the same points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import product
from typing import Sequence

TIE_RULE = ("highest validation avg@k; ties (equal to 1e-9) go to the point nearest the shipped setting (grid "
            "centre, by index distance), then to the earlier point in grid order (lower learning rate, then fewer "
            "epochs / steps / updates)")


@dataclass(frozen=True)
class Axis:
    """One tuned hyperparameter: its name in the report, and per value (ascending) its label and the CLI flags
    that set it."""

    name: str
    values: tuple[tuple[str, tuple[str, ...]], ...]
    centre: int  # index of the shipped config's value

    def __post_init__(self) -> None:
        if not self.values or not 0 <= self.centre < len(self.values):
            raise ValueError(f"axis {self.name!r}: centre {self.centre} is not one of its {len(self.values)} values")


def axis(name: str, flag: str, values: Sequence, centre: int = 1) -> Axis:
    """An axis whose value goes into one flag: ``axis("lr", "--model.optim.lr", [1e-4, 2e-4, 4e-4])``."""
    return Axis(name, tuple((f"{v:g}" if isinstance(v, float) else str(v), (f"{flag}={v}",)) for v in values), centre)


@dataclass(frozen=True)
class Point:
    index: int  # position in the (reduced) grid, row-major over the axes
    setting: tuple[tuple[str, str], ...]  # (axis name, value label) per axis
    flags: tuple[str, ...]
    distance: int  # index distance from the shipped setting (0: the shipped setting itself)

    def __str__(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.setting)


def reduce_axis(ax: Axis, size: int) -> Axis:
    """``size`` values of ``ax``: the centre, then the next below, then the next above, ... (kept in ascending
    order)."""
    if not 1 <= size <= len(ax.values):
        raise ValueError(f"axis {ax.name!r} has {len(ax.values)} values, cannot keep {size}")
    order = [ax.centre]
    for step in range(1, len(ax.values)):
        order += [i for i in (ax.centre - step, ax.centre + step) if 0 <= i < len(ax.values)]
    keep = sorted(order[:size])
    return Axis(ax.name, tuple(ax.values[i] for i in keep), keep.index(ax.centre))


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x3"`` -> (3, 3)."""
    if not re.fullmatch(r"[1-9](x[1-9])*", text):
        raise ValueError(f"`--tune-shape` must be like 3x3 or 2x1 (values per axis), got {text!r}")
    return tuple(int(n) for n in text.split("x"))


def points(grid: Sequence[Axis], shape: Sequence[int] | None = None) -> list[Point]:
    """Every point of ``grid`` (reduced to ``shape`` values per axis when given), row-major: the first axis
    slowest."""
    if shape is not None:
        if len(shape) != len(grid):
            raise ValueError(f"`--tune-shape` gives {len(shape)} axes, the grid has {len(grid)} "
                             f"({', '.join(a.name for a in grid)})")
        grid = [reduce_axis(a, n) for a, n in zip(grid, shape)]
    out = []
    for index, combo in enumerate(product(*(range(len(a.values)) for a in grid))):
        setting = tuple((a.name, a.values[i][0]) for a, i in zip(grid, combo))
        flags = tuple(flag for a, i in zip(grid, combo) for flag in a.values[i][1])
        out.append(Point(index, setting, flags, sum(abs(i - a.centre) for a, i in zip(grid, combo))))
    return out


def choose(grid_points: Sequence[Point], scores: Sequence[float]) -> int:
    """Index of the chosen point (:data:`TIE_RULE`). ``scores``: validation avg@k per point, in order."""
    if len(grid_points) != len(scores) or not scores:
        raise ValueError(f"need one score per grid point, got {len(scores)} for {len(grid_points)}")
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"a grid point has no validation score: {list(scores)}")
    best = max(scores)
    tied = [p for p, s in zip(grid_points, scores) if s >= best - 1e-9]
    return min(tied, key=lambda p: (p.distance, p.index)).index


def tuning_table(tuning: dict, k: int, labels: dict[str, str]) -> str:
    """Markdown: per method every grid point's validation avg@k, the chosen one in bold."""
    if not tuning:
        return ""
    first = next(iter(tuning.values()))
    lines = ["", f"Tuning (validation split, {first['questions']} questions, seed {first['seed']}, {k} samples each; "
             f"{TIE_RULE}):", "", f"| method | setting | validation avg@{k} | |", "|---|---|---|---|"]
    for method, record in tuning.items():
        start = record.get("start")  # the model every grid point was trained from, when another method's
        label = labels[method] + (f" (from {labels[start['method']]} {start['setting']})" if start else "")
        for i, point in enumerate(record["points"]):
            score = f"{100 * point['score']:.1f}"
            chosen = i == record["chosen"]
            tags = ", ".join(t for t, on in (("chosen", chosen), ("shipped", point["distance"] == 0)) if on)
            setting = f"**{point['setting']}**" if chosen else point["setting"]
            lines.append(f"| {label if i == 0 else ''} | {setting} | {score} | {tags} |")
    return "\n".join(lines) + "\n"
