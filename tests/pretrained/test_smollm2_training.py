"""Both phases and the evaluator on SmolLM2-135M-Instruct (30 layers, a real tokenizer): a 2-step Phase-2 fit moves
the student and not the teacher; Phase-1 collection keeps real, verified revisions and SRT trains on them; the
evaluator and generate-then-revise run on it. Small batches and few tokens: the tier must stay cheap on a CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import lightning as L
import pytest
import torch
from safetensors import safe_open

from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.core.prompts import control_phrases
from sdzero_pl.data.questions import Question, QuestionSource
from sdzero_pl.evaluation.evaluate import evaluate_questions
from sdzero_pl.phase1.data import TraceDataModule
from sdzero_pl.phase1.handoff import read_handoff
from sdzero_pl.phase1.srt import SRT_OPTIM, SelfReviseSFTModule
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import FinalNumberReward

INSTRUCTION = " Answer with the number only."
SUMS = [(2, 3), (7, 5), (9, 8), (4, 4), (15, 6), (3, 11), (20, 5), (6, 7)]


@pytest.fixture(scope="module")
def sums_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("smollm2-data") / "sums.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for i, (a, b) in enumerate(SUMS)))
    return str(path)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, reload_dataloaders_every_n_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), **kwargs)


def test_two_phase2_steps_change_the_student_and_not_the_teacher(smollm2, smollm2_model, sums_file, tmp_path):
    module = SelfDistillModule(smollm2, dtype="float32", top_k=64, optim=OptimArgs(lr=1e-5, warmup_steps=0),
                               export_dir=str(tmp_path / "export"))
    data = OnPolicyDataModule(QuestionSource(sums_file, id_field="id", instruction=INSTRUCTION), prompts_per_epoch=4,
                              batch_size=2, max_teacher_len=256, reward=FinalNumberReward(),
                              rollout=HFRollout(max_new_tokens=12, show_progress=False))
    start = dict(smollm2_model.named_parameters())  # the same weights, never trained
    trainer = _trainer(tmp_path)
    try:
        trainer.fit(module, data)
    finally:
        data.reward.close()
    assert trainer.global_step == 2
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(p, start[n])]
    assert len(changed) == len(start), sorted(set(start) - set(changed))[:5]
    for name, param in module.teacher.named_parameters():
        assert torch.equal(param, start[name]) and not param.requires_grad
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and float(metrics["train/loss_epoch"]) > 0
    assert 0 < float(metrics["teacher/topk_mass_epoch"]) <= 1
    name = "model.layers.29.mlp.down_proj.weight"
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as exported:  # the trained student
        torch.testing.assert_close(exported.get_tensor(name), dict(module.policy.named_parameters())[name])


def test_phase1_collects_real_verified_revisions_and_srt_trains_on_them(smollm2, smollm2_model, sums_file,
                                                                        tmp_path):
    source = QuestionSource(sums_file, id_field="id", instruction=INSTRUCTION, num_questions=4)
    data = TraceDataModule(source, revisions_per_init=2, questions_per_chunk=4, reward=FinalNumberReward(),
                           rollout=HFRollout(temperature=0.7, max_new_tokens=12, show_progress=False),
                           output_dir=str(tmp_path / "srt_data"), batch_size=2, max_length=256, show_progress=False)
    module = SelfReviseSFTModule(smollm2, dtype="float32", optim=replace(SRT_OPTIM, lr=1e-5, warmup_ratio=0.0),
                                 export_dir=str(tmp_path / "hf_model"))
    start = dict(smollm2_model.named_parameters())
    trainer = _trainer(tmp_path, max_steps=1)
    try:
        trainer.fit(module, data)
    finally:
        data.reward.close()
    rows = [json.loads(line) for line in (tmp_path / "srt_data" / "traces.jsonl").read_text().splitlines()]
    traces = [r for r in rows if r.get("kind") == "trace"]
    assert traces and all(t["revision_reward"] == 1.0 for t in traces)  # kept = verified correct revisions
    assert sum(r["kind"] == "question" for r in rows) == 4
    for trace in traces:
        question = SUMS[int(trace["question_id"][1:])]
        assert str(sum(question)) in trace["revision"]  # a real revision, sampled from the reviser context
        assert trace["prompt"].endswith("<|im_start|>assistant\n") and trace["control"] in control_phrases().values()
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(p, start[n]) for n, p in module.policy.named_parameters())
    handoff = read_handoff(str(tmp_path / "hf_model"))
    assert handoff is not None and handoff.instruction == INSTRUCTION and len(handoff.question_ids) == 4


def test_evaluator_and_generate_then_revise_on_smollm2(smollm2_model, smollm2_tokenizer):
    questions = [Question(f"s{i}", f"What is {a}+{b}?", str(a + b)) for i, (a, b) in enumerate(SUMS[:4])]
    reward = FinalNumberReward()
    try:
        scores, records = evaluate_questions(
            smollm2_model, smollm2_tokenizer, questions, num_samples=1, pass_k=[1], phrases=control_phrases(),
            rollout=HFRollout(temperature=0.7, max_new_tokens=12, show_progress=False), reward=reward,
            instruction=INSTRUCTION, seed=0)
    finally:
        reward.close()
    assert len(records) == 4 and all(r.revision is not None for r in records)
    init = [r.reward for r in records]
    revised = [r.revision_reward for r in records]
    assert scores["avg@1"] == pytest.approx(sum(init) / 4)
    assert scores["revised_acc"] == pytest.approx(sum(revised) / 4)
    wrong = [r for r in records if r.reward < 0.5]
    if wrong:
        corrected = sum(r.revision_reward >= 0.5 for r in wrong) / len(wrong)
        assert scores["correction_rate"] == pytest.approx(corrected)
    assert scores["init_tokens_mean"] == pytest.approx(sum(r.tokens for r in records) / 4)
    assert 0 < scores["revision_tokens_mean"] <= 12
