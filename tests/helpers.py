"""Toy verifiers and backends shared by several test files."""

from __future__ import annotations

import importlib
import random

from sdzero_pl.rollout import HFRollout
from sdzero_pl.rollout.base import Rollout
from sdzero_pl.tasks import RewardBatch, Verifier

DIGITS = "0123456789"

SETSID_DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()  # leave the process group
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
print("ok")
"""
"""A Python program whose grandchild leaves the process group and outlives it: the sandbox must kill it."""


class StartsWithDigit(Verifier):
    """Toy task: reward 1 iff the completion starts with a digit (about 10% of a random char-level model's
    samples, so most groups of 8 hold both outcomes)."""

    def __call__(self, completions, answers):
        return RewardBatch([1.0 if c[:1] in DIGITS else 0.0 for c in completions])


class CountingRollout(HFRollout):
    """HF generate that counts its calls (class-wide), to prove a collection was reused, not redone."""

    calls = 0

    def generate(self, *args, **kwargs):
        CountingRollout.calls += 1
        return super().generate(*args, **kwargs)


class LongTailRollout(HFRollout):
    """HF generate, each completion cut to a long-tailed length (most short, a few up to ``max_new_tokens``) drawn
    from its own tokens and its prompt's: the same sample gets the same length on any rank, in any run (length-aware
    batching needs lengths that differ; a random tiny model rarely stops by itself)."""

    def generate(self, prompt_ids, seed, desc="generate", max_new_tokens=None):
        rollouts = super().generate(prompt_ids, seed, desc, max_new_tokens)
        out = []
        for prompt, rollout in zip(prompt_ids, rollouts):
            u = random.Random(",".join(map(str, [*prompt, -1, *rollout.completion_ids]))).random()
            keep = max(1, int(len(rollout.completion_ids) * u**3))
            out.append(Rollout(rollout.completion_ids[:keep], "length"))
        return out


def assert_only_adapters_changed(model, start_dir: str) -> None:
    """A LoRA fit: every base weight equals the start model's, every adapter B moved (sdzero_pl/core/lora.py)."""
    import torch

    from sdzero_pl.core.lora import ADAPTER, lora_layers
    from sdzero_pl.core.models import load_model

    params = list(model.named_parameters())
    start = dict(load_model(start_dir, str(params[0][1].dtype).removeprefix("torch.")).named_parameters())
    frozen = [(n, p) for n, p in params if not p.requires_grad]
    assert frozen and len(params) - len(frozen) == 2 * len(lora_layers(model))
    for name, param in frozen:
        assert torch.equal(param, start[name.replace(".base_layer", "")]), f"{name} changed"
    assert all(float(layer.lora_B[ADAPTER].weight.detach().abs().max()) > 0 for layer in lora_layers(model))


def vllm_importable() -> bool:
    """Whether ``import vllm`` works here (the vLLM tests skip themselves otherwise)."""
    try:
        importlib.import_module("vllm")
    except Exception:  # noqa: BLE001  (a CUDA-linked torchvision breaks `import vllm` with other errors too)
        return False
    return True


def assert_scores_as_recorded(model_dir, questions, recorded: float, max_new_tokens: int) -> None:
    """A shipped base model scores on ``questions`` (one sample each at T = 0.7, the evaluator its TRAINING.md was
    measured with) within 3 sigma of the accuracy that record states."""
    import math

    from sdzero_pl.core.models import load_model, load_tokenizer
    from sdzero_pl.evaluation.evaluate import evaluate_questions
    from sdzero_pl.tasks import MathReward

    reward = MathReward()
    try:
        row, _ = evaluate_questions(load_model(str(model_dir), "float32"), load_tokenizer(str(model_dir)), questions,
                                    rollout=HFRollout(temperature=0.7, max_new_tokens=max_new_tokens,
                                                      show_progress=False),
                                    reward=reward, batch_size=64, seed=0)
    finally:
        reward.close()
    noise = 3 * math.sqrt(recorded * (1 - recorded) / len(questions))  # 3 sigma of a sample of that size
    assert abs(row["avg@1"] - recorded) <= noise, (row["avg@1"], recorded)
