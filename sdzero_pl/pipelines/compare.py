"""The paper's comparison table (docs/method.md, "Results", Table 1) in one command, over several seeds.

    python -m sdzero_pl.compare [--out runs/compare] [--seeds 0 1 2 3 4] [--methods base rft grpo ...]
                                [--suite demo|qwen] [--jobs N] [--k 4] [--threads 1] [--<method>-arg FLAG ...]
                                [--tune [--tune-shape 3x3] [--tune-seed 1000] [--tune-questions N]]
                                [--premise-questions 200 | --no-premises]

For each seed it trains every method on the same questions, evaluates all of them on the same held-out set (every
sample saved) and writes ``<out>/comparison.md`` / ``comparison.json``: per method the held-out avg@k and pass@k
(mean and standard deviation over seeds), mean length, the generations and generated tokens it trained on
(``budget.json``; cumulative for SD-Zero and the control: Phase 1 + Phase 2), and a paired test against SD-Zero.

Methods: ``base`` (no training), ``rft``, ``grpo``, ``sdft`` (teacher conditioned on a demonstration),
``sdft_answer`` (on the final answer only) from the base model; ``srt`` (Phase 1); ``sdzero`` (Phase 2 from SRT);
``control`` (Phase 2 from SRT with the control phrase picked by a shuffled reward: same steps, no signal).
Suites: ``demo`` = ``configs/demo/<method>.yaml`` on ``checkpoints/tiny-arith`` and the arithmetic task
(:mod:`sdzero_pl.pipelines.demo`); ``qwen`` = the Qwen configs (GPU). Demo questions: SRT on the phase1 split, SD-Zero and
the control on phase2, the baselines on ``data/train.jsonl``, the union of both (shuffled once, seed 0), the way
the paper trains its baselines on questions of the same pool; each config's header gives its generation budget.

Layout: ``<out>/seed<s>/<method>/`` (``hf_model``, logs, ``eval/heldout``), the same as the demo's for srt and
sdzero; each step's output goes to ``<out>/seed<s>/<method>.log``. A finished step (its directory complete:
``is_complete``, the demo's check) is reused (delete its folder to redo it), so an interrupted comparison continues
where it stopped. ``--jobs N`` runs independent steps as N worker
processes (``python -m sdzero_pl.compare ... --only-step SEED:METHOD:KIND``); a failing step is reported with its
log, the others go on, and the table is written once every step has succeeded.

Tuning (``--tune``, suites with a validation split): every method's grid (:mod:`sdzero_pl.pipelines.tuning`, the
suite's ``grids``: learning rate x epochs / Phase-2 steps / GRPO updates per rollout batch, centred on the
shipped config) is trained on ``--tune-seed`` and scored on the validation split only (same k, same sampler); the
best point by validation avg@k is chosen and the final runs use it on every seed, each evaluated on the held-out set
once. SD-Zero's and the control's grid points start from the SRT point chosen on validation, their final runs from
that seed's final SRT model. Layout: ``<out>/tune/seed<t>/<method>/p<i>/`` (``hf_model``, ``eval/validation``), logs
``<out>/tune/seed<t>/<method>-p<i>.log``; the table adds each row's chosen setting and a tuning table (every point's
validation score).

Premises (suites with a validation split, unless ``--no-premises``): per seed the reviser probe of that seed's SRT
model and, for SDFT, its teacher against its student (:mod:`sdzero_pl.evaluation.premises`), in
``<out>/seed<s>/<method>/premise/``; a row whose premise fails is marked in the table.

Significance: per held-out question the accuracy (fraction of its k samples correct); three paired tests against
SD-Zero (:func:`~sdzero_pl.evaluation.stats.paired_comparison`): a hierarchical bootstrap over seeds and questions
(interval and p), a t-test over the seed-level means, and a sign-flip test over questions (accuracy averaged over
seeds). p-values no resample reached print as "< 1/N".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from sdzero_pl.cli import main as cli
from sdzero_pl.core.artifacts import atomic_write_json, atomic_write_text, is_complete
from sdzero_pl.data.records import read_trace_file
from sdzero_pl.evaluation.stats import mean_std, paired_comparison, question_accuracy
from sdzero_pl.evaluation.tables import comparison_table, json_safe
from sdzero_pl.pipelines import demo, scheduler, tuning
from sdzero_pl.pipelines.compare_plan import (
    KIND_OF_PREMISE, KINDS, LABELS, METHODS, REFERENCE, START, Step, TunePlan, eval_dir, export_dir, log_path, needs,
    plan, premise_dir, run_dir, sample_files
)
from sdzero_pl.pipelines.compare_premises import premise_methods, premise_verdicts, run_premise
from sdzero_pl.pipelines.compare_suites import CONFIGS, DATA_DIRS, DEMO_GRIDS, SUITES, Suite, question_files
from sdzero_pl.pipelines.scheduler import redirected

__all__ = ["CONFIGS", "DEMO_GRIDS", "KINDS", "KIND_OF_PREMISE", "LABELS", "METHODS", "REFERENCE", "START", "SUITES",
           "Step", "Suite", "TunePlan", "needs", "plan", "main"]


def finished(args: argparse.Namespace, step: Step) -> bool:
    """A step is finished when its output directory is complete (the one check the demo uses too)."""
    if step.kind == "premise":
        return is_complete(premise_dir(args, step.seed, step.method))
    if step.kind == "train" and step.point is None and args.tune_plan and step.method in args.tune_plan.sizes:
        # a tuned final run counts only once its grid is scored and it was trained with the setting chosen there
        if not all(finished(args, s) for s in needs(step, args.tune_plan) if s.point is not None):
            return False
        return (is_complete(export_dir(args, step.seed, step.method))
                and recorded_setting(args, step.seed, step.method) == str(chosen(args, step.method)))
    return is_complete(export_dir(args, step.seed, step.method, step.point) if step.kind == "train"
                       else eval_dir(args, step.seed, step.method, step.point))


def suite_questions(args: argparse.Namespace) -> dict[str, Path]:
    return question_files(args.suite, args.out)


def method_args(args: argparse.Namespace, method: str) -> list[str]:
    """The method's extra flags; the control also gets SD-Zero's, so the two stay identical but for the reward."""
    return [*(args.sdzero_arg if method == "control" else []), *getattr(args, f"{method}_arg")]


# ------------------------------------------------------------------------------------------------ tuning
def grid(args: argparse.Namespace, method: str) -> list[tuning.Point]:
    return tuning.points(SUITES[args.suite].grids[method], args.tune_shape)


def validation_score(args: argparse.Namespace, method: str, point: int) -> float:
    saved = json.loads((eval_dir(args, args.tune_seed, method, point) / "eval_val.json").read_text())
    return saved["results"]["average"][f"avg@{args.k}"]


def chosen(args: argparse.Namespace, method: str) -> tuning.Point | None:
    """The grid point chosen on validation (None when ``method`` is not tuned); its grid must be evaluated."""
    if args.tune_plan is None or method not in args.tune_plan.sizes:
        return None
    points = grid(args, method)
    return points[tuning.choose(points, [validation_score(args, method, p.index) for p in points])]


def setting_flags(args: argparse.Namespace, method: str, point: int | None) -> list[str]:
    """The grid flags of a grid point, or of the chosen point for a final run (none when not tuned)."""
    picked = grid(args, method)[point] if point is not None else chosen(args, method)
    return list(picked.flags) if picked else []


def tuning_summary(args: argparse.Namespace) -> dict:
    out = {}
    for method in args.tune_plan.sizes if args.tune_plan else ():
        points = grid(args, method)
        scores = [validation_score(args, method, p.index) for p in points]
        out[method] = {"seed": args.tune_seed, "questions": args.tune_questions, "shape": args.tune_shape,
                       "chosen": tuning.choose(points, scores), "rule": tuning.TIE_RULE,
                       "points": [{"setting": str(p), "flags": list(p.flags), "distance": p.distance, "score": s}
                                  for p, s in zip(points, scores)]}
        if method in START:  # every grid point trained from the start method's chosen grid point
            out[method]["start"] = {"method": START[method], "setting": str(chosen(args, START[method]))}
    return out


# ------------------------------------------------------------------------------------------------ one step
DATASET = {"srt": "phase1", "sdzero": "phase2", "control": "phase2"}  # demo: the rest train on data/train.jsonl


def recorded_setting(args: argparse.Namespace, seed: int, method: str) -> str | None:
    """The tuned setting a final run was trained with (``<run>/setting.json``), None when it has none."""
    path = run_dir(args, seed, method) / "setting.json"
    return json.loads(path.read_text())["setting"] if path.exists() else None


# Methods that collect their data from the base model before any weight changes (records file in their DATA_DIRS
# folder): the grid's axes (learning rate, epochs) do not enter the collection, so every grid point's is the same.
SHARED_COLLECTIONS = {"srt": "traces.jsonl", "rft": "samples.jsonl"}


def share_collection(args: argparse.Namespace, seed: int, method: str, point: int) -> None:
    """Start grid point ``point`` from an earlier grid point's finished collection instead of sampling it again
    (byte-identical: a collection's samples depend only on its settings and seed). Only when no grid flag is a
    ``--data.`` flag; the data module still checks the copied header's settings. Copied aside, then renamed."""
    name = SHARED_COLLECTIONS.get(method)
    if name is None or START.get(method) or any(f.startswith("--data.") for f in setting_flags(args, method, point)):
        return
    target = run_dir(args, seed, method, point) / DATA_DIRS[method] / name
    if target.exists():
        return
    for other in range(point):
        source = run_dir(args, seed, method, other) / DATA_DIRS[method] / name
        if source.is_file() and read_trace_file(source).finished is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            print(f"{method} grid point {point}: the finished collection of grid point {other} reused ({source})",
                  flush=True)
            return


def train(args: argparse.Namespace, seed: int, method: str, point: int | None = None) -> None:
    """One training run (a grid point when ``point`` is given) with the setting's grid flags, then the user's. A
    tuned final run records its setting; a finished one trained with another setting is an error, not reused."""
    extra = [*setting_flags(args, method, point), *method_args(args, method)]
    picked = chosen(args, method) if point is None else None
    if picked is not None:
        directory, recorded = run_dir(args, seed, method), recorded_setting(args, seed, method)
        if is_complete(directory / "hf_model") and recorded != str(picked):
            raise ValueError(f"{directory} was trained with setting {recorded or 'none recorded (not tuned)'}, "
                             f"validation now chooses {picked}: delete {directory} to train it with that setting")
        atomic_write_json(directory / "setting.json", {"setting": str(picked), "flags": list(picked.flags)})
    if method not in START:
        start = args.base
    elif point is not None:  # a grid point starts from the start method's chosen grid point (tuning seed)
        start = str(export_dir(args, seed, START[method], chosen(args, START[method]).index))
    else:
        start = str(export_dir(args, seed, START[method]))
    if SUITES[args.suite].validation:
        extra = [f"--data.questions.dataset={suite_questions(args)[DATASET.get(method, 'train')]}", *extra]
    config, fixed = SUITES[args.suite].configs[method]
    directory = run_dir(args, seed, method, point)
    if point is not None:
        share_collection(args, seed, method, point)
    data_dir = [f"--data.output_dir={directory / DATA_DIRS[method]}"] if method in DATA_DIRS else []
    demo.fit(config, directory, start, seed, [*fixed, *data_dir, *extra])


def evaluate(args: argparse.Namespace, seed: int, method: str, point: int | None = None) -> None:
    """Held-out evaluation of a final run, or validation evaluation of a grid point (same k and sampler)."""
    directory = eval_dir(args, seed, method, point)
    model = args.base if method == "base" else str(export_dir(args, seed, method, point))
    flags = [f"--model.num_samples={args.k}", f"--model.pass_k={sorted({1, args.k})}", "--model.save_samples=true",
             *args.eval_arg, *([f"--data.max_questions={args.tune_questions}"] if point is not None else [])]
    suite = SUITES[args.suite]
    if suite.validation:  # <seed>/<method>/eval/heldout; generate-then-revise is the demo's, not this table's
        split = "heldout" if point is None else "validation"
        overrides = [] if point is None else ['--data.benchmark_overrides={"validation": {"id_field": "id"}}']
        demo.evaluate(directory.parent.parent, directory.name, model, suite_questions(args)[split], seed,
                      ["--model.revise=false", *overrides, *flags], configs=suite.eval_config.parent)
    elif point is not None:
        raise ValueError(f"`--suite {args.suite}` has no validation split to evaluate grid points on")
    elif not is_complete(directory):
        cli(["validate", "--config", str(SUITES[args.suite].eval_config), f"--seed_everything={seed}",
             f"--model.model_name_or_path={model}", f"--model.results_dir={directory}", f"--model.seed={seed}",
             f"--trainer.default_root_dir={directory}", *flags])


def premise(args: argparse.Namespace, seed: int, method: str) -> None:
    """``srt``: the reviser probe of this seed's SRT model (with Phase 2's phrases); ``sdft`` / ``sdft_answer``: its
    teacher vs its student on the base model. On the first ``--premise-questions`` validation questions."""
    suite = SUITES[args.suite]
    config = suite.configs["sdzero" if method == "srt" else method][0]
    model = str(export_dir(args, seed, "srt")) if method == "srt" else args.base
    run_premise(method, model, suite_questions(args)["validation"], config, suite.eval_config,
                premise_dir(args, seed, method), args.premise_questions, seed)


def run_step(args: argparse.Namespace, step: Step) -> None:
    torch.set_num_threads(args.threads)
    if step.kind == "premise":
        premise(args, step.seed, step.method)
    else:
        (train if step.kind == "train" else evaluate)(args, step.seed, step.method, step.point)


# ------------------------------------------------------------------------------------------------ scheduling
def run_inline(args: argparse.Namespace, step: Step) -> bool:
    with redirected(log_path(args, step)):
        try:
            run_step(args, step)
            return True
        except BaseException:  # noqa: BLE001 - the CLI exits with SystemExit on a bad flag: a failed step too
            if scheduler.interrupted():  # Ctrl-C / SIGTERM, even as the CLI's SystemExit: stop the comparison
                raise KeyboardInterrupt from None
            traceback.print_exc()
            return False


def launch(args: argparse.Namespace, step: Step) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(log_path(args, step), "a") as handle:
        return subprocess.Popen([sys.executable, "-m", "sdzero_pl.pipelines.compare", *args.argv, "--only-step", str(step)],
                                stdout=handle, stderr=subprocess.STDOUT, env=env)


def run_steps(args: argparse.Namespace, steps: list[Step]) -> list[str]:
    """Runs the unfinished steps, at most ``--jobs`` at a time (:func:`~sdzero_pl.pipelines.scheduler.run_steps`)."""
    def describe(step: Step) -> str:
        where = "" if step.point is None else f" grid point {step.point} ({grid(args, step.method)[step.point]})"
        return f"seed {step.seed} {step.method}{where} {step.kind}"

    return scheduler.run_steps(steps, jobs=args.jobs, finished=lambda step: finished(args, step),
                               needs=lambda step: needs(step, args.tune_plan), describe=describe,
                               log=lambda step: log_path(args, step), run_here=lambda step: run_inline(args, step),
                               start=lambda step: launch(args, step))


# ----------------------------------------------------------------------------------------------------- table
def spread(values: dict[int, float]) -> dict:
    mean, std = mean_std(list(values.values()))
    return {"mean": mean, "std": std, "per_seed": {str(s): v for s, v in values.items()}}


def read_eval(args: argparse.Namespace, seed: int, method: str) -> tuple[dict, dict[tuple[str, str], float]]:
    """One evaluation's results (``{benchmark: metrics}``) and per-question accuracy."""
    directory = eval_dir(args, seed, method)
    saved = json.loads((directory / "eval_val.json").read_text())
    if saved["settings"]["num_samples"] != args.k:
        raise ValueError(f"{directory}: evaluated with {saved['settings']['num_samples']} samples per question, "
                         f"`--k` is {args.k}; delete the folder to evaluate again, or pass --k "
                         f"{saved['settings']['num_samples']}")
    records = [json.loads(line) for path in sample_files(directory) for line in path.read_text().splitlines() if line]
    return saved["results"], question_accuracy(records)


def collect(args: argparse.Namespace) -> dict:
    """Every number of the table, from the finished steps' files."""
    k, seeds = args.k, args.seeds
    evals = {m: {s: read_eval(args, s, m) for s in seeds} for m in args.methods}
    rows = {}
    for method in args.methods:
        results = {s: evals[method][s][0] for s in seeds}
        totals = {s: ({} if method == "base" else demo.budget(export_dir(args, s, method)).get("total", {}))
                  for s in seeds}
        row = {"label": LABELS[method]}
        for key in (f"avg@{k}", f"pass@{k}", "len_mean"):
            row[key] = spread({s: results[s]["average"][key] for s in seeds})
        for key in ("generations", "tokens"):
            row[key] = spread({s: totals[s].get(key, 0) for s in seeds})
        row["benchmarks"] = {b: spread({s: results[s][b][f"avg@{k}"] for s in seeds})
                             for b in results[seeds[0]] if b != "average"}
        if REFERENCE in args.methods and method != REFERENCE:
            row[f"vs_{REFERENCE}"] = paired_comparison([evals[method][s][1] for s in seeds],
                                                       [evals[REFERENCE][s][1] for s in seeds], args.permutations)
        picked = chosen(args, method)
        row["setting"] = str(picked) if picked else None
        rows[method] = row
    measured = {m: [json.loads((premise_dir(args, s, m) / "premise.json").read_text())["measured"] for s in seeds]
                for m in (premise_methods(args.methods) if args.premises else ())}
    for method, verdict in premise_verdicts(args.methods, measured).items():
        rows[method]["premise"] = verdict
    settings = {"suite": args.suite, "seeds": list(seeds), "k": k, "base": args.base, "reference": REFERENCE,
                "reference_label": LABELS[REFERENCE], "permutations": args.permutations,
                "premise_questions": args.premise_questions if args.premises else None}
    return {"settings": settings, "rows": rows, "tuning": tuning_summary(args)}


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="training seeds of the final table (default 0 1 2 3 4: the seed-level tests need several)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods, rows of the table (default all; sdzero and control need srt)")
    parser.add_argument("--suite", choices=tuple(SUITES), default="demo",
                        help="demo: configs/demo on the shipped tiny model (CPU); qwen: the Qwen configs (GPU)")
    parser.add_argument("--base", default=None, help="base model (default: the suite's, "
                        + ", ".join(f"{name}: {suite.base}" for name, suite in SUITES.items()) + ")")
    parser.add_argument("--jobs", type=int, default=1,
                        help="independent steps run at once, each in its own worker process (default 1: one after "
                             "the other in this process; on a GPU keep 1)")
    parser.add_argument("--k", type=int, default=None,
                        help="samples per held-out question, avg@k and pass@k (default 4 for demo, 8 for qwen)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per step (default 1)")
    parser.add_argument("--permutations", type=int, default=10_000,
                        help="random sign flips of the paired test (default 10,000; exact when fewer exist)")
    for method in METHODS[1:]:
        parser.add_argument(f"--{method.replace('_', '-')}-arg", dest=f"{method}_arg", action="append", default=[],
                            help=f"extra CLI flag for {LABELS[method]}'s training (repeatable)"
                                 + ("; SD-Zero's apply to the control too" if method == "control" else ""))
    parser.add_argument("--eval-arg", action="append", default=[],
                        help="extra CLI flag for every evaluation (repeatable)")
    parser.add_argument("--tune", action="store_true",
                        help="first tune every method on the validation split: each point of its grid (the suite's, "
                             "centred on its config) trained on --tune-seed and scored by validation avg@k; the final "
                             "runs use the chosen point (suites with a validation split: demo, demo_chain)")
    parser.add_argument("--tune-shape", default="3x3",
                        help="values per grid axis (default 3x3; 2x2, 3x1, ...: the same reduction for every method, "
                             "centre first, then the value below, then above)")
    parser.add_argument("--tune-seed", type=int, default=1000,
                        help="seed of the grid runs and their validation sampling (default 1000; not a final seed)")
    parser.add_argument("--tune-questions", type=int, default=None,
                        help="validation questions each grid point is scored on (default: all of them, "
                             f"{demo.VALIDATION_SIZE} for demo)")
    parser.add_argument("--premise-questions", type=int, default=demo.VALIDATION_SIZE,
                        help="validation questions of each premise measurement (SD-Zero's reviser probe, SDFT's "
                             f"teacher vs student), per seed (default {demo.VALIDATION_SIZE})")
    parser.add_argument("--no-premises", action="store_true", help="do not measure the premise checks")
    parser.add_argument("--only-step", default=None, metavar="SEED:METHOD:KIND[:POINT]",
                        help="internal: run one step (KIND train | eval | premise; POINT: a tuning grid point) in "
                             "this process and exit (what --jobs workers run)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    suite = SUITES[args.suite]
    args.base, args.k = args.base or suite.base, args.k or suite.k
    args.methods = list(dict.fromkeys(args.methods))
    for flag, value in (("--jobs", args.jobs), ("--k", args.k), ("--threads", args.threads),
                        ("--permutations", args.permutations)):
        if value < 1:
            parser.error(f"`{flag}` must be >= 1, got {value}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"`--seeds` must be distinct and >= 0, got {args.seeds}")
    for flag, value in (("--tune-questions", args.tune_questions), ("--premise-questions", args.premise_questions)):
        if value is not None and value < 1:
            parser.error(f"`{flag}` must be >= 1, got {value}")
    args.tune_questions = args.tune_questions or demo.VALIDATION_SIZE
    args.premises = suite.validation and not args.no_premises
    args.tune_plan = None
    try:
        args.tune_shape = tuning.parse_shape(args.tune_shape) if isinstance(args.tune_shape, str) else args.tune_shape
        if args.tune:
            if not suite.validation:
                parser.error(f"`--tune`: the {args.suite} suite has no validation split to tune on")
            if args.tune_seed in args.seeds or args.tune_seed < 0:
                parser.error(f"`--tune-seed` must be >= 0 and not one of `--seeds` {args.seeds}, got {args.tune_seed}")
            args.tune_plan = TunePlan(args.tune_seed, {m: len(grid(args, m)) for m in args.methods
                                                       if m in suite.grids})
    except ValueError as error:
        parser.error(str(error))
    for method in args.methods:
        if method in START and START[method] not in args.methods:
            parser.error(f"`--methods`: {method} trains from {START[method]}'s model; add {START[method]}")
        if method != "base" and not suite.configs[method][0].exists():
            parser.error(f"`--suite {args.suite}`: {method}'s config {suite.configs[method][0]} does not exist")


def run(args: argparse.Namespace) -> dict | None:
    """Every step, then the table; None (after naming them) when some step failed."""
    torch.set_num_threads(args.threads)
    if SUITES[args.suite].validation:
        suite_questions(args)  # before any worker starts: they all read the same files
    failures = run_steps(args, plan(args.methods, args.seeds, args.tune_plan,
                                    premise_methods(args.methods) if args.premises else ()))
    if failures:
        print(f"\n{len(failures)} step(s) did not finish (the finished ones are kept and reused by the next run):")
        print("\n".join(f"  {line}" for line in failures))
        return None
    summary = collect(args)
    summary["table"] = comparison_table(summary) + tuning.tuning_table(summary["tuning"], args.k, LABELS)
    atomic_write_text(args.out / "comparison.md", summary["table"])
    atomic_write_json(args.out / "comparison.json", json_safe(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the workers are started with
    if args.only_step is not None:
        run_step(args, Step.parse(args.only_step))
        return 0
    summary = run(args)
    if summary is None:
        return 1
    print(f"\nComparison ({args.suite} suite, {args.out / 'comparison.md'}):\n\n{summary['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
