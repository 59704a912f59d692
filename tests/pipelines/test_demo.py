"""The embedded default: the shipped model loads and scores what its TRAINING.md says; a shortened demo runs."""

import json
import re
from pathlib import Path

import pytest

from sdzero_pl.data.questions import Question
from sdzero_pl.pipelines import demo
from sdzero_pl.tasks.arithmetic import generate_split
from tests.helpers import assert_scores_as_recorded

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-arith"


def _recorded_accuracy() -> float:
    """The held-out accuracy TRAINING.md reports (temperature 0.7, first 200 held-out problems)."""
    match = re.search(r"\*\*accuracy ([0-9.]+)\*\*", (SHIPPED / "TRAINING.md").read_text())
    assert match, "TRAINING.md states the held-out accuracy"
    return float(match.group(1))


def test_shipped_model_is_small_and_scores_what_its_training_record_says():
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20
    recorded = _recorded_accuracy()
    assert 0.3 <= recorded <= 0.6, "deliberately imperfect: room for SD-Zero to improve"
    n = 60  # the evaluator TRAINING.md was measured with (scripts/train_tiny_base.py --measure), on fewer questions
    questions = [Question(p.id, p.problem, p.answer) for p in generate_split("heldout", n, seed=0)]
    assert_scores_as_recorded(SHIPPED, questions, recorded, max_new_tokens=96)


def test_shortened_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SPLIT_SIZES", {"phase1": 8, "phase2": 16, "heldout": 8})
    args = demo.build_parser().parse_args([
        "--out", str(tmp_path), "--base", str(SHIPPED), "--k", "2",
        "--phase1-arg=--data.questions.num_questions=8", "--phase1-arg=--data.questions_per_chunk=8",
        "--phase1-arg=--data.min_traces=0", "--phase1-arg=--trainer.max_epochs=1",
        "--phase1-arg=--trainer.enable_progress_bar=false",
        "--phase2-arg=--trainer.max_epochs=2", "--phase2-arg=--data.prompts_per_epoch=8",
        "--phase2-arg=--data.batch_size=8", "--phase2-arg=--trainer.enable_progress_bar=false",
        "--eval-arg=--data.max_questions=8",
    ])
    summary = demo.run(args)
    out = tmp_path / "seed0"
    assert set(summary["results"]) == {"base", "SRT (Phase 1)", "SD-Zero (Phase 2)"}
    for row in summary["results"].values():
        assert 0.0 <= row["avg@2"] <= 1.0 and row["questions"] == 8
    saved = json.loads((out / "results.json").read_text())
    assert saved["budgets"]["SD-Zero (Phase 2)"]["phases"]["phase2/rollout"]["generations"] == 16
    assert saved["budgets"]["SD-Zero (Phase 2)"]["phases"]["phase1/init"]["generations"] == 8
    results = (out / "results.md").read_text()
    assert "| SD-Zero (Phase 2) |" in results and "correction rate: share of wrong answers" in results
    assert "can go DOWN" in results and summary["legend"] in results  # the legend is printed and saved
    assert list((out / "sdzero").rglob("self_localization/step_*/data.json"))
    printed = capsys.readouterr().out
    for banner in ("Phase 1 of 2: Self-Revision Training (SRT)", "Phase 2 of 2: SD-Zero, on-policy self-distillation",
                   "Evaluation 1 of 3: base = ", "Evaluation 2 of 3: SRT (Phase 1) = ",
                   f"Evaluation 3 of 3: SD-Zero (Phase 2) = {out / 'sdzero' / 'hf_model'}"):
        assert banner in printed, banner
    # a second run reuses every finished step: nothing is trained or evaluated again
    monkeypatch.setattr(demo, "cli", lambda *a, **k: pytest.fail("a finished step was run again"))
    assert demo.run(args)["results"] == summary["results"]
    assert f"finished before: reusing {out / 'srt' / 'hf_model'}" in capsys.readouterr().out
