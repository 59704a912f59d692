"""The embedded default: SD-Zero end to end on a CPU, on a task and a model shipped in the repo.

    python -m sdzero_pl.demo [--out runs/demo] [--seed 0] [--task arith|chain]

1. writes the arithmetic task's disjoint question sets (``sdzero_pl.tasks.arithmetic``: phase1, phase2, heldout);
2. Phase 1 on the shipped base model ``checkpoints/tiny-arith`` (trace collection + SRT), ``configs/demo/srt.yaml``;
3. Phase 2 (SD-Zero) from the SRT model, ``configs/demo/sdzero.yaml``;
4. held-out evaluation (avg@k, pass@k, generate-then-revise) of base, SRT and SD-Zero, ``configs/demo/eval.yaml``;
5. prints and writes (``<out>/results.md`` / ``results.json``) the table with each phase's generation budget.

Each step goes through the same LightningCLI as ``main.py`` and prints a banner saying what it does. A step is
finished when its output directory is complete (:func:`~sdzero_pl.core.artifacts.is_complete`: its manifest,
written last, lists every file); a finished step is reused when the command runs again (delete its folder to redo
it), so an interrupted demo continues where it stopped and never reuses a half-written model or evaluation.

``--task chain`` runs the same steps on the task's harder variant (:mod:`sdzero_pl.tasks.chain`: base model
``checkpoints/tiny-chain``, configs ``configs/demo_chain/``, output ``runs/demo_chain``, question files with a
validation split for tuning); the default task is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sdzero_pl.cli import main as cli
from sdzero_pl.core.artifacts import atomic_write_json, atomic_write_text, is_complete
from sdzero_pl.core.console import short_errors
from sdzero_pl.tasks import chain
from sdzero_pl.tasks.arithmetic import generate_split, generate_validation, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
SPLIT_SIZES = {"phase1": 512, "phase2": 1024, "heldout": 200}
VALIDATION_SIZE = 200  # the comparison's tuning and premise questions (disjoint from all of the above)
TASKS = {  # --task: (configs, base model, default output folder)
    "arith": (CONFIGS, "checkpoints/tiny-arith", Path("runs/demo")),
    "chain": (CONFIGS.parent / "demo_chain", "checkpoints/tiny-chain", Path("runs/demo_chain")),
}


def write_questions(out: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """The task's question sets (deterministic, disjoint by construction; ``validation``: the tuning split,
    :func:`~sdzero_pl.tasks.arithmetic.generate_validation`); existing files are kept."""
    paths = {}
    for split, n in sizes.items():
        path = out / "data" / f"{split}.jsonl"
        if not path.exists():  # written aside, then renamed: runs of several seeds may share the folder
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            write_jsonl(generate_validation(n) if split == "validation" else generate_split(split, n, seed=0), tmp)
            os.replace(tmp, path)
        paths[split] = path
    return paths


def banner(title: str, lines: list[str]) -> None:
    """What the next step does, in words, before its logs start."""
    rule = "=" * 100
    print("\n".join(["", rule, f"  {title}", *(f"  {line}" for line in lines), rule]), flush=True)


def fit(config: Path, run_dir: Path, model: str, seed: int, flags: list[str]) -> Path:
    """Train ``model`` with ``config`` into ``run_dir`` (logs there, HF export in ``run_dir/hf_model``), unless that
    export already exists; returns the export directory. Every training step of the demo and of
    ``sdzero_pl.pipelines.compare`` goes through here."""
    export = run_dir / "hf_model"
    if is_complete(export):
        print(f"  finished before: reusing {export} (delete {run_dir} to train again)", flush=True)
    else:
        cli(["fit", "--config", str(config), f"--seed_everything={seed}", f"--model.model_name_or_path={model}",
             f"--model.export_dir={export}", f"--trainer.default_root_dir={run_dir}", f"--data.seed={seed}", *flags])
    return export


def task_questions(task: str, out: Path) -> dict[str, Path]:
    """``--task``'s question files under ``out/data`` (chain: also ``validation`` and ``train``)."""
    if task == "chain":
        return chain.write_demo_data(out / "data", {**SPLIT_SIZES, "validation": chain.DEMO_SIZES["validation"]})
    return write_questions(out, SPLIT_SIZES)


def run_phase1(out: Path, base: str, questions: Path, seed: int, extra: list[str], configs: Path = CONFIGS) -> Path:
    run_dir = out / "srt"
    banner("Phase 1 of 2: Self-Revision Training (SRT)", [
        f"{base} answers each question of {questions} once, then revises its own answer 3 times after the control",
        "phrase its reward picks; the verified revisions are kept and the model is fine-tuned on them",
        f"({configs / 'srt.yaml'}) -> {run_dir / 'hf_model'}"])
    return fit(configs / "srt.yaml", run_dir, base, seed,
               [f"--data.questions.dataset={questions}", f"--data.output_dir={run_dir / 'srt_data'}", *extra])


def run_phase2(out: Path, srt: Path, questions: Path, seed: int, extra: list[str], configs: Path = CONFIGS) -> Path:
    banner("Phase 2 of 2: SD-Zero, on-policy self-distillation", [
        f"the SRT model answers new questions of {questions}; a frozen copy of it, shown the answer and the control",
        "phrase its reward picks, re-scores the answer token by token, and the model is distilled towards that",
        f"reviser ({configs / 'sdzero.yaml'}) -> {out / 'sdzero' / 'hf_model'}; self-localization under",
        f"{out / 'sdzero'}/tensorboard/*/self_localization/ (responses.html: where the teacher disagrees)"])
    return fit(configs / "sdzero.yaml", out / "sdzero", str(srt), seed, [f"--data.questions.dataset={questions}", *extra])


