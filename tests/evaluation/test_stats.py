"""The comparison table's statistics against hand-computed cases."""

import math

import pytest

from sdzero_pl.evaluation import stats


def test_mean_std_is_the_sample_standard_deviation():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = stats.mean_std([0.25])
    assert mean == 0.25 and math.isnan(std)
    with pytest.raises(ValueError):
        stats.mean_std([])


def test_sign_flip_all_positive_differences_give_two_over_two_to_the_n():
    for n in (1, 3, 5, 10):
        assert stats.sign_flip_test([0.5] * n) == pytest.approx(2 / 2**n)


def test_sign_flip_identical_methods_give_one():
    assert stats.sign_flip_test([0.0] * 20) == 1.0
    assert stats.sign_flip_test([]) == 1.0


def test_sign_flip_hand_computed_cases():
    # [3, 1]: flip sums 4, 2, -2, -4; |sum| >= 4 twice of 4
    assert stats.sign_flip_test([3.0, 1.0]) == 0.5
    # [2, 1, 1]: sums +-2 +-1 +-1 = 4, 2, 2, 0, 0, -2, -2, -4; two of 8 reach |4|; zeros never count
    assert stats.sign_flip_test([2.0, 1.0, 1.0]) == 0.25
    assert stats.sign_flip_test([2.0, 0.0, 1.0, 1.0, 0.0]) == 0.25
    # balanced differences: the observed sum is 0, every flip reaches it
    assert stats.sign_flip_test([1.0, -1.0]) == 1.0


def test_sign_flip_is_two_sided_and_float_ties_count():
    diffs = [0.1, 0.2, -0.05, 0.3, 0.15]
    assert stats.sign_flip_test(diffs) == stats.sign_flip_test([-d for d in diffs])
    assert stats.sign_flip_test([0.1] * 4) == pytest.approx(2 / 16)  # 0.1 is not exact in binary


def test_sign_flip_random_flips_are_seeded_and_approach_the_exact_value():
    diffs = [0.5, -0.25, 0.75, 0.25, 1.0, -0.5, 0.25, 0.5, 0.75, -0.25, 0.5, 0.25, 0.25, -0.75]  # 14: 16,384 flips
    exact = stats.sign_flip_test(diffs, permutations=2**14)
    sampled = stats.sign_flip_test(diffs, permutations=10_000, seed=0)
    assert sampled == stats.sign_flip_test(diffs, permutations=10_000, seed=0)
    assert abs(sampled - exact) < 0.02 and 0 < exact < 1
    assert stats.sign_flip_test([1.0] * 30) == pytest.approx(1 / 10_001, abs=2 / 10_001)  # never 0


def test_question_accuracy_counts_correct_samples_and_drops_unusable_references():
    rows = [("b", "q1", 1.0), ("b", "q1", 0.0), ("b", "q2", 1.0), ("b", "q2", 1.0),
            ("c", "q1", None), ("c", "q1", None)]
    records = [{"benchmark": b, "question_id": q, "reward": r, "sample": 0} for b, q, r in rows]
    assert stats.question_accuracy(records) == {("b", "q1"): 0.5, ("b", "q2"): 1.0}


def test_paired_comparison_averages_seeds_per_question_then_tests():
    def seed(*accuracy: float) -> dict:
        return {("b", str(i)): a for i, a in enumerate(accuracy, 1)}

    method, reference = [seed(1.0, 0.5, 1.0), seed(0.5, 0.5, 1.0)], [seed(0.0, 0.0, 0.5), seed(0.5, 0.0, 0.5)]
    result = stats.paired_comparison(method, reference)  # per-question differences 0.5, 0.5, 0.5
    assert result["mean_diff_points"] == pytest.approx(50.0) and result["questions"] == 3
    assert result["p_value"] == pytest.approx(2 / 8)
    same = stats.paired_comparison(reference, reference)
    assert same["mean_diff_points"] == 0.0 and same["p_value"] == 1.0
    missing = [{("b", "1"): 1.0, ("b", "2"): 0.5}, method[1]]  # a question missing in one seed is left out
    assert stats.paired_comparison(missing, reference)["questions"] == 2
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_comparison(method[:1], reference)


# ------------------------------------------------------------------------------------------ seed-level tests
def test_incomplete_beta_and_t_test_match_hand_computed_values():
    assert stats.betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # = P(Binomial(4, 0.4) >= 2)
    assert stats.betainc(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert stats.t_test([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.013236, abs=1e-6)  # t = 4.243, 4 df
    assert stats.t_test([0.3, -0.3]) == pytest.approx(1.0)
    assert stats.t_test([0.0, 0.0, 0.0]) == 1.0 and stats.t_test([0.2, 0.2]) == 0.0
    assert math.isnan(stats.t_test([0.5]))


def test_bootstrap_interval_covers_the_difference_and_is_seeded():
    reference = [{("b", str(q)): 0.5 for q in range(50)} for _ in range(4)]
    better = [{key: 0.6 + 0.02 * s for key in acc} for s, acc in enumerate(reference)]
    out = stats.hierarchical_bootstrap(better, reference, resamples=2000, seed=3)
    assert out == stats.hierarchical_bootstrap(better, reference, resamples=2000, seed=3)
    assert out["mean_diff_points"] == pytest.approx(13.0)
    assert 10.0 <= out["ci_low"] < 13.0 < out["ci_high"] <= 16.0 and out["p_value"] == 0.0
    same = stats.hierarchical_bootstrap(reference, reference, resamples=500)
    assert same["mean_diff_points"] == 0.0 and same["p_value"] == 1.0


def test_seed_variance_widens_the_interval_beyond_question_noise():
    """Two seeds of opposite sign, same questions: per-question averaging hides the seed spread, the bootstrap
    over seeds does not."""
    reference = [{("b", str(q)): 0.5 for q in range(100)} for _ in range(2)]
    method = [{key: 0.7 for key in reference[0]}, {key: 0.4 for key in reference[0]}]
    test = stats.paired_comparison(method, reference, permutations=2000)
    assert test["mean_diff_points"] == pytest.approx(5.0) and test["p_value"] < 0.001  # questions: "significant"
    assert test["ci_low"] < 0.0 < test["ci_high"] and test["bootstrap_p_value"] > 0.2  # seeds x questions: not
    assert test["seed_p_value"] > 0.5 and test["seeds"] == 2


def test_p_values_at_the_floor_print_as_less_than_one_over_n():
    assert stats.format_p(0.0, 10_000) == "< 1/10,000"
    assert stats.format_p(1 / 10_001, 10_000) == "< 1/10,000"
    assert stats.format_p(0.0123, 10_000) == "0.0123" and stats.format_p(math.nan) == "n/a"
    assert stats.format_p(stats.t_test([0.2, 0.2, 0.2])) == "0 (equal differences)"  # not a bare "0"
