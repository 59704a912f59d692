"""The embedded default: SD-Zero end to end on a CPU, on a task and a model shipped in the repo.

    python -m sdzero_pl.demo [--out runs/demo] [--seed 0]

1. writes the arithmetic task's disjoint question sets (``sdzero_pl.tasks.arithmetic``: phase1, phase2, heldout);
2. Phase 1 on the shipped base model ``checkpoints/tiny-arith`` (trace collection + SRT), ``configs/demo/srt.yaml``;
3. Phase 2 (SD-Zero) from the SRT model, ``configs/demo/sdzero.yaml``;
4. held-out evaluation (avg@k, pass@k, generate-then-revise) of base, SRT and SD-Zero, ``configs/demo/eval.yaml``;
5. prints and writes (``<out>/results.md`` / ``results.json``) the table with each phase's generation budget.

Each step goes through the same LightningCLI as ``main.py``. A finished step is reused when the command runs
again (delete its folder to redo it), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sdzero_pl.cli import main as cli
from sdzero_pl.tasks.arithmetic import generate_split, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
SPLIT_SIZES = {"phase1": 512, "phase2": 1024, "heldout": 200}


def write_questions(out: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """The task's question sets (deterministic, disjoint by construction); existing files are kept."""
    paths = {}
    for split, n in sizes.items():
        path = out / "data" / f"{split}.jsonl"
        if not path.exists():  # written aside, then renamed: runs of several seeds may share the folder
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            write_jsonl(generate_split(split, n, seed=0), tmp)
            os.replace(tmp, path)
        paths[split] = path
    return paths


def _done(export: Path) -> bool:
    return (export / "config.json").exists() and (export / "model.safetensors").exists()


def fit(config: Path, run_dir: Path, model: str, seed: int, flags: list[str]) -> Path:
    """Train ``model`` with ``config`` into ``run_dir`` (logs there, HF export in ``run_dir/hf_model``), unless that
    export already exists; returns the export directory. Every training step of the demo and of
    ``sdzero_pl.pipelines.compare`` goes through here."""
    export = run_dir / "hf_model"
    if not _done(export):
        cli(["fit", "--config", str(config), f"--seed_everything={seed}", f"--model.model_name_or_path={model}",
             f"--model.export_dir={export}", f"--trainer.default_root_dir={run_dir}", f"--data.seed={seed}", *flags])
    return export


def run_phase1(out: Path, base: str, questions: Path, seed: int, extra: list[str]) -> Path:
    run_dir = out / "srt"
    return fit(CONFIGS / "srt.yaml", run_dir, base, seed,
               [f"--data.questions.dataset={questions}", f"--data.output_dir={run_dir / 'srt_data'}", *extra])


def run_phase2(out: Path, srt: Path, questions: Path, seed: int, extra: list[str]) -> Path:
    return fit(CONFIGS / "sdzero.yaml", out / "sdzero", str(srt), seed, [f"--data.questions.dataset={questions}", *extra])


def evaluate(out: Path, name: str, model: str, heldout: Path, seed: int, extra: list[str]) -> dict:
    """Held-out metrics of one model (reused from ``<out>/eval/<name>/eval_val.json`` when present)."""
    results_dir = out / "eval" / name
    path = results_dir / "eval_val.json"
    if not path.exists():
        cli(["validate", "--config", str(CONFIGS / "eval.yaml"), f"--seed_everything={seed}",
             f"--model.model_name_or_path={model}", f"--model.results_dir={results_dir}", f"--model.seed={seed}",
             f"--trainer.default_root_dir={results_dir}", f"--data.benchmarks=[{heldout}]", *extra])
    return json.loads(path.read_text())["results"][heldout.stem]


def budget(export: Path) -> dict:
    """Generations and tokens the run that produced ``export`` used (its ``budget.json``), or {}."""
    path = export / "budget.json"
    return json.loads(path.read_text()) if path.exists() else {}


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
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and training (default 0)")
    parser.add_argument("--base", default="checkpoints/tiny-arith", help="base model directory")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out question (avg@k, pass@k)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model gains nothing from more, and several "
                             "threads per process on a shared 2-core machine slow it down many times)")
    parser.add_argument("--phase1-arg", action="append", default=[], help="extra CLI flag for Phase 1 (repeatable)")
    parser.add_argument("--phase2-arg", action="append", default=[], help="extra CLI flag for Phase 2 (repeatable)")
    parser.add_argument("--eval-arg", action="append", default=[], help="extra CLI flag for evaluation (repeatable)")
    return parser


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out = args.out / f"seed{args.seed}"
    questions = write_questions(args.out, SPLIT_SIZES)
    srt = run_phase1(out, args.base, questions["phase1"], args.seed, args.phase1_arg)
    sdzero = run_phase2(out, srt, questions["phase2"], args.seed, args.phase2_arg)
    eval_args = [f"--model.num_samples={args.k}", f"--model.pass_k=[1, {args.k}]", *args.eval_arg]
    models = {"base": args.base, "SRT (Phase 1)": str(srt), "SD-Zero (Phase 2)": str(sdzero)}
    rows = {name: evaluate(out, key, model, questions["heldout"], args.seed, eval_args)
            for (name, model), key in zip(models.items(), ("base", "srt", "sdzero"))}
    budgets = {"SRT (Phase 1)": budget(srt), "SD-Zero (Phase 2)": budget(sdzero)}
    table = results_table(rows, budgets, args.k)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"results": rows, "budgets": budgets}, indent=2))
    return {"table": table, "results": rows, "budgets": budgets, "out": out}


def main(argv: list[str] | None = None) -> int:
    summary = run(build_parser().parse_args(argv))
    print(f"\nSD-Zero demo, held-out arithmetic ({summary['out']}):\n\n{summary['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
