"""Statistics of the comparison table (pure functions): mean and spread over seeds, per-question accuracy from
sample records, and a paired two-sided sign-flip permutation test between two methods on the same questions."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of fewer than two values is NaN."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def sign_flip_test(diffs: Sequence[float], permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of mean(diffs) = 0.

    Under the null each paired difference is as likely positive as negative, so the statistic |mean| is compared
    with its value under every sign flip. Zero differences are the same under any flip and are left out of the
    enumeration. Exact (all 2^m flips of the m nonzero differences) when 2^m <= ``permutations``; otherwise
    ``permutations`` random flips from a generator seeded with ``seed``, p = (1 + hits) / (1 + permutations)."""
    values = torch.tensor([d for d in diffs if abs(d) > 1e-12], dtype=torch.float64)  # (m,); zero up to rounding
    m = values.numel()
    if m == 0:
        return 1.0
    observed = abs(values.sum().item())  # |sum| orders the flips as |mean| does (m is fixed)
    tolerance = 1e-9 * max(1.0, values.abs().sum().item())  # mirrored flips give equal sums up to rounding
    if 2**m <= permutations:
        bits = (torch.arange(2**m).unsqueeze(1) >> torch.arange(m)) & 1  # (2^m, m)
        sums = ((1 - 2 * bits).to(torch.float64) @ values).abs()  # (2^m,)
        return (sums >= observed - tolerance).sum().item() / 2**m
    generator, hits, done = torch.Generator().manual_seed(seed), 0, 0
    while done < permutations:
        n = min(1000, permutations - done)
        signs = torch.randint(0, 2, (n, m), generator=generator).to(torch.float64) * 2 - 1  # (n, m)
        hits += ((signs @ values).abs() >= observed - tolerance).sum().item()
        done += n
    return (1 + hits) / (1 + permutations)


def question_accuracy(records: Sequence[dict]) -> dict[tuple[str, str], float]:
    """Fraction of each question's samples that are correct, from eval sample records (``benchmark``,
    ``question_id``, ``reward``). Questions whose reference answer is unusable (reward None) are left out, as
    the evaluation leaves them out of avg@k."""
    rewards: dict[tuple[str, str], list[float | None]] = {}
    for record in records:
        rewards.setdefault((record["benchmark"], str(record["question_id"])), []).append(record["reward"])
    return {key: sum(r >= 0.5 for r in values) / len(values) for key, values in rewards.items()  # binary rewards
            if all(r is not None for r in values)}


def paired_comparison(method: Sequence[dict], reference: Sequence[dict], permutations: int = 10_000,
                      seed: int = 0) -> dict:
    """``method`` and ``reference``: one per-question accuracy dict per seed (same seeds, same order). Accuracy
    averaged over seeds per question; differences on the questions both have in every seed; the mean difference
    in points and the sign-flip p-value."""
    if len(method) != len(reference) or not method:
        raise ValueError(f"paired comparison needs the same seeds on both sides, got {len(method)} and "
                         f"{len(reference)}")
    keys = sorted(set.intersection(*(set(acc) for acc in (*method, *reference))))
    diffs = [sum(acc[q] for acc in method) / len(method) - sum(acc[q] for acc in reference) / len(reference)
             for q in keys]
    if not diffs:
        return {"mean_diff_points": math.nan, "p_value": math.nan, "questions": 0}
    return {"mean_diff_points": 100 * sum(diffs) / len(diffs), "p_value": sign_flip_test(diffs, permutations, seed),
            "questions": len(diffs)}