def evaluate(out: Path, name: str, model: str, heldout: Path, seed: int, extra: list[str],
             configs: Path = CONFIGS) -> dict:
    """Held-out metrics of one model (reused from ``<out>/eval/<name>/`` when that evaluation is complete)."""
    results_dir = out / "eval" / name
    path = results_dir / "eval_val.json"
    if is_complete(results_dir):
        print(f"  {name}: evaluated before, reusing {path}", flush=True)
    else:
        cli(["validate", "--config", str(configs / "eval.yaml"), f"--seed_everything={seed}", "--verbose=false",
             f"--model.model_name_or_path={model}", f"--model.results_dir={results_dir}", f"--model.seed={seed}",
             f"--trainer.default_root_dir={results_dir}", f"--data.benchmarks=[{heldout}]", *extra])
    return json.loads(path.read_text())["results"][heldout.stem]


def budget(export: Path) -> dict:
    """Generations and tokens the run that produced ``export`` used (its ``budget.json``), or {}."""
    path = export / "budget.json"
    return json.loads(path.read_text()) if path.exists() else {}


def legend(k: int, questions: int) -> str:
    """What the final table's columns mean, for a reader who has not read the paper."""
    return "\n".join([
        f"- held-out avg@{k}: share of correct answers, {k} samples per question, on {questions} questions no model "
        f"trained on; pass@{k}: share of questions with at least one correct sample.",
        "- revised acc: accuracy after each answer is revised once in the same turn (answer + the control phrase "
        "its reward picks + a second attempt; paper Table 9); correction rate: share of wrong answers that the "
        "revision makes right.",
        "- Both revision columns can go DOWN after a phase: Phase 2 trains the generator, not the reviser (the "
        "same weights play both), a better generator leaves fewer and harder wrong answers to correct, and "
        "revising a right answer can break it.",
        "- generations: samples the model's training drew, cumulative (SD-Zero includes Phase 1's).",
    ]) + "\n"


def results_table(rows: dict[str, dict], budgets: dict[str, dict], k: int) -> str:
    lines = [f"| model | held-out avg@{k} | pass@{k} | mean length | revised acc | correction rate | "
             "generations (cumulative) |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        gens = budgets.get(name, {}).get("total", {}).get("generations", 0)
        lines.append(
            f"| {name} | {100 * row[f'avg@{k}']:.1f} | {100 * row[f'pass@{k}']:.1f} | {row['len_mean']:.1f} | "
            f"{100 * row.get('revised_acc', float('nan')):.1f} | {100 * row.get('correction_rate', float('nan')):.1f} "
            f"| {gens:,} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="arith",
                        help="arith (default): the embedded arithmetic task and checkpoints/tiny-arith; chain: its "
                             "harder variant (sdzero_pl.tasks.chain), checkpoints/tiny-chain and configs/demo_chain")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/demo; runs/demo_chain with --task chain)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")
    parser.add_argument("--base", default=None,
                        help="base model directory (default checkpoints/tiny-arith; checkpoints/tiny-chain with "
                             "--task chain)")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out question (avg@k, pass@k)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model gains nothing from more, and several "
                             "threads per process on a shared 2-core machine slow it down many times)")
    parser.add_argument("--phase1-arg", action="append", default=[], help="extra CLI flag for Phase 1 (repeatable)")
    parser.add_argument("--phase2-arg", action="append", default=[], help="extra CLI flag for Phase 2 (repeatable)")
    parser.add_argument("--eval-arg", action="append", default=[], help="extra CLI flag for evaluation (repeatable)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--out`` and ``--base`` from ``--task`` where they were not given; adds ``args.configs``."""
    configs, base, out = TASKS[args.task]
    return argparse.Namespace(**{**vars(args), "configs": configs, "base": args.base or base, "out": args.out or out})


def run(args: argparse.Namespace) -> dict:
    args = resolve(args)
    torch.set_num_threads(args.threads)
    out, configs = args.out / f"seed{args.seed}", args.configs
    questions = task_questions(args.task, args.out)
    srt = run_phase1(out, args.base, questions["phase1"], args.seed, args.phase1_arg, configs)
    sdzero = run_phase2(out, srt, questions["phase2"], args.seed, args.phase2_arg, configs)
    eval_args = [f"--model.num_samples={args.k}", f"--model.pass_k=[1, {args.k}]", *args.eval_arg]
    models = {"base": args.base, "SRT (Phase 1)": str(srt), "SD-Zero (Phase 2)": str(sdzero)}
    rows = {}
    for index, ((name, model), key) in enumerate(zip(models.items(), ("base", "srt", "sdzero"))):
        banner(f"Evaluation {index + 1} of 3: {name} = {model}", [
            f"{args.k} samples per held-out question ({questions['heldout']}), each then revised once "
            f"({configs / 'eval.yaml'}) -> {out / 'eval' / key}"])
        rows[name] = evaluate(out, key, model, questions["heldout"], args.seed, eval_args, configs)
    budgets = {"SRT (Phase 1)": budget(srt), "SD-Zero (Phase 2)": budget(sdzero)}
    table = results_table(rows, budgets, args.k)
    notes = legend(args.k, sum(1 for line in questions["heldout"].read_text().splitlines() if line.strip()))
    atomic_write_text(out / "results.md", f"{table}\n{notes}")
    atomic_write_json(out / "results.json", {"results": rows, "budgets": budgets})
    return {"table": table, "legend": notes, "results": rows, "budgets": budgets, "out": out}


def main(argv: list[str] | None = None) -> int:
    with short_errors() as failure:
        summary = run(build_parser().parse_args(argv))
    if failure.code:
        return failure.code
    print(f"\nSD-Zero demo, held-out arithmetic ({summary['out']}), one row per model:\n\n{summary['table']}\n"
          f"{summary['legend']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
