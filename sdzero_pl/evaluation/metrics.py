"""Evaluation and analysis metrics (docs/method.md, "Analyses" and "Results"): pure functions, plus torchmetrics wrappers
that accumulate them across batches and ranks.

* avg@n: mean correctness over the n samples of a question, averaged over questions (paper Table 1: avg@8).
* pass@k: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` of "at least one of k samples is correct" from n >= k
  samples of which c are correct (Chen et al. 2021); with n == k it is the plain "any correct" indicator.
* bucket shares (token-level self-localization): a response's tokens sorted by their divergence D_t, highest
  first, cut into equal-count buckets; each bucket's share of the total divergence.
* phrase frequency (behaviour over training): occurrences of self-revision phrases ("wait", "let me start over")
  per response, and the share of responses holding at least one.

:class:`BenchmarkScores` bundles the per-benchmark metrics of an evaluation; :func:`markdown_table` prints them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
from torchmetrics import MeanMetric, Metric, SumMetric


# --------------------------------------------------------------------------------------------- accuracy at k
def avg_at_k(num_correct: int, num_samples: int) -> float:
    """Expected accuracy of one sample, estimated from ``num_samples`` samples: c / n."""
    _check_counts(num_correct, num_samples)
    return num_correct / num_samples


def pass_at_k(num_correct: int, num_samples: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n - c, k) / C(n, k)``; needs n >= k >= 1."""
    _check_counts(num_correct, num_samples)
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0  # every subset of k samples holds a correct one
    # Product form of C(n-c, k) / C(n, k): stable for large n, no huge integers.
    ratio = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def _check_counts(num_correct: int, num_samples: int) -> None:
    if num_samples < 1:
        raise ValueError(f"the number of samples must be >= 1, got {num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"the number of correct samples must be in [0, {num_samples}], got {num_correct}")


def mean(values: Sequence[float]) -> float:
    """Plain mean; NaN for an empty list (a benchmark with no usable question has no accuracy)."""
    return sum(values) / len(values) if len(values) else float("nan")


# ------------------------------------------------------------------------------------------ self-localization
def bucket_shares(divergences: Sequence[float] | torch.Tensor, num_buckets: int = 20) -> list[float]:
    """Share of the total divergence held by each of ``num_buckets`` equal-count buckets of tokens, highest D_t
    first (bucket 0 = the top 1/num_buckets of tokens). The shares sum to 1.

    Bucket sizes differ by at most one token (``torch.tensor_split``); with fewer tokens than buckets, the last
    buckets are empty and hold 0. If the total divergence is 0 (student == teacher), the mass is spread in
    proportion to bucket size, the flat limit. Divergences must be finite and >= 0.
    """
    if num_buckets < 1:
        raise ValueError(f"`num_buckets` must be >= 1, got {num_buckets}")
    values = torch.as_tensor(divergences, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("bucket shares need at least one token")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("divergences must be finite and >= 0")
    ordered = values.sort(descending=True).values
    buckets = torch.tensor_split(ordered, num_buckets)
    total = float(ordered.sum())
    if total <= 0.0:
        return [len(b) / ordered.numel() for b in buckets]
    return [float(b.sum()) / total for b in buckets]


def bucket_means(divergences: Sequence[float] | torch.Tensor, num_buckets: int = 20) -> list[float | None]:
    """Mean D_t of each of the same buckets as :func:`bucket_shares` (highest D_t first): the absolute level, which the
    shares hide (two classes with the same shares can differ by orders of magnitude). None for an empty bucket."""
    if num_buckets < 1:
        raise ValueError(f"`num_buckets` must be >= 1, got {num_buckets}")
    values = torch.as_tensor(divergences, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("bucket means need at least one token")
    buckets = torch.tensor_split(values.sort(descending=True).values, num_buckets)
    return [float(b.mean()) if b.numel() else None for b in buckets]


def clamp_roundoff(values: torch.Tensor, tolerance: float, what: str = "D_t") -> torch.Tensor:
    """A divergence computed in floating point can come out slightly below 0 (float32 KL terms: about -5e-7). Values
    in [-tolerance, 0) become 0; a NaN, an infinity or a value below -tolerance is real corruption and raises,
    naming how many values are bad and the worst one."""
    finite = torch.isfinite(values)
    bad = ~finite | (values < -tolerance)
    if bool(bad.any()):
        worst = values[bad][0].item() if not bool(finite.all()) else values.min().item()
        raise ValueError(f"{int(bad.sum())} of {values.numel()} {what} values are not finite or below "
                         f"-{tolerance:g} (e.g. {worst:.6g}): the scores are corrupted, not rounded")
    return values.clamp(min=0.0)


def mean_bucket_shares(responses: Sequence[Sequence[float]], num_buckets: int = 20) -> list[float]:
    """Per-response bucket shares averaged over responses (each response weighs the same). Responses with fewer
    tokens than buckets are left out: their shares would be padded with empty buckets."""
    rows = [bucket_shares(r, num_buckets) for r in responses if len(r) >= num_buckets]
    if not rows:
        raise ValueError(f"no response has at least {num_buckets} tokens")
    return [sum(col) / len(rows) for col in zip(*rows)]


# ---------------------------------------------------------------------------------------------- behaviour
def phrase_pattern(phrase: str) -> re.Pattern:
    """Case-insensitive pattern of a phrase with word boundaries where it starts / ends with a word character,
    so "wait" counts in "Wait," but not in "awaiting"; runs of whitespace match any whitespace."""
    text = phrase.strip()
    if not text:
        raise ValueError("a self-revision phrase must not be empty")
    body = r"\s+".join(re.escape(word) for word in text.split())
    start = r"\b" if re.match(r"\w", text) else ""
    end = r"\b" if re.search(r"\w$", text) else ""
    return re.compile(start + body + end, re.IGNORECASE)


def phrase_frequency(texts: Sequence[str], phrases: Sequence[str]) -> dict[str, dict[str, float]]:
    """For each phrase: ``per_response`` (mean occurrences per text) and ``any`` (share of texts holding it)."""
    out = {}
    for phrase in phrases:
        pattern = phrase_pattern(phrase)
        counts = [len(pattern.findall(t)) for t in texts]
        out[phrase] = {"per_response": mean(counts), "any": mean([float(c > 0) for c in counts])}
    return out


DEFAULT_PHRASES = ["wait", "let me start over", "let me correct", "let me rephrase", "let me check", "alternatively",
                   "hmm"]


def phrase_slug(phrase: str) -> str:
    """A metric-name-safe form of a phrase: "Let me start over." -> "let_me_start_over"."""
    return re.sub(r"\W+", "_", phrase.lower()).strip("_")[:48] or "phrase"


def behaviour_metrics(completions: Sequence[str], phrases: Sequence[str], token_counts: Sequence[int] | None = None,
                      prefix: str = "behaviour") -> dict[str, float]:
    """Length and phrase-frequency metrics of a batch of completion texts, named ``<prefix>/...``."""
    frequency = phrase_frequency(completions, phrases)
    metrics = {
        f"{prefix}/len_chars_mean": mean([len(t) for t in completions]),
        f"{prefix}/revision_phrases_per_response": sum(f["per_response"] for f in frequency.values()),
        f"{prefix}/responses": float(len(completions)),
    }
    if token_counts is not None:
        metrics[f"{prefix}/len_tokens_mean"] = mean(list(token_counts))
    for phrase, values in frequency.items():
        slug = phrase_slug(phrase)
        metrics[f"{prefix}/phrase/{slug}_per_response"] = values["per_response"]
        metrics[f"{prefix}/phrase/{slug}_any"] = values["any"]
    return metrics


# -------------------------------------------------------------------------------------------- torchmetrics
class AvgAtK(Metric):
    """avg@n accumulated over questions: ``update(num_correct, num_samples)`` with one entry per question."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("questions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_correct: torch.Tensor, num_samples: torch.Tensor) -> None:
        for c, n in zip(torch.as_tensor(num_correct).tolist(), torch.as_tensor(num_samples).tolist()):
            self.total += avg_at_k(int(c), int(n))
            self.questions += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.questions if self.questions > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class PassAtK(Metric):
    """Unbiased pass@k accumulated over questions: ``update(num_correct, num_samples)``, every n >= k."""

    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1, got {k}")
        self.k = k
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("questions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_correct: torch.Tensor, num_samples: torch.Tensor) -> None:
        for c, n in zip(torch.as_tensor(num_correct).tolist(), torch.as_tensor(num_samples).tolist()):
            self.total += pass_at_k(int(c), int(n), self.k)
            self.questions += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.questions if self.questions > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class RevisionStats(Metric):
    """Generate-then-revise counts (paper Table 9), one ``update`` per batch of (init, revision) verdicts.

    ``compute()`` -> initial accuracy, revised accuracy, correction rate (wrong -> right, over wrong inits),
    regression rate (right -> wrong, over right inits), mean tokens of inits and of revisions.
    """

    full_state_update = False
    _COUNTS = ("pairs", "init_correct", "revision_correct", "corrected", "regressed", "init_tokens",
               "revision_tokens")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self._COUNTS:
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, init_rewards: Sequence[float], revision_rewards: Sequence[float],
               init_tokens: Sequence[int], revision_tokens: Sequence[int]) -> None:
        if not len(init_rewards) == len(revision_rewards) == len(init_tokens) == len(revision_tokens):
            raise ValueError("RevisionStats.update needs one init and one revision per pair")
        for r0, r1 in zip(init_rewards, revision_rewards):
            before, after = r0 >= 0.5, r1 >= 0.5
            self.pairs += 1
            self.init_correct += int(before)
            self.revision_correct += int(after)
            self.corrected += int(not before and after)
            self.regressed += int(before and not after)
        self.init_tokens += int(sum(init_tokens))
        self.revision_tokens += int(sum(revision_tokens))

    def compute(self) -> dict[str, torch.Tensor]:
        pairs, right = self.pairs.double(), self.init_correct.double()
        wrong = pairs - right
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "init_acc": self.init_correct / pairs if pairs > 0 else nan,
            "revised_acc": self.revision_correct / pairs if pairs > 0 else nan,
            "correction_rate": self.corrected / wrong if wrong > 0 else nan,
            "regression_rate": self.regressed / right if right > 0 else nan,
            "init_tokens_mean": self.init_tokens / pairs if pairs > 0 else nan,
            "revision_tokens_mean": self.revision_tokens / pairs if pairs > 0 else nan,
        }


# ------------------------------------------------------------------------------------------ benchmark scores
class BenchmarkScores(torch.nn.Module):
    """Per-benchmark torchmetrics (summed across ranks): avg@n, pass@k, length, truncation, revision stats."""

    def __init__(self, names: Sequence[str], num_samples: int, pass_k: Sequence[int], revise: bool,
                 ungraded: Sequence[int] | None = None) -> None:
        """``ungraded``: per benchmark, the questions left out because their answers cannot be graded (reported in
        the ``ungraded`` column, never scored)."""
        super().__init__()
        self.names, self.num_samples, self.pass_k, self.revise = list(names), num_samples, list(pass_k), revise
        self.ungraded = list(ungraded) if ungraded is not None else [0] * len(self.names)
        self.metrics = torch.nn.ModuleDict({f"b{i}": self._metric_set() for i in range(len(self.names))})

    def _metric_set(self) -> torch.nn.ModuleDict:
        metrics = {"avg": AvgAtK(), "len": MeanMetric(), "truncated": MeanMetric(), "questions": SumMetric(),
                   "skipped": SumMetric(), **{f"pass{k}": PassAtK(k) for k in self.pass_k}}
        if self.revise:
            metrics["revision"] = RevisionStats()
        return torch.nn.ModuleDict(metrics)

    def update(self, records: Sequence[Any]) -> None:
        """``records`` (:class:`sdzero_pl.evaluation.evaluate.SampleRecord` s) hold ``num_samples`` consecutive samples per
        question: ``benchmark``, ``reward`` (None: unusable reference), ``tokens``, ``truncated`` and, with
        ``revise``, ``revision_reward`` / ``revision_tokens``."""
        n = self.num_samples
        for start in range(0, len(records), n):
            group = records[start : start + n]
            metrics = self.metrics[f"b{self.names.index(group[0].benchmark)}"]
            skipped = any(r.reward is None for r in group)  # unusable reference answer: counted, never scored
            metrics["questions"].update(1.0)
            metrics["skipped"].update(float(skipped))
            if skipped:
                continue
            correct = torch.tensor([sum(r.reward >= 0.5 for r in group)])  # binary verifier rewards
            samples = torch.tensor([len(group)])
            metrics["avg"].update(correct, samples)
            for k in self.pass_k:
                metrics[f"pass{k}"].update(correct, samples)
            metrics["len"].update(torch.tensor([float(r.tokens) for r in group]))
            metrics["truncated"].update(torch.tensor([float(r.truncated) for r in group]))
            if self.revise:
                metrics["revision"].update([r.reward for r in group], [r.revision_reward or 0.0 for r in group],
                                           [r.tokens for r in group], [r.revision_tokens for r in group])

    def compute(self) -> dict[str, dict[str, float]]:
        """``{benchmark: {metric: value}}`` plus an ``average`` row (unweighted mean over benchmarks)."""
        results = {}
        for i, name in enumerate(self.names):
            m = self.metrics[f"b{i}"]
            row = {f"avg@{self.num_samples}": float(m["avg"].compute()),
                   **{f"pass@{k}": float(m[f"pass{k}"].compute()) for k in self.pass_k},
                   "len_mean": float(m["len"].compute()), "truncated_frac": float(m["truncated"].compute()),
                   "questions": float(m["questions"].compute()), "skipped": float(m["skipped"].compute()),
                   "ungraded": float(self.ungraded[i])}
            if self.revise:
                row.update({key: float(v) for key, v in m["revision"].compute().items()})
            results[name] = row
        results["average"] = average_rows(list(results.values()))
        return results

    def reset(self) -> None:
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()


def average_rows(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over benchmarks of each metric (NaN entries left out); counts are summed."""
    out = {}
    for key in rows[0] if rows else []:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        if key in COUNTS:
            out[key] = float(sum(values))
        else:
            out[key] = sum(values) / len(values) if values else float("nan")
    return out


_PERCENT = ("avg@", "pass@", "_acc", "_rate", "_frac")
COUNTS = ("questions", "skipped", "ungraded")  # summed over benchmarks, shown as integers


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """Benchmarks as rows, metrics as columns; accuracies and rates in percent (as in the paper's tables)."""
    columns = list(next(iter(results.values())).keys())
    lines = ["| benchmark | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in results.items():
        cells = []
        for key in columns:
            value = row[key]
            if math.isnan(value):
                cells.append("-")
            elif any(tag in key for tag in _PERCENT):
                cells.append(f"{100 * value:.1f}")
            elif key in COUNTS:
                cells.append(str(int(value)))
            else:
                cells.append(f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
