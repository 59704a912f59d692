"""The hand-off between the phases, through the command line: Phase 1 (tiny SRT run: collection with the tiny
model + handcrafted traces, SFT, export) -> Phase 2 (tiny SD-Zero run) started from Phase 1's exported directory
and exclusion file, then from its hand-off record alone. Checks that Phase 2's student and teacher start from the SRT
weights, that no question is used by both phases, and that a Phase 2 whose control phrase or instruction differs
from Phase 1's is refused with both values named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import control_phrases, render_prompt
from sdzero_pl.data.records import read_trace_file
from sdzero_pl.phase1.handoff import HANDOFF_FILE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PHRASES = control_phrases("paper")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_handcrafted_traces(path: Path, tokenizer, ids: range) -> str:
    """Right revisions after a wrong init for questions q<i> of the ``questions_file`` fixture."""
    with open(path, "w") as handle:
        for i in ids:
            answer = 2 * i + 1
            handle.write(json.dumps({
                "question_id": f"q{i}", "prompt": render_prompt(tokenizer, f"What is {i}+{i + 1}? Answer in \\boxed{{}}."),
                "init": f"\\boxed{{{answer + 1}}}", "init_reward": 0.0, "control": PHRASES[0],
                "revision": f"{i}+{i + 1}={answer}. \\boxed{{{answer}}}", "revision_reward": 1.0,
            }) + "\n")
    return str(path)


def test_phase1_export_starts_phase2_on_disjoint_questions(tmp_path, tiny_model_dir, questions_file, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py"])  # LightningCLI reads `args` only
    phase1, phase2 = tmp_path / "srt", tmp_path / "sdzero"
    traces = write_handcrafted_traces(tmp_path / "hand.jsonl", load_tokenizer(tiny_model_dir), range(4))
    srt = main([
        "fit", "--config", str(CONFIGS / "tiny" / "srt.yaml"),
        "--trainer.default_root_dir", str(phase1), "--trainer.logger", "false", "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.model_name_or_path", tiny_model_dir, "--model.export_dir", str(phase1 / "hf_model"),
        "--data.questions.dataset", questions_file, "--data.questions.num_questions", "8", "--data.questions_per_chunk", "4",
        "--data.revisions_per_init", "2", "--data.rollout.init_args.max_new_tokens", "16",
        "--data.output_dir", str(phase1 / "srt_data"), "--data.extra_traces_file", traces, "--data.min_traces", "1",
        "--data.questions.instruction", " Answer in \\boxed{}.", "--data.reward", "sdzero_pl.tasks.MathReward",
    ])
    assert srt.trainer.global_step > 0
    export = phase1 / "hf_model"
    srt_weights = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(export).state_dict().items()}
    base = load_model(tiny_model_dir, "float32").state_dict()
    assert any(not torch.equal(base[k], srt_weights[k]) for k in base), "Phase 1 did not train"
    assert json.loads((export / "budget.json").read_text())["total"]["generations"] == 8 + 8 * 2
    phase1_ids = set(json.loads((phase1 / "srt_data" / "phase1_question_ids.json").read_text()))
    collected = {q["question_id"] for q in read_trace_file(phase1 / "srt_data" / "traces.jsonl").of_kind("question")}
    assert collected == {f"q{i}" for i in range(8)} and collected <= phase1_ids

    sdzero = main([
        "fit", "--config", str(CONFIGS / "tiny" / "sdzero.yaml"),
        "--trainer.default_root_dir", str(phase2), "--trainer.logger", "false", "--trainer.max_epochs", "1",
        "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--model.model_name_or_path", str(export), "--model.export_dir", str(phase2 / "hf_model"),
        "--data.questions.dataset", questions_file,
        "--data.questions.exclude_ids_file", str(phase1 / "srt_data" / "phase1_question_ids.json"),
        "--data.questions.skip_first", "0", "--data.ignore_handoff", "true", "--data.prompts_per_epoch", "8",
        "--data.rollout.init_args.max_new_tokens", "16",
    ])
    phase2_ids = {q.id for q in sdzero.datamodule.questions}
    assert phase2_ids and not phase2_ids & phase1_ids  # disjoint
    assert phase2_ids | phase1_ids == {f"q{i}" for i in range(32)}
    teacher = sdzero.model.teacher.state_dict()  # the frozen teacher is the SRT model, unchanged
    for k, v in srt_weights.items():
        torch.testing.assert_close(teacher[k], v)
    assert sdzero.trainer.global_step > 0

    handoff = json.loads((export / HANDOFF_FILE).read_text())
    assert handoff["control"] == {"1": PHRASES[1], "0": PHRASES[0]} and set(handoff["question_ids"]) == phase1_ids
    assert handoff["instruction"] == " Answer in \\boxed{}." and handoff["budget"]["generations"] == 8 + 8 * 2

    def phase2(*flags):  # from the export alone: no exclusion file, no skip_first
        return main([
            "fit", "--config", str(CONFIGS / "tiny" / "sdzero.yaml"), "--trainer.default_root_dir", str(phase2_dir),
            "--trainer.logger", "false", "--trainer.max_epochs", "1", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--model.model_name_or_path", str(export),
            "--data.questions.dataset", questions_file, "--data.questions.skip_first", "0",
            "--data.prompts_per_epoch", "8", "--data.rollout.init_args.max_new_tokens", "16", *flags])

    phase2_dir = tmp_path / "sdzero2"
    by_handoff = phase2()
    assert {q.id for q in by_handoff.datamodule.questions} == phase2_ids  # Phase 1's questions left out
    with pytest.raises(ValueError, match=r"control preset 'paper'.*--data.control.preset=qwen.*P_0 = 'Wait, this "
                                         r"response is wrong\. Let me correct it\.'.*--data.control.preset=paper"):
        phase2("--data.control.preset", "qwen")
    with pytest.raises(ValueError, match=r"--data.questions.instruction=' Answer in \\\\boxed\{\}\.'.*Phase 2 has "
                                         r"' Give the answer\.'"):
        phase2("--data.questions.instruction", " Give the answer.")
