"""The paper's comparison table (docs/method.md, "Results", Table 1) in one command, over several seeds.

    python -m sdzero_pl.compare [--out runs/compare] [--seeds 0 1 2] [--methods base rft grpo ...]
                                [--suite demo|qwen] [--jobs N] [--k 4] [--threads 1] [--<method>-arg FLAG ...]

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

Significance: per held-out question the accuracy (fraction of its k samples correct) averaged over seeds; the
paired differences (method - SD-Zero) go to a two-sided sign-flip permutation test (:func:`sign_flip_test`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from sdzero_pl.cli import main as cli
from sdzero_pl.core.artifacts import atomic_write_json, atomic_write_text, is_complete
from sdzero_pl.evaluation.stats import mean_std, paired_comparison, question_accuracy
from sdzero_pl.evaluation.tables import comparison_table, json_safe
from sdzero_pl.pipelines import demo

METHODS = ("base", "rft", "grpo", "sdft", "sdft_answer", "srt", "sdzero", "control")
LABELS = {"base": "base", "rft": "RFT", "grpo": "GRPO", "sdft": "SDFT", "sdft_answer": "SDFT (final answer only)",
          "srt": "SRT (Phase 1)", "sdzero": "SD-Zero", "control": "control (shuffled reward)"}
START = {"sdzero": "srt", "control": "srt"}  # trained from another method's model; the rest start from the base
REFERENCE = "sdzero"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA_DIRS = {"srt": "srt_data", "rft": "rft_data", "grpo": "grpo_data"}  # methods whose data module writes files


@dataclass(frozen=True)
class Suite:
    base: str
    k: int
    configs: dict[str, tuple[Path, tuple[str, ...]]]  # method -> (config, fixed flags)
    eval_config: Path


SUITES = {
    "demo": Suite("checkpoints/tiny-arith", 4, {m: (CONFIGS / "demo" / f"{m}.yaml", ()) for m in METHODS[1:]},
                  CONFIGS / "demo" / "eval.yaml"),
    "demo_chain": Suite(  # its question files first: python -m sdzero_pl.tasks.chain --demo-data runs/demo_chain/data
        "checkpoints/tiny-chain", 4, {m: (CONFIGS / "demo_chain" / f"{m}.yaml", ()) for m in METHODS[1:]},
        CONFIGS / "demo_chain" / "eval.yaml"),
    "qwen": Suite("Qwen/Qwen3-4B-Instruct-2507", 8, {
        "rft": (CONFIGS / "qwen_rft.yaml", ()), "grpo": (CONFIGS / "qwen_grpo.yaml", ()),
        "sdft": (CONFIGS / "qwen_sdft.yaml", ()),
        "sdft_answer": (CONFIGS / "qwen_sdft.yaml", ("--data.teacher_context=answer",)),
        "srt": (CONFIGS / "qwen_srt.yaml", ()), "sdzero": (CONFIGS / "qwen.yaml", ()),
        "control": (CONFIGS / "qwen_sdzero_control.yaml", ())}, CONFIGS / "eval" / "qwen.yaml"),
}


# ----------------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    seed: int
    method: str
    kind: str  # "train" | "eval"

    def __str__(self) -> str:
        return f"{self.seed}:{self.method}:{self.kind}"

    @classmethod
    def parse(cls, text: str) -> Step:
        parts = text.split(":")
        if (len(parts) != 3 or not parts[0].isdigit() or parts[1] not in METHODS or parts[2] not in ("train", "eval")
                or parts[1:] == ["base", "train"]):
            raise ValueError(f"`--only-step` must be SEED:METHOD:KIND (KIND train | eval; base has no train), "
                             f"got {text!r}")
        return cls(int(parts[0]), parts[1], parts[2])


def plan(methods: Sequence[str], seeds: Sequence[int]) -> list[Step]:
    """Every step, in the order they are started: training first, SRT's first of all (two methods wait on it)."""
    order = sorted(methods, key=lambda m: (m != "srt", METHODS.index(m)))
    return ([Step(s, m, "train") for m in order if m != "base" for s in seeds]
            + [Step(s, m, "eval") for m in order for s in seeds])


