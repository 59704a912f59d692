"""avg@n, unbiased pass@k, bucket shares and phrase frequencies against hand-computed cases and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from callbacks.behaviour import RolloutBehaviourLogger, behaviour_metrics, phrase_slug
from sdzero_pl.evaluation.metrics import (
    AvgAtK, PassAtK, RevisionStats, avg_at_k, bucket_shares, mean_bucket_shares, pass_at_k, phrase_frequency
)


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (2, 1, 1, 0.5),
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (8, 0, 8, 0.0),
        (8, 1, 8, 1.0),  # n == k: "any correct"
        (8, 3, 1, 3 / 8),  # pass@1 == c / n
        (10, 8, 3, 1.0),  # n - c < k: every subset holds a correct sample
    ],
)
def test_pass_at_k_matches_hand_computed_cases(n, c, k, expected):
    assert pass_at_k(c, n, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(c, n, k) == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_rejects_k_above_n_and_bad_counts():
    with pytest.raises(ValueError, match="k=9, n=8"):
        pass_at_k(1, 8, 9)
    with pytest.raises(ValueError, match="correct"):
        pass_at_k(9, 8, 1)
    with pytest.raises(ValueError, match="samples"):
        avg_at_k(0, 0)


def test_avg_at_k_is_the_share_of_correct_samples():
    assert avg_at_k(3, 8) == 3 / 8


def test_torchmetrics_accumulate_over_batches_and_ranks_like_one_pass():
    correct, samples = [0, 1, 4, 8, 2], [8, 8, 8, 8, 8]
    expected_avg = sum(c / 8 for c in correct) / 5
    expected_pass = sum(pass_at_k(c, 8, 4) for c in correct) / 5
    rank0_avg, rank1_avg, rank0_pass, rank1_pass = AvgAtK(), AvgAtK(), PassAtK(4), PassAtK(4)
    rank0_avg.update(torch.tensor(correct[:2]), torch.tensor(samples[:2]))  # two batches on rank 0
    rank0_avg.update(torch.tensor(correct[2:3]), torch.tensor(samples[2:3]))
    rank1_avg.update(torch.tensor(correct[3:]), torch.tensor(samples[3:]))
    rank0_pass.update(torch.tensor(correct[:3]), torch.tensor(samples[:3]))
    rank1_pass.update(torch.tensor(correct[3:]), torch.tensor(samples[3:]))
    rank0_avg.merge_state(rank1_avg)  # what the cross-rank "sum" reduction does
    rank0_pass.merge_state(rank1_pass)
    assert float(rank0_avg.compute()) == pytest.approx(expected_avg)
    assert float(rank0_pass.compute()) == pytest.approx(expected_pass)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metrics_compute_nan():
    assert math.isnan(float(AvgAtK().compute()))
    assert math.isnan(float(PassAtK(1).compute()))


def test_revision_stats_hand_case():
    stats = RevisionStats()
    # init:     1  0  0  0  1
    # revision: 1  1  0  1  0  -> corrected 2 of 3 wrong, regressed 1 of 2 right
    stats.update([1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [10, 20, 30], [5, 5, 5])
    stats.update([0.0, 1.0], [1.0, 0.0], [40, 50], [5, 15])
    out = {k: float(v) for k, v in stats.compute().items()}
    assert out["init_acc"] == pytest.approx(2 / 5)
    assert out["revised_acc"] == pytest.approx(3 / 5)
    assert out["correction_rate"] == pytest.approx(2 / 3)
    assert out["regression_rate"] == pytest.approx(1 / 2)
    assert out["init_tokens_mean"] == pytest.approx(30.0)
    assert out["revision_tokens_mean"] == pytest.approx(7.0)


# ----------------------------------------------------------------------------------------------- buckets
def test_bucket_shares_hand_computed():
    assert bucket_shares([1.0, 3.0, 2.0, 4.0], 2) == pytest.approx([7 / 10, 3 / 10])  # sorted high to low
    assert bucket_shares([1.0, 3.0, 2.0, 4.0], 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert bucket_shares([6.0, 0.0, 0.0, 0.0, 0.0], 5) == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])


def test_bucket_shares_sum_to_one_and_are_non_increasing():
    values = torch.rand(1003, generator=torch.Generator().manual_seed(0)) ** 3
    shares = bucket_shares(values, 20)
    assert len(shares) == 20
    assert sum(shares) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(shares, shares[1:]))


def test_bucket_shares_flat_when_total_is_zero_and_empty_buckets_when_few_tokens():
    assert bucket_shares([0.0] * 40, 20) == pytest.approx([0.05] * 20)
    few = bucket_shares([2.0, 1.0, 1.0], 5)
    assert few == pytest.approx([0.5, 0.25, 0.25, 0.0, 0.0])


def test_bucket_shares_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one token"):
        bucket_shares([], 20)
    with pytest.raises(ValueError, match=">= 0"):
        bucket_shares([1.0, -0.5], 2)
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_shares([1.0], 0)


def test_mean_bucket_shares_weighs_responses_equally_and_skips_short_ones():
    long_a = [4.0, 3.0, 2.0, 1.0]  # shares 0.7, 0.3
    long_b = [1.0, 1.0, 1.0, 1.0]  # shares 0.5, 0.5
    assert mean_bucket_shares([long_a, long_b, [5.0]], 2) == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mean_bucket_shares([[1.0]], 2)


# --------------------------------------------------------------------------------------------- behaviour
def test_phrase_frequency_counts_whole_words_case_insensitively():
    texts = ["Wait, wait. I was awaiting this.", "Let me  start\nover. Wait!", "no phrases here"]
    freq = phrase_frequency(texts, ["wait", "let me start over"])
    assert freq["wait"]["per_response"] == pytest.approx(3 / 3)  # 2 + 1 + 0, "awaiting" not counted
    assert freq["wait"]["any"] == pytest.approx(2 / 3)
    assert freq["let me start over"]["per_response"] == pytest.approx(1 / 3)


def test_behaviour_metrics_names_and_values():
    metrics = behaviour_metrics(["Wait, no.", "ok"], ["wait"], token_counts=[4, 2])
    assert metrics["behaviour/len_tokens_mean"] == 3.0
    assert metrics["behaviour/len_chars_mean"] == pytest.approx((9 + 2) / 2)
    assert metrics["behaviour/phrase/wait_per_response"] == 0.5
    assert metrics["behaviour/phrase/wait_any"] == 0.5
    assert metrics["behaviour/revision_phrases_per_response"] == 0.5


def test_behaviour_logger_adds_the_control_phrases_and_validates():
    logger = RolloutBehaviourLogger(phrases=["wait"], control_preset="paper")
    assert logger.phrases[0] == "wait" and len(logger.phrases) == 3
    assert phrase_slug("Wait, this response is not correct, let me start over.").startswith("wait_this_response")
    with pytest.raises(ValueError, match="control_preset"):
        RolloutBehaviourLogger(control_preset="nope")
    with pytest.raises(ValueError, match="empty"):
        RolloutBehaviourLogger(phrases=["  "], control_preset=None)
