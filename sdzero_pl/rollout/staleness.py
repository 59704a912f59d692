"""Staleness of the rollout engine (docs/method.md, "Pitfalls": vLLM weights not refreshed).

``rollout/logprob_gap`` = mean |engine log-prob - trainer log-prob| of the sampled tokens. The engine returns the
log-prob of each token it sampled (raw logits: no temperature / top-p); the trainer recomputes it with the
student's current weights. Right after a weight push the gap is rounding noise (about 1e-6 in float32, bf16 noise
on GPU); an engine running on stale weights (a missed push, a stale prefix cache, a reload from disk) shows up as
a gap orders of magnitude larger.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdzero_pl.core.losses import token_logps
from sdzero_pl.core.models import hidden_states, output_weight
from sdzero_pl.core.sequences import pad_sequences, select_targets


@torch.no_grad()
def sampled_token_logps(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        pad_id: int, batch_size: int = 8, chunk_size: int = 512) -> list[list[float]]:
    """The model's log-prob of every completion token given its prompt, in eval mode, ``batch_size`` sequences
    per forward. Runs the same number of forwards on every rank given equal list lengths (FSDP-safe)."""
    was_training = model.training
    model.eval()
    device = output_weight(model).device
    out: list[list[float]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            prompts, completions = prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size]
            sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
            ids = pad_sequences(sequences, pad_id).to(device)  # (B, T)
            attention_mask = pad_sequences([[1] * len(s) for s in sequences], 0).to(device)  # (B, T)
            mask = pad_sequences([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0).to(device)
            hidden = hidden_states(model, ids, attention_mask)  # (B, T, H)
            h, targets = select_targets(hidden, ids, mask)  # (N, H), (N,)
            values = token_logps(h, output_weight(model), targets, chunk_size).tolist()
            for completion in completions:
                out.append(values[: len(completion)])
                values = values[len(completion) :]
    finally:
        model.train(was_training)
    return out


def logprob_gap(engine_logps: Sequence[Sequence[float]], trainer_logps: Sequence[Sequence[float]]) -> float:
    """Mean absolute difference over all sampled tokens (0.0 when there are none)."""
    diffs = [abs(a - b) for engine, trainer in zip(engine_logps, trainer_logps, strict=True)
             for a, b in zip(engine, trainer, strict=True)]
    return sum(diffs) / len(diffs) if diffs else 0.0
