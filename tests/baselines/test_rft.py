"""RFT through a real Trainer on the tiny model: it keeps only verified-correct samples, raises their likelihood,
counts its budget, and its collection resumes and is reused like Phase 1's."""

from __future__ import annotations

import json
from dataclasses import replace

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.baselines.rft import RFTDataModule, SampleCollector, clean_samples, encode_sample
from sdzero_pl.core.models import load_tokenizer
from sdzero_pl.data.questions import QuestionSource, load_questions
from sdzero_pl.data.records import read_trace_file
from sdzero_pl.phase1.srt import SRT_OPTIM, SelfReviseSFTModule
from sdzero_pl.rollout import HFRollout
from tests.helpers import DIGITS, CountingRollout, StartsWithDigit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@torch.no_grad()
def mean_logp(model, examples) -> float:
    """Mean log-likelihood per target token of the kept completions (y + EOS given chat(x))."""
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.ids])
        logps = model(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        mask = torch.tensor(e.generation_mask[1:], dtype=torch.bool)
        total, count = total + float(logps[mask].sum()), count + int(mask.sum())
    return total / count


def _fit(tmp_path, model_dir, questions, *, epochs=2, rollout=None, **data_kw):
    module = SelfReviseSFTModule(model_dir, dtype="float32",
                                 optim=replace(SRT_OPTIM, lr=1e-2, warmup_ratio=0.0, schedule="constant"),
                                 export_dir=str(tmp_path / "export"))
    data_kw = {"samples_per_question": 8, "questions_per_chunk": 8, "batch_size": 4, **data_kw}
    source = QuestionSource(questions, id_field="id", num_questions=data_kw.pop("num_questions", 16))
    data = RFTDataModule(source, reward=StartsWithDigit(), output_dir=str(tmp_path / "rft_data"),
                         rollout=rollout or HFRollout(max_new_tokens=3, show_progress=False), show_progress=False,
                         max_length=128, **data_kw)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    return module, data, trainer


def test_rft_keeps_correct_samples_and_raises_their_likelihood(tmp_path, tiny_model_dir, questions_file):
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    module, data, trainer = _fit(tmp_path, tiny_model_dir, questions_file,
                                 rollout=CountingRollout(max_new_tokens=3, show_progress=False))
    samples_file = read_trace_file(tmp_path / "rft_data" / "samples.jsonl")
    samples = samples_file.of_kind("sample")
    assert samples and all(s["completion"][:1] in DIGITS for s in samples), "only verified-correct samples are kept"
    assert len(samples_file.of_kind("question")) == 16 and samples_file.finished is not None
    examples = data.plan.stages[0]
    assert len(examples) == len(clean_samples(samples)[0])
    before, after = mean_logp(start, examples), mean_logp(module.policy, examples)
    assert after > before + 0.5, (before, after)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    start_params = dict(start.named_parameters())
    assert all(not torch.equal(p, start_params[n]) for n, p in module.policy.named_parameters())
    ledger = json.loads((tmp_path / "rft_data" / "budget.json").read_text())
    tokens = sum(c["tokens"] for c in samples_file.of_kind("chunk"))
    assert ledger["phases"]["rft/sample"] == {"generations": 16 * 8, "tokens": tokens}
    assert trainer.callback_metrics["rollout/generations"] == 16 * 8
    assert trainer.callback_metrics["rollout/generated_tokens"] == tokens
    assert json.loads((tmp_path / "export" / "budget.json").read_text()) == ledger
    # a second fit reuses the finished collection: no generation at all
    CountingRollout.calls = 0
    _fit(tmp_path, tiny_model_dir, questions_file, epochs=1, rollout=CountingRollout(max_new_tokens=3, show_progress=False))
    assert CountingRollout.calls == 0


def test_targets_are_the_completion_and_its_eos_only(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    sample = {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "completion": "42"}
    example = encode_sample(tokenizer, sample, max_length=256)
    n_prompt = len(tokenizer.encode(sample["prompt"], add_special_tokens=False))
    assert example.generation_mask == [0] * n_prompt + [1, 1, 1]
    assert example.ids[-1] == tokenizer.eos_token_id and sum(example.revision_mask) == 0


def test_cleaning_trims_dedupes_and_caps():
    samples = [{"question_id": "a", "prompt": "p", "completion": "1 is it"},
               {"question_id": "a", "prompt": "p", "completion": "1 is it"},
               {"question_id": "a", "prompt": "p", "completion": "2" + "abcdefghij" * 4},
               {"question_id": "a", "prompt": "p", "completion": "3"},
               {"question_id": "b", "prompt": "q", "completion": "1 is it"}]
    cleaned, stats = clean_samples(samples, max_per_question=2)
    assert [(s["question_id"], s["completion"]) for s in cleaned] == [("a", "1 is it"), ("a", "2abcdefghij"),
                                                                      ("b", "1 is it")]
    assert stats == {"trimmed": 1, "duplicates": 1, "over_cap": 1}


def test_an_interrupted_collection_resumes_to_the_same_file(tmp_path, tiny_model_dir, questions_file):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    questions = load_questions(questions_file, id_field="id")[:8]
    eos = [tokenizer.eos_token_id]

    def collector():
        rollout = HFRollout(max_new_tokens=3, show_progress=False)
        rollout.setup(model, tokenizer, [tokenizer.eos_token_id])
        return SampleCollector(rollout, StartsWithDigit(), samples_per_question=4, questions_per_chunk=4,
                               seed=3).bind(tokenizer, eos)

    straight = tmp_path / "straight.jsonl"
    collector().run(straight, questions, show_progress=False)
    text = straight.read_text()
    first_chunk_end = text.index('"kind": "chunk"')
    cut = text.index("\n", first_chunk_end) + 1
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(text[:cut] + '{"kind": "sample", "question_id": "q4", "prom')  # killed mid-write
    collector().run(resumed, questions, show_progress=False)
    assert resumed.read_text() == text
    with pytest.raises(ValueError, match="recollect"):
        SampleCollector(collector().rollout, StartsWithDigit(), samples_per_question=2, questions_per_chunk=4,
                        seed=3).bind(tokenizer, eos).run(resumed, questions)


@pytest.mark.parametrize("kwargs, flag", [({"samples_per_question": 0}, "samples_per_question"),
                                           ({"max_per_question": 0}, "max_per_question"),
                                           ({"num_questions": 0}, "num_questions")])
def test_bad_flags_name_the_flag(questions_file, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        limit = {"num_questions": kwargs.pop("num_questions")} if "num_questions" in kwargs else {}
        RFTDataModule(QuestionSource(questions_file, **limit), **kwargs)
