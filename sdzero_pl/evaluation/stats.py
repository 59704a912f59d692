"""Statistics of the comparison table (pure functions): mean and spread over seeds, per-question accuracy from
sample records, and three paired tests of a method against the reference on the same questions:

* a sign-flip permutation test over questions (per-question accuracy averaged over seeds): questions are the
  random unit, training seeds are not;
* a paired t-test over seed-level means: training seeds are the random unit (a few of them: low power);
* a hierarchical bootstrap that resamples seeds AND questions: a confidence interval and a p-value that include
  both sources of variance.

A p-value that no resample or flip reached prints as ``< 1/N`` (:func:`format_p`), never as its floor.
"""

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
    """``method`` and ``reference``: one per-question accuracy dict per seed (same seeds, same order). Returns the
    mean difference in points over the questions both have in every seed and three tests of it: ``p_value`` (sign
    flips over questions, accuracy averaged over seeds), ``seed_p_value`` (t-test over the seed-level mean
    differences) and the hierarchical bootstrap's interval and ``bootstrap_p_value`` (seeds and questions)."""
    if len(method) != len(reference) or not method:
        raise ValueError(f"paired comparison needs the same seeds on both sides, got {len(method)} and "
                         f"{len(reference)}")
    keys = sorted(set.intersection(*(set(acc) for acc in (*method, *reference))))
    diffs = [sum(acc[q] for acc in method) / len(method) - sum(acc[q] for acc in reference) / len(reference)
             for q in keys]
    if not diffs:
        return {"mean_diff_points": math.nan, "p_value": math.nan, "questions": 0, "seeds": len(method)}
    seed_diffs = [sum(m[q] - r[q] for q in keys) / len(keys) for m, r in zip(method, reference)]
    boot = hierarchical_bootstrap(method, reference, permutations, seed)
    return {"mean_diff_points": 100 * sum(diffs) / len(diffs), "p_value": sign_flip_test(diffs, permutations, seed),
            "questions": len(diffs), "seeds": len(method), "seed_p_value": t_test(seed_diffs),
            "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "bootstrap_p_value": boot["p_value"]}


# ------------------------------------------------------------------------------------------ seed-level tests
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b), x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_test(diffs: Sequence[float]) -> float:
    """Two-sided p-value of a one-sample (paired) t-test of mean(diffs) = 0, n - 1 degrees of freedom; NaN with
    fewer than two values; 1 when every difference is 0 and 0 when they are equal and non-zero."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, std = mean_std(diffs)
    if std <= 1e-12 * max(1.0, abs(mean)):  # equal differences (up to rounding): no variance to test against
        return 1.0 if abs(mean) <= 1e-12 else 0.0
    t = mean / (std / math.sqrt(n))
    df = n - 1
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def hierarchical_bootstrap(method: Sequence[dict], reference: Sequence[dict], resamples: int = 10_000,
                           seed: int = 0) -> dict:
    """Mean difference (points) of ``method`` - ``reference`` with a 95% interval and a two-sided p-value, from
    resampling seeds with replacement and then questions with replacement (both sources of variance).

    ``method`` and ``reference``: one per-question accuracy dict per seed (same seeds, same order: seed i of both
    is paired, as their evaluations share the sampling seed); only questions present in every dict count. p is the
    two-sided share of resamples on the far side of 0 (doubled, at most 1); none there: p < 1 / resamples."""
    if len(method) != len(reference) or not method:
        raise ValueError(f"the bootstrap needs the same seeds on both sides, got {len(method)} and {len(reference)}")
    keys = sorted(set.intersection(*(set(acc) for acc in (*method, *reference))))
    if not keys:
        return {"mean_diff_points": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan,
                "resamples": resamples}
    diffs = torch.tensor([[m[q] - r[q] for q in keys] for m, r in zip(method, reference)], dtype=torch.float64)
    seeds, questions = diffs.shape  # (S, Q)
    generator, means = torch.Generator().manual_seed(seed), []
    for done in range(0, resamples, 1000):
        n = min(1000, resamples - done)
        s = torch.randint(0, seeds, (n, seeds), generator=generator)  # (n, S)
        q = torch.randint(0, questions, (n, questions), generator=generator)  # (n, Q)
        picked = diffs[s]  # (n, S, Q)
        means.append(picked.gather(2, q[:, None, :].expand(-1, seeds, -1)).mean(dim=(1, 2)))  # (n,)
    means = torch.cat(means)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    far = min(int((means <= 0).sum()), int((means >= 0).sum()))
    return {"mean_diff_points": 100 * diffs.mean().item(), "ci_low": 100 * low, "ci_high": 100 * high,
            "p_value": min(1.0, 2 * far / resamples) if far else 0.0, "resamples": resamples}


def format_p(p: float, resamples: int | None = None) -> str:
    """A p-value for a table: ``n/a`` for NaN; ``< 1/N`` when it is 0 after N resamples (or sits at the floor
    ``1/(N+1)`` of a random permutation test); an analytic 0 (:func:`t_test` of equal, non-zero differences: no
    variance to test against) says so; three significant digits otherwise."""
    if math.isnan(p):
        return "n/a"
    if p == 0.0 and not resamples:
        return "0 (equal differences)"
    if resamples and (p == 0.0 or p <= 1.0 / (resamples + 1) + 1e-15):
        return f"< 1/{resamples:,}"
    return f"{p:.3g}"