def needs(step: Step) -> list[Step]:
    if step.kind == "eval":
        return [] if step.method == "base" else [Step(step.seed, step.method, "train")]
    return [Step(step.seed, START[step.method], "train")] if step.method in START else []


def seed_dir(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"seed{seed}"


def export_dir(args: argparse.Namespace, seed: int, method: str) -> Path:
    return seed_dir(args, seed) / method / "hf_model"


def eval_dir(args: argparse.Namespace, seed: int, method: str) -> Path:
    return seed_dir(args, seed) / method / "eval" / "heldout"


def log_path(args: argparse.Namespace, step: Step) -> Path:
    return seed_dir(args, step.seed) / f"{step.method}.log"


def sample_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("samples_val_rank*.jsonl"))


def finished(args: argparse.Namespace, step: Step) -> bool:
    """A step is finished when its output directory is complete (the one check the demo uses too)."""
    return is_complete(export_dir(args, step.seed, step.method) if step.kind == "train"
                       else eval_dir(args, step.seed, step.method))


def demo_questions(out: Path) -> dict[str, Path]:
    """The demo's splits plus ``train``: phase1 + phase2 shuffled once (seed 0), the baselines' question pool, so
    any prefix of it mixes both. Existing files are kept (written aside and renamed, as the demo's)."""
    paths = demo.write_questions(out, demo.SPLIT_SIZES)
    union = out / "data" / "train.jsonl"
    if not union.exists():
        rows = [line for split in ("phase1", "phase2") for line in paths[split].read_text().splitlines() if line]
        random.Random(0).shuffle(rows)
        tmp = union.with_name(f"{union.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, union)
    return {**paths, "train": union}


def method_args(args: argparse.Namespace, method: str) -> list[str]:
    """The method's extra flags; the control also gets SD-Zero's, so the two stay identical but for the reward."""
    return [*(args.sdzero_arg if method == "control" else []), *getattr(args, f"{method}_arg")]


def train(args: argparse.Namespace, seed: int, method: str) -> None:
    out, extra = seed_dir(args, seed), method_args(args, method)
    start = str(export_dir(args, seed, START[method])) if method in START else args.base
    if args.suite == "demo":
        questions = demo_questions(args.out)
        if method == "srt":
            demo.run_phase1(out, args.base, questions["phase1"], seed, extra)
            return
        if method == "sdzero":
            demo.run_phase2(out, Path(start), questions["phase2"], seed, extra)
            return
        extra = [f"--data.questions.dataset={questions['phase2' if method in START else 'train']}", *extra]
    config, fixed = SUITES[args.suite].configs[method]
    run_dir = out / method
    data_dir = [f"--data.output_dir={run_dir / DATA_DIRS[method]}"] if method in DATA_DIRS else []
    demo.fit(config, run_dir, start, seed, [*fixed, *data_dir, *extra])


def evaluate(args: argparse.Namespace, seed: int, method: str) -> None:
    directory = eval_dir(args, seed, method)
    model = args.base if method == "base" else str(export_dir(args, seed, method))
    flags = [f"--model.num_samples={args.k}", f"--model.pass_k={sorted({1, args.k})}", "--model.save_samples=true",
             *args.eval_arg]
    if args.suite == "demo":  # <seed>/<method>/eval/heldout; generate-then-revise is the demo's, not this table's
        demo.evaluate(directory.parent.parent, directory.name, model, demo_questions(args.out)["heldout"], seed,
                      ["--model.revise=false", *flags])
    elif not is_complete(directory):
        cli(["validate", "--config", str(SUITES[args.suite].eval_config), f"--seed_everything={seed}",
             f"--model.model_name_or_path={model}", f"--model.results_dir={directory}", f"--model.seed={seed}",
             f"--trainer.default_root_dir={directory}", *flags])


def run_step(args: argparse.Namespace, step: Step) -> None:
    torch.set_num_threads(args.threads)
    (train if step.kind == "train" else evaluate)(args, step.seed, step.method)


# ------------------------------------------------------------------------------------------------ scheduling
@contextlib.contextmanager
def redirected(log: Path) -> Iterator[None]:
    """This process's output, Python's and the C libraries', goes to ``log`` (appended) while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            handle.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_inline(args: argparse.Namespace, step: Step) -> bool:
    with redirected(log_path(args, step)):
        try:
            run_step(args, step)
            return True
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - the CLI exits with SystemExit on a bad flag: a failed step too
            traceback.print_exc()
            return False


def launch(args: argparse.Namespace, step: Step) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(log_path(args, step), "a") as handle:
        return subprocess.Popen([sys.executable, "-m", "sdzero_pl.pipelines.compare", *args.argv, "--only-step", str(step)],
                                stdout=handle, stderr=subprocess.STDOUT, env=env)


def run_steps(args: argparse.Namespace, steps: list[Step]) -> list[str]:
    """Runs the unfinished steps, at most ``--jobs`` at a time, each once its inputs exist; returns one line per
    step that failed or could not run. ``--jobs 1`` runs them in this process (no start-up cost per step)."""
    pending = [s for s in steps if not finished(args, s)]
    done, failed, running = set(steps) - set(pending), {}, {}
    total, count = len(pending), 0
    print(f"{len(steps)} steps, {len(done)} finished before (reused), {total} to run, {args.jobs} at a time")

    def finish(step: Step, ok: bool, seconds: float | None, why: str = "") -> None:
        nonlocal count
        count += 1
        name, log = f"seed {step.seed} {step.method} {step.kind}", log_path(args, step)
        if seconds is None:
            state = f"not run: {why}"
        else:
            minutes, secs = divmod(round(seconds), 60)
            state = f"{'done' if ok else 'FAILED'} in {minutes}m{secs:02d}s (log {log})"
        print(f"[{count}/{total}] {name}: {state}", flush=True)
        if ok:
            done.add(step)
        else:
            failed[step] = f"{name} failed: see {log}" if seconds is not None else f"{name} {state}"

    while pending or running:
        for step in list(pending):
            broken = [d for d in needs(step) if d in failed]
            if broken:
                pending.remove(step)
                finish(step, False, None, f"{broken[0].method} failed")
            elif len(running) < args.jobs and all(d in done for d in needs(step)):
                pending.remove(step)
                seed_dir(args, step.seed).mkdir(parents=True, exist_ok=True)
                if args.jobs == 1:
                    start = time.time()
                    finish(step, run_inline(args, step), time.time() - start)
                else:
                    running[step] = (launch(args, step), time.time())
        for step, (process, start) in list(running.items()):
            if process.poll() is not None:
                del running[step]
                finish(step, process.returncode == 0, time.time() - start)
        if running:
            time.sleep(1.0)
        elif pending and not any(all(d in done or d in failed for d in needs(s)) for s in pending):
            raise AssertionError(f"steps wait on steps that never run: {[str(s) for s in pending]}")
    return list(failed.values())


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
        rows[method] = row
    settings = {"suite": args.suite, "seeds": list(seeds), "k": k, "base": args.base, "reference": REFERENCE,
                "reference_label": LABELS[REFERENCE], "permutations": args.permutations}
    return {"settings": settings, "rows": rows}


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
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
    parser.add_argument("--only-step", default=None, metavar="SEED:METHOD:KIND",
                        help="internal: run one step (KIND train | eval) in this process and exit (what --jobs "
                             "workers run)")
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
    for method in args.methods:
        if method in START and START[method] not in args.methods:
            parser.error(f"`--methods`: {method} trains from {START[method]}'s model; add {START[method]}")
        if method != "base" and not suite.configs[method][0].exists():
            parser.error(f"`--suite {args.suite}`: {method}'s config {suite.configs[method][0]} does not exist")


def run(args: argparse.Namespace) -> dict | None:
    """Every step, then the table; None (after naming them) when some step failed."""
    torch.set_num_threads(args.threads)
    if args.suite == "demo":
        demo_questions(args.out)  # before any worker starts: they all read the same files
    failures = run_steps(args, plan(args.methods, args.seeds))
    if failures:
        print(f"\n{len(failures)} step(s) did not finish (the finished ones are kept and reused by the next run):")
        print("\n".join(f"  {line}" for line in failures))
        return None
    summary = collect(args)
    summary["table"] = comparison_table(summary)
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
