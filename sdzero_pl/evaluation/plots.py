"""Figures from a run's logs, for a README or a paper (matplotlib, object-oriented API: no pyplot state).

    python -m sdzero_pl.plots RUN_DIR [--out FIGDIR]

Reads every TensorBoard event file under RUN_DIR (all versions; each is one line per plot) and every
``self_localization/step_*/data.json`` the :class:`~callbacks.SelfLocalizationLogger` wrote, and writes PNGs:

* ``accuracy.png`` (avg@n / pass@k / revision accuracies), ``reward.png``, ``length.png``, ``kl.png``
  (``train/loss``, ``train/kl_*``), ``behaviour.png`` (self-revision phrase frequencies) - one panel per metric;
* ``self_localization_buckets.png``: the latest step's bucket shares and mean D_t per bucket (log scale), r=0
  against r=1 (the paper's analysis);
* ``self_localization_over_training.png``: the bucket shares of every logged step.

A figure whose metrics were never logged is not written. The command prints the paths it wrote.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from typing import Sequence

Series = dict[str, list[tuple[int, float]]]  # run label -> [(step, value)]

# First matching group wins; tags matching none (time/*, lr, ...) are not plotted.
GROUPS: list[tuple[str, str]] = [
    ("self_localization", r"^self_localization/"),
    ("behaviour", r"(^|/)behaviour/"),
    ("accuracy", r"(avg@|pass@|_acc(_|$)|correction_rate|regression_rate)"),
    ("kl", r"(^train/loss|kl_)"),
    ("reward", r"reward"),
    ("length", r"(len_|_tokens_mean|truncated_frac)"),
]
CURVE_FIGURES = ("accuracy", "reward", "length", "kl", "behaviour")


def require_matplotlib() -> None:
    """Raise a helpful ImportError early where matplotlib (an optional dependency of the analyses) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("plots and the self-localization figures need matplotlib: pip install matplotlib") from error


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# ------------------------------------------------------------------------------------------------- reading
def read_scalars(run_dir: str) -> dict[str, Series]:
    """``{tag: {run label: [(step, value), ...]}}`` from every event file under ``run_dir``; the run label is the
    event file's directory relative to ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, Series] = {}
    paths = sorted(glob.glob(os.path.join(run_dir, "**", "*tfevents*"), recursive=True))
    for path in paths:
        label = os.path.relpath(os.path.dirname(path), run_dir)
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = scalars.setdefault(tag, {}).setdefault(label, [])
            points.extend((event.step, event.value) for event in accumulator.Scalars(tag))
    for series in scalars.values():
        for label in series:
            series[label].sort()
    return scalars


def read_self_localization(run_dir: str) -> list[dict]:
    """Every ``data.json`` of the self-localization logger under ``run_dir``, sorted by step (buckets only)."""
    reports = []
    for path in glob.glob(os.path.join(run_dir, "**", "step_*", "data.json"), recursive=True):
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if "buckets" in data:
            reports.append({"step": data["step"], "buckets": data["buckets"], "path": path})
    return sorted(reports, key=lambda r: r["step"])


def group_tags(tags: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {name: [] for name, _ in GROUPS}
    for tag in sorted(tags):
        for name, pattern in GROUPS:
            if re.search(pattern, tag):
                groups[name].append(tag)
                break
    return groups


# ------------------------------------------------------------------------------------------------- figures
def curves_figure(scalars: dict[str, Series], tags: Sequence[str], title: str):
    """One panel per tag, one line per run, x = global step."""
    columns = min(3, len(tags))
    rows = math.ceil(len(tags) / columns)
    figure = _figure(4.2 * columns, 3.0 * rows)
    figure.suptitle(title)
    for index, tag in enumerate(tags):
        axis = figure.add_subplot(rows, columns, index + 1)
        for label, points in scalars[tag].items():
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        axis.set_title(tag, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(scalars[tag]) > 1:
            axis.legend(fontsize=6)
    return figure


def behaviour_figure(scalars: dict[str, Series], tags: Sequence[str]):
    """Behaviour over training in three panels: response length, phrase occurrences per response (one line per
    phrase) and share of responses holding each phrase."""
    panels = [
        ("response length", [t for t in tags if "/len_" in t], ""),
        ("occurrences per response", [t for t in tags if t.endswith("_per_response")], "_per_response"),
        ("share of responses holding the phrase", [t for t in tags if t.endswith("_any")], "_any"),
    ]
    panels = [p for p in panels if p[1]]
    figure = _figure(5.0 * len(panels), 3.8)
    figure.suptitle("behaviour over training")
    for index, (title, panel_tags, suffix) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), index + 1)
        for tag in panel_tags:
            # "behaviour/..." comes from training rollouts, "eval/behaviour/..." from BenchmarkEval's samples
            name = tag.rsplit("/", 1)[-1].removesuffix(suffix) + (" (eval)" if tag.startswith("eval/") else "")
            for label, points in scalars[tag].items():
                steps, values = zip(*points)
                run = f" ({label})" if len(scalars[tag]) > 1 else ""
                axis.plot(steps, values, marker=".", label=name + run)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    return figure


def bucket_figure(shares: dict[str, Sequence[float] | None], title: str,
                  means: dict[str, Sequence[float | None] | None] | None = None):
    """The paper's bucket analysis, r=0 vs r=1: each D_t bucket's share of its class's total divergence (0 = highest
    D_t); with ``means``, a second panel with each bucket's mean D_t on a log scale, the absolute level the shares
    hide (both classes can put ~95% of their mass in bucket 0 while right answers sit far lower)."""
    figure = _figure(12.0 if means else 7.0, 3.5)
    styles = {"r0": ("wrong (r=0)", "tab:red", -0.2), "r1": ("right (r=1)", "tab:blue", 0.2)}
    num_buckets = max((len(v) for v in shares.values() if v), default=0)
    axis = figure.add_subplot(1, 2 if means else 1, 1)
    for key, values in shares.items():
        if values:
            label, color, offset = styles[key]
            axis.bar([i + offset for i in range(len(values))], values, width=0.4, color=color, label=label)
    if num_buckets:
        axis.axhline(1.0 / num_buckets, color="gray", linestyle="--", linewidth=1, label="uniform")
        axis.legend()
    axis.set_xticks(range(num_buckets))
    axis.set_xlabel(f"D_t bucket (tokens sorted by divergence, highest first; {num_buckets} buckets)")
    axis.set_ylabel("share of the class's total divergence")
    axis.set_title(title)
    if means:
        axis = figure.add_subplot(1, 2, 2)
        for key, values in means.items():
            positive = [(i, v) for i, v in enumerate(values or []) if v is not None and v > 0]
            if positive:  # a log axis cannot show 0: empty or all-zero buckets are left out
                label, color, _ = styles[key]
                axis.plot([i for i, _ in positive], [v for _, v in positive], marker="o", color=color, label=label)
        axis.set_yscale("log")
        axis.set_xticks(range(num_buckets))
        axis.set_xlabel("D_t bucket (highest first)")
        axis.set_ylabel("mean D_t in the bucket (log scale)")
        axis.set_title("absolute level: wrong vs right")
        axis.grid(alpha=0.3, which="both")
        if axis.lines:
            axis.legend()
    return figure


def bucket_evolution_figure(reports: Sequence[dict]):
    """Bucket shares of every logged step (darker = later), r=0 and r=1 side by side."""
    figure = _figure(10.0, 3.5)
    for index, (key, name) in enumerate((("r0", "wrong (r=0)"), ("r1", "right (r=1)"))):
        axis = figure.add_subplot(1, 2, index + 1)
        plotted = 0
        for position, report in enumerate(reports):
            values = report["buckets"][key]["shares"]
            if values:
                shade = 0.25 + 0.75 * (position + 1) / len(reports)
                axis.plot(range(len(values)), values, color=(0.0, 0.0, 0.0, shade), label=f"step {report['step']}")
                plotted += 1
        if not plotted:
            axis.text(0.5, 0.5, "no responses with this reward", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(name)
        axis.set_xlabel("D_t bucket (highest first)")
        axis.set_ylabel("share of total divergence")
        axis.grid(alpha=0.3)
        if 0 < plotted <= 8:
            axis.legend(fontsize=7)
    return figure


# ------------------------------------------------------------------------------------------------ command
def write_figures(run_dir: str, out_dir: str) -> list[str]:
    """Every figure the run's logs allow, as PNGs in ``out_dir``; returns the paths written."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    scalars, reports = read_scalars(run_dir), read_self_localization(run_dir)
    if not scalars and not reports:
        raise FileNotFoundError(f"{run_dir!r} holds no TensorBoard event files and no self-localization data")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    groups = group_tags(list(scalars))
    for name in CURVE_FIGURES:
        if groups[name]:
            figure = (behaviour_figure(scalars, groups[name]) if name == "behaviour"
                      else curves_figure(scalars, groups[name], name))
            written.append(_save(figure, out_dir, name))
    if reports:
        latest = reports[-1]
        shares = {k: v["shares"] for k, v in latest["buckets"].items()}
        means = {k: v.get("means") for k, v in latest["buckets"].items()}  # data.json of older runs has no means
        written.append(_save(bucket_figure(shares, f"self-localization, step {latest['step']}",
                                           means if any(means.values()) else None), out_dir,
                             "self_localization_buckets"))
        written.append(_save(bucket_evolution_figure(reports), out_dir, "self_localization_over_training"))
    return written


def _save(figure, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    figure.savefig(path, dpi=150)
    return path


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run's log directory (searched recursively for event files)")
    parser.add_argument("--out", default=None, help="where the PNGs go; default RUN_DIR/figures")
    args = parser.parse_args(argv)
    written = write_figures(args.run_dir, args.out or os.path.join(args.run_dir, "figures"))
    for path in written:
        print(path)  # the CLI's output: the paths it wrote
    return written


if __name__ == "__main__":
    main()
