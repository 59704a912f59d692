"""HF generate backend: seeds, stop tokens and truncation, left padding, the caller's RNG untouched."""

import pytest
import torch

from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
from sdzero_pl.rollout import HFRollout, split_at_stop


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir)
    return model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id)


def _backend(policy, **kwargs):
    model, tokenizer, stops = policy
    backend = HFRollout(show_progress=False, **kwargs)
    backend.setup(model, tokenizer, stops)
    return backend, tokenizer


def test_same_seed_same_rollouts_and_different_seed_different(policy):
    backend, tokenizer = _backend(policy, max_new_tokens=12, batch_size=3)
    prompts = encode_prompts(tokenizer, ["a?", "bb?", "ccc?", "dddd?"])
    first = backend.generate(prompts, seed=1)
    assert backend.generate(prompts, seed=1) == first
    assert backend.generate(prompts, seed=2) != first


def test_generation_leaves_the_callers_rng_alone(policy):
    backend, tokenizer = _backend(policy, max_new_tokens=4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    backend.generate(encode_prompts(tokenizer, ["x?"]), seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_batched_with_left_padding_equals_one_by_one(policy):
    backend, tokenizer = _backend(policy, temperature=0.0, max_new_tokens=8, batch_size=4)
    prompts = encode_prompts(tokenizer, ["short?", "a much longer question?", "mid q?"])
    batched = backend.generate(prompts, seed=0)
    single = [backend.generate([p], seed=0)[0] for p in prompts]
    assert batched == single


def test_stop_and_length_are_reported(policy):
    backend, tokenizer = _backend(policy, max_new_tokens=6)
    rollouts = backend.generate(encode_prompts(tokenizer, ["q?"] * 4), seed=0)
    for r in rollouts:
        assert len(r.completion_ids) <= 6
        assert r.finish_reason == ("stop" if r.completion_ids[-1] in backend.stop_ids else "length")
    assert split_at_stop([5, 6, 2, 2, 2], [2]).completion_ids == [5, 6, 2]
    assert split_at_stop([5, 6, 7], [2]).truncated


def test_policy_mode_is_restored(policy):
    backend, tokenizer = _backend(policy, max_new_tokens=2)
    policy[0].train()
    backend.generate(encode_prompts(tokenizer, ["q?"]), seed=0)
    assert policy[0].training


def test_bad_sampling_flags_are_named():
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFRollout(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        HFRollout(top_p=0)
