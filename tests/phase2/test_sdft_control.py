"""Phase-2 baselines and controls on the SD-Zero loop: SDFT's demonstration-conditioned teacher (and its "final
answer only" variant), the question-only teacher (zero loss at step 0) and the shuffled-reward "same steps, no
signal" control. Toy tasks on the tiny model prove that SDFT learns and that the shuffle keeps everything but the
information."""

from __future__ import annotations

import dataclasses
import json
import sys

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main
from sdzero_pl.core.models import load_tokenizer
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.core.prompts import CONTROL_PRESETS, encode_prompts
from sdzero_pl.core.sequences import pad_sequences
from sdzero_pl.data.questions import DataError, Question, QuestionSource, load_questions
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import (
    ANSWER_DEMONSTRATION, DEMONSTRATION_TEMPLATE, OnPolicyDataModule, control_agreement, fill_template,
    shuffled_rewards, teacher_question
)
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import CodeReward, MathReward, RewardBatch, Verifier

P_1, P_0 = CONTROL_PRESETS["paper"][1], CONTROL_PRESETS["paper"][0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def solutions_file(tmp_path) -> str:
    """8 one-step sums with a one-character answer each and a worked solution (the demonstration)."""
    path = tmp_path / "solutions.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"s{i}", "problem": f"What is {i}+1?", "answer": str(i + 1),
                    "solution": f"{i}+1 = {i + 1}. The answer is \\boxed{{{i + 1}}}."}) + "\n" for i in range(8)
    ))
    return str(path)

QUESTION_FIELDS = {f.name for f in dataclasses.fields(QuestionSource)}


class EveryOtherAnswer(Verifier):
    """Deterministic toy reward, independent of the samples: 1 iff the answer is 1 mod 4 (half of the
    ``questions_file`` rows, whose answers are 2i + 1)."""

    def __call__(self, completions, answers):
        return RewardBatch([float(int(a) % 4 == 1) for a in answers])


class Capture(L.Callback):
    """Every training batch, the loss of each micro-batch and the student's largest |grad| before each step."""

    def __init__(self):
        self.batches, self.losses, self.grad_max = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad_max.append(max(float(p.grad.abs().max()) for p in pl_module.policy.parameters()
                                 if p.grad is not None))


def _fit(tmp_path, model_dir, questions, *, epochs=1, max_steps=-1, dtype="float32", lr=1e-2, top_k=8,
         max_new_tokens=8, callbacks=(), **data_kw):
    module = SelfDistillModule(model_dir, dtype=dtype, top_k=top_k, optim=OptimArgs(lr=lr),
                               export_dir=str(tmp_path / "export"))
    data_kw = {"id_field": "id", "shuffle": True, "prompts_per_epoch": 8, "batch_size": 8, "max_teacher_len": 512,
               **data_kw}
    source = QuestionSource(questions, **{k: data_kw.pop(k) for k in list(data_kw) if k in QUESTION_FIELDS})
    data = OnPolicyDataModule(source, rollout=HFRollout(max_new_tokens=max_new_tokens, show_progress=False),
                              **data_kw)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=max_steps,
                        reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=list(callbacks))
    trainer.fit(module, data)
    return module, data, trainer


# ------------------------------------------------------------------------------------------------ teacher text
def test_demonstration_template_is_sdfts_and_keeps_latex_braces():
    q = Question(id="a", question="What is {x}?", answer="27", solution="13+14 = \\boxed{27}")
    text = teacher_question(q, " Answer in \\boxed{}.", "demonstration", DEMONSTRATION_TEMPLATE)
    assert text == ("What is {x}? Answer in \\boxed{}.\n\nThis is an example for a response to the question:\n"
                    "13+14 = \\boxed{27}\n\nNow answer with a response of your own, including the thinking process.")
    answer_only = teacher_question(q, "", "answer", "{question} | {demonstration}")
    assert answer_only == "What is {x}? | The final answer is \\boxed{27}." == fill_template(
        "{question} | " + ANSWER_DEMONSTRATION, question="What is {x}?", answer="27")


