"""The comparison's suites: per method its config and fixed flags, the evaluation config, the tuning grids
(:mod:`sdzero_pl.pipelines.tuning`) and whether the suite's task writes a validation split. A new task plugs in as
a new :class:`Suite` here (and, for tuning and premises, a validation split its question writer produces)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sdzero_pl.pipelines import demo
from sdzero_pl.pipelines.compare_plan import METHODS
from sdzero_pl.pipelines.tuning import Axis, axis
from sdzero_pl.tasks import chain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA_DIRS = {"srt": "srt_data", "rft": "rft_data", "grpo": "grpo_data"}  # methods whose data module writes files


@dataclass(frozen=True)
class Suite:
    base: str
    k: int
    configs: dict[str, tuple[Path, tuple[str, ...]]]  # method -> (config, fixed flags)
    eval_config: Path
    grids: dict[str, tuple[Axis, ...]] = field(default_factory=dict)  # method -> tuning grid (``--tune``)
    validation: bool = False  # its task writes a validation split (``<out>/data/validation.jsonl``): tuning, premises


def _phase2_steps(epochs: Sequence[int], steps_per_epoch: int = 4, pass_epochs: int | None = None) -> Axis:
    """Phase-2 length as optimizer steps (the configs' 64 prompts / batch 16 = 4 per epoch), set by max_epochs. A
    point longer than one pass over the question pool (``pass_epochs``; SD-Zero's: the demo's 1,024 phase-2 questions
    / 64 per epoch) cycles through it (``--data.reuse_questions=true``; the data module refuses to otherwise). SDFT's
    configs cycle already."""
    def flags(e: int) -> tuple[str, ...]:
        cycles = pass_epochs is not None and e > pass_epochs
        return (f"--trainer.max_epochs={e}", *(("--data.reuse_questions=true",) if cycles else ()))
    return Axis("steps", tuple((str(e * steps_per_epoch), flags(e)) for e in epochs), 1)


# The demo's grids: centred on configs/demo/*.yaml (the centre is the shipped setting), x0.5 / x2 in learning rate.
# GRPO's updates per rollout batch: 64 prompts x 4 = 256 sequences in 4 micro-batches of 64, accumulated 4 / 2 / 1.
LR = "--model.optim.lr"
DEMO_GRIDS = {
    "rft": (axis("lr", LR, [5e-4, 1e-3, 2e-3]), axis("epochs", "--trainer.max_epochs", [3, 6, 9])),
    "grpo": (axis("lr", LR, [1e-4, 2e-4, 4e-4]),
             Axis("updates per rollout batch", tuple((str(4 // a), (f"--trainer.accumulate_grad_batches={a}",))
                                                     for a in (4, 2, 1)), 1)),
    "sdft": (axis("lr", LR, [1.5e-5, 3e-5, 6e-5]), _phase2_steps([24, 48, 72])),
    "sdft_answer": (axis("lr", LR, [1.5e-5, 3e-5, 6e-5]), _phase2_steps([24, 48, 72])),
    "srt": (axis("lr", LR, [5e-5, 1e-4, 2e-4]), axis("epochs", "--trainer.max_epochs", [3, 6, 9])),
    "sdzero": (axis("lr", LR, [1.5e-5, 3e-5, 6e-5]), _phase2_steps([8, 16, 24], pass_epochs=16)),
    "control": (axis("lr", LR, [1.5e-5, 3e-5, 6e-5]), _phase2_steps([8, 16, 24], pass_epochs=16)),
}

SUITES = {
    "demo": Suite("checkpoints/tiny-arith", 4, {m: (CONFIGS / "demo" / f"{m}.yaml", ()) for m in METHODS[1:]},
                  CONFIGS / "demo" / "eval.yaml", DEMO_GRIDS, validation=True),
    "demo_chain": Suite(  # the demo's configs, grids and splits on the chain task (<out>/data: tasks.chain)
        "checkpoints/tiny-chain", 4, {m: (CONFIGS / "demo_chain" / f"{m}.yaml", ()) for m in METHODS[1:]},
        CONFIGS / "demo_chain" / "eval.yaml", DEMO_GRIDS, validation=True),
    "qwen": Suite("Qwen/Qwen3-4B-Instruct-2507", 8, {
        "rft": (CONFIGS / "qwen_rft.yaml", ()), "grpo": (CONFIGS / "qwen_grpo.yaml", ()),
        "sdft": (CONFIGS / "qwen_sdft.yaml", ()),
        "sdft_answer": (CONFIGS / "qwen_sdft.yaml", ("--data.teacher_context=answer",)),
        "srt": (CONFIGS / "qwen_srt.yaml", ()), "sdzero": (CONFIGS / "qwen.yaml", ()),
        "control": (CONFIGS / "qwen_sdzero_control.yaml", ())}, CONFIGS / "eval" / "qwen.yaml"),
}


def demo_questions(out: Path) -> dict[str, Path]:
    """The demo's splits, the validation split (:func:`~sdzero_pl.tasks.arithmetic.generate_validation`: tuning and
    premises) plus ``train``: phase1 + phase2 shuffled once (seed 0), the baselines' question pool, so any prefix
    of it mixes both. Existing files are kept (written aside and renamed, as the demo's)."""
    paths = demo.write_questions(out, {**demo.SPLIT_SIZES, "validation": demo.VALIDATION_SIZE})
    union = out / "data" / "train.jsonl"
    if not union.exists():
        rows = [line for split in ("phase1", "phase2") for line in paths[split].read_text().splitlines() if line]
        random.Random(0).shuffle(rows)
        tmp = union.with_name(f"{union.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, union)
    return {**paths, "train": union}


def question_files(suite: str, out: Path) -> dict[str, Path]:
    """The question files of a suite whose data the comparison writes under ``<out>/data`` (the suites with a
    validation split): the demo's (:func:`demo_questions`) or the chain variant's
    (:func:`~sdzero_pl.tasks.chain.write_demo_data`); same split names, same sizes."""
    if suite == "demo_chain":
        return chain.write_demo_data(out / "data")
    return demo_questions(out)