def test_placeholders_inside_values_are_not_substituted_again():
    assert fill_template("{question}/{demonstration}", question="{demonstration}", demonstration="d") == \
        "{demonstration}/d"


@pytest.mark.parametrize("kwargs, pattern", [
    ({"teacher_context": "oracle"}, r"--data.teacher_context.*'oracle'"),
    ({"reward_signal": "random"}, r"--data.reward_signal.*'random'"),
    ({"demonstration_template": "{question} only"}, r"--data.demonstration_template.*\{demonstration\}.*only"),
    ({"demonstration_template": "{demonstration} only"}, r"--data.demonstration_template.*\{question\}"),
    ({"teacher_context": "demonstration"}, r"--data.teacher_context=demonstration.*--data.questions.solution_field"),
    ({"teacher_context": "answer", "reward_signal": "shuffled"},
     r"--data.reward_signal=shuffled.*--data.teacher_context=revision.*'answer'"),
])
def test_bad_baseline_flags_name_the_flags_and_values(questions_file, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OnPolicyDataModule(QuestionSource(questions_file), **kwargs)


def test_verifiers_thread_the_solution_field(solutions_file, tmp_path):
    questions = MathReward().load_questions(QuestionSource(solutions_file, id_field="id", solution_field="solution"))
    assert questions[0].solution == "0+1 = 1. The answer is \\boxed{1}."
    assert MathReward().load_questions(QuestionSource(solutions_file, id_field="id"))[0].solution is None
    with pytest.raises(ValueError, match="--data.questions.solution_field"):
        CodeReward().load_questions(QuestionSource(solutions_file, solution_field="solution"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2", "solution": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'solution'"):
        OnPolicyDataModule(QuestionSource(str(bad), solution_field="solution"), teacher_context="demonstration").setup("fit")


# ------------------------------------------------------------------------------------- teacher sequences in fit
@pytest.mark.parametrize("context", ["demonstration", "answer"])
def test_sdft_teacher_reads_the_demonstration_and_scores_the_students_y(tmp_path, tiny_model_dir, solutions_file,
                                                                         context):
    capture = Capture()
    _, data, trainer = _fit(tmp_path, tiny_model_dir, solutions_file, max_steps=1, callbacks=[capture],
                            teacher_context=context, solution_field="solution", shuffle=False)
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = capture.batches[0]
    questions = data.epoch_questions(0)
    texts = [teacher_question(q, "", context, DEMONSTRATION_TEMPLATE) for q in questions]
    prompts = encode_prompts(tokenizer, [q.question for q in questions])
    for row, (q, prompt, prefix) in enumerate(zip(questions, prompts, encode_prompts(tokenizer, texts))):
        student = batch["student_ids"][row][batch["student_attention_mask"][row].bool()].tolist()
        teacher = batch["teacher_ids"][row][batch["teacher_attention_mask"][row].bool()].tolist()
        y = batch["student_ids"][row][batch["student_mask"][row].bool()].tolist()
        assert student == prompt + y and teacher == prefix + y  # the same y after the teacher's own context
        assert batch["teacher_mask"][row].sum() == len(y) > 0
        shown = q.solution if context == "demonstration" else f"The final answer is \\boxed{{{q.answer}}}."
        assert shown in tokenizer.decode(prefix) and shown not in tokenizer.decode(student)
    assert "rollout/reward_mean" in trainer.callback_metrics  # the verifier still runs (and is logged)
    assert "rollout/control_agreement" not in trainer.callback_metrics  # no control phrase to agree with


def test_question_teacher_gives_zero_loss_and_gradient_at_step_0(tmp_path, tiny_model_dir, questions_file):
    """teacher = chat(x) + y = the student's own sequence, and the teacher is the student's start. Zero up to
    float64 rounding: the teacher's top-k logits come from a full matmul, the student's from gathered rows."""
    capture = Capture()
    _fit(tmp_path, tiny_model_dir, questions_file, max_steps=1, dtype="float64", callbacks=[capture],
         teacher_context="question")
    batch = capture.batches[0]
    assert torch.equal(batch["teacher_ids"], batch["student_ids"])
    assert torch.equal(batch["teacher_mask"], batch["student_mask"]) and batch["student_mask"].sum() > 0
    assert abs(capture.losses[0]) < 1e-25 and capture.grad_max[0] < 1e-14, (capture.losses, capture.grad_max)
    reference = Capture()  # the same step with SD-Zero's teacher is far from zero: the bounds above mean something
    _fit(tmp_path, tiny_model_dir, questions_file, max_steps=1, dtype="float64", callbacks=[reference])
    assert reference.losses[0] > 1e-4 and reference.grad_max[0] > 1e-4, (reference.losses, reference.grad_max)


# --------------------------------------------------------------------------------------------- shuffled control
def test_shuffled_rewards_keep_the_rate_and_the_unusable_slots_and_are_seeded():
    rewards = [1.0, 0.0, None, 0.0, 1.0, 0.0, 0.0, 1.0, None, 0.0] * 4
    shuffled = shuffled_rewards(rewards, seed=7)
    assert shuffled == shuffled_rewards(rewards, seed=7) != shuffled_rewards(rewards, seed=8)
    assert [i for i, r in enumerate(shuffled) if r is None] == [i for i, r in enumerate(rewards) if r is None]
    assert sorted(r for r in shuffled if r is not None) == sorted(r for r in rewards if r is not None)
    assert shuffled != rewards
    assert control_agreement(rewards, rewards) == 1.0
    assert control_agreement([1.0, 0.0, None], [0.0, 0.0, 1.0]) == 0.5  # None rows are not counted


def _controls(batch, tokenizer) -> list[float]:
    """The reward each teacher row's control phrase stands for (P_1 -> 1.0, P_0 -> 0.0)."""
    out = []
    for ids, attention in zip(batch["teacher_ids"], batch["teacher_attention_mask"]):
        text = tokenizer.decode(ids[attention.bool()].tolist())
        assert (P_1 in text) != (P_0 in text), text
        out.append(1.0 if P_1 in text else 0.0)
    return out


def test_shuffled_control_keeps_the_true_reward_and_the_rate_but_not_the_pairing(tmp_path, tiny_model_dir,
                                                                                  questions_file):
    tokenizer = load_tokenizer(tiny_model_dir)
    runs = {}
    for name, signal in (("verified", "verified"), ("shuffled", "shuffled"), ("again", "shuffled")):
        capture = Capture()
        _, data, trainer = _fit(tmp_path / name, tiny_model_dir, questions_file, max_steps=1, callbacks=[capture],
                                reward=EveryOtherAnswer(), reward_signal=signal, prompts_per_epoch=16, batch_size=16,
                                seed=3)
        true = [float(int(q.answer) % 4 == 1) for q in data.epoch_questions(0)]
        runs[name] = (true, _controls(capture.batches[0], tokenizer), trainer.callback_metrics, capture.batches[0])
    true, verified, metrics, _ = runs["verified"]
    assert verified == true and float(metrics["rollout/control_agreement"]) == 1.0
    true_s, shuffled, metrics_s, batch_s = runs["shuffled"]
    assert true_s == true, "same seed, same questions"
    assert sum(shuffled) == sum(true) and shuffled != true  # same P_1 rate, other pairing
    agreement = sum(c == t for c, t in zip(shuffled, true)) / len(true)
    assert float(metrics_s["rollout/control_agreement"]) == pytest.approx(agreement) and agreement < 1.0
    for key in ("rollout/reward_mean", "rollout/generations"):  # the logged reward is the TRUE one
        assert float(metrics_s[key]) == float(metrics[key])
    assert float(metrics_s["rollout/reward_mean"]) == pytest.approx(sum(true) / len(true))
    _, again, _, batch_again = runs["again"]
    assert again == shuffled and torch.equal(batch_again["teacher_ids"], batch_s["teacher_ids"])  # reproducible


# --------------------------------------------------------------------------------------------- learning, CLI
@torch.no_grad()
def answer_probability(model, prompts, answer_ids) -> float:
    """Exact mean probability of each question's one-token answer as the first completion token."""
    model.eval()
    total = sum(float(model(torch.tensor([p])).logits[0, -1].softmax(-1)[a]) for p, a in zip(prompts, answer_ids))
    return total / len(prompts)


def _teach_reading_demonstrations(model_dir, tokenizer, questions, out_dir, steps=80):
    """A random tiny model cannot read a demonstration. Give it that in-context skill first (SDFT's premise about
    the base model): after the demonstration template, answer; after the bare question, say "?"."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    eos, unsure = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("?")
    demo = encode_prompts(tokenizer, [teacher_question(q, "", "demonstration", DEMONSTRATION_TEMPLATE)
                                      for q in questions])
    plain = encode_prompts(tokenizer, [q.question for q in questions])
    answers = [tokenizer.convert_tokens_to_ids(q.answer) for q in questions]
    seqs = [p + [a, eos] for p, a in zip(demo, answers)] + [p + [unsure, eos] for p in plain]
    ids = pad_sequences(seqs, tokenizer.pad_token_id)  # (B, T)
    attention = pad_sequences([[1] * len(s) for s in seqs], 0)  # (B, T)
    targets = pad_sequences([[0] * (len(s) - 2) + [1, 1] for s in seqs], 0)[:, 1:].bool()  # (B, T-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits[targets], ids[:, 1:][targets])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, demo, plain, answers


def test_sdft_makes_the_demonstrated_answers_more_likely(tmp_path, tiny_model_dir, solutions_file):
    tokenizer = load_tokenizer(tiny_model_dir)
    questions = load_questions(solutions_file, id_field="id", solution_field="solution")
    base, demo, plain, answers = _teach_reading_demonstrations(tiny_model_dir, tokenizer, questions, tmp_path / "base")
    teacher_p = answer_probability(base, demo, answers)  # what the demonstration-conditioned teacher says
    before = answer_probability(base, plain, answers)  # what the student says without the demonstration
    assert teacher_p > 0.08 and before < 0.005, (teacher_p, before)

    module, _, trainer = _fit(tmp_path / "sdft", str(tmp_path / "base"), solutions_file, epochs=12, top_k=16,
                              max_new_tokens=2, instruction="", teacher_context="demonstration",
                              solution_field="solution", reuse_questions=True)  # 12 passes over 8 questions
    after = answer_probability(module.policy, plain, answers)
    assert after > 20 * before and after > 0.5 * teacher_p, (before, after, teacher_p)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    for name, param in module.teacher.named_parameters():  # the frozen teacher is the base model
        assert torch.equal(param, dict(base.named_parameters())[name]) and not param.requires_grad

    control, _, _ = _fit(tmp_path / "question", str(tmp_path / "base"), solutions_file, epochs=12, top_k=16,
                         max_new_tokens=2, instruction="", teacher_context="question", reuse_questions=True)
    assert answer_probability(control.policy, plain, answers) < 0.1 * after  # the demonstration is what teaches


@pytest.mark.parametrize("config", ["configs/tiny/sdft.yaml", "configs/tiny/sdzero_control.yaml"])
def test_tiny_baseline_configs_run_through_main_and_change_the_student(tmp_path, monkeypatch, config):
    monkeypatch.setattr(sys, "argv", ["main.py"])  # LightningCLI reads `args` only
    export = tmp_path / "hf_model"
    main(["fit", "--config", config, "--trainer.max_epochs=1", "--data.prompts_per_epoch=8",
          "--data.init_args.rollout.init_args.max_new_tokens=16", f"--trainer.default_root_dir={tmp_path}",
          f"--model.init_args.export_dir={export}"])
    start = dict(AutoModelForCausalLM.from_pretrained("checkpoints/tiny-random").named_parameters())
    trained = AutoModelForCausalLM.from_pretrained(export)
    assert any(not torch.equal(p, start[n]) for n, p in trained.named_parameters())
    assert list(tmp_path.rglob("events.out.tfevents.*")), "TensorBoard events were written"
