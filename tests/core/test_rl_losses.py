"""GRPO / DAPO losses against hand-computed cases: advantages, the asymmetric clip on both sides, the k3 KL, and the
token mean that does not change with the micro-batch split."""

from __future__ import annotations

import math

import pytest
import torch

from sdzero_pl.core.losses import normalised_sum
from sdzero_pl.core.rl_losses import clipped_pg_loss, group_advantages, k3_kl, zero_signal_groups


# ------------------------------------------------------------------------------------------------- advantages
def test_advantages_of_one_right_in_four_hand_computed():
    # mean 0.25; unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    centred = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scale_by_std=False)
    torch.testing.assert_close(centred, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_groups_are_normalised_separately():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5], [-1.5, 0.5, 0.5, 0.5]]))


def test_advantages_of_all_equal_groups_are_exactly_zero():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    for scale in (True, False):
        assert torch.equal(group_advantages(rewards, scale_by_std=scale), torch.zeros(2, 4))
    assert zero_signal_groups(rewards).tolist() == [True, True]
    assert zero_signal_groups(torch.tensor([[1.0, 0.0, 1.0, 1.0]])).tolist() == [False]


def test_unknown_rewards_are_left_out_of_the_group_statistics():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    valid = torch.tensor([[True, True, False, True]])
    # valid rewards 1, 0, 1: mean 2/3, unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3
    s = math.sqrt(1 / 3)
    expected = torch.tensor([[(1 / 3) / s, (-2 / 3) / s, 0.0, (1 / 3) / s]])
    torch.testing.assert_close(group_advantages(rewards, valid, eps=0.0), expected)
    # one known reward left: no comparison possible, no signal
    one = torch.tensor([[True, False, False, False]])
    assert torch.equal(group_advantages(rewards, one), torch.zeros(1, 4))
    assert zero_signal_groups(rewards, one).tolist() == [True]


# ----------------------------------------------------------------------------------------------- clipped PG
def _pg(ratio: float, advantage: float, clip_low=0.2, clip_high=0.28):
    logps = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    out = clipped_pg_loss(logps, torch.zeros(1, dtype=torch.float64), torch.tensor([advantage], dtype=torch.float64),
                          clip_low, clip_high)
    out["loss"].sum().backward()
    return float(out["loss"].detach()), float(logps.grad), bool(out["clipped_low"]), bool(out["clipped_high"])


@pytest.mark.parametrize("ratio, advantage, loss, grad, low, high", [
    (1.0, 1.0, -1.0, -1.0, False, False),     # on-policy: -A, d/dlogp = -rho * A
    (1.1, 1.0, -1.1, -1.1, False, False),     # inside the range
    (1.25, 1.0, -1.25, -1.25, False, False),  # above a symmetric 0.2 but below DAPO's 1.28: still trained
    (1.5, 1.0, -1.28, 0.0, False, True),      # A > 0, ratio past 1 + clip_high: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5, False, False),     # A > 0 and the ratio fell: never clipped (pessimistic min)
    (0.5, -1.0, 0.8, 0.0, True, False),       # A < 0, ratio below 1 - clip_low: clipped, no gradient
    (0.9, -1.0, 0.9, 0.9, False, False),      # inside the range
    (1.5, -1.0, 1.5, 1.5, False, False),      # A < 0 and the ratio rose: never clipped
    (2.0, 0.0, 0.0, 0.0, False, False),       # zero advantage: nothing
])
def test_clipped_pg_loss_hand_computed(ratio, advantage, loss, grad, low, high):
    got = _pg(ratio, advantage)
    assert got[0] == pytest.approx(loss) and got[1] == pytest.approx(grad)
    assert got[2:] == (low, high)


def test_symmetric_clip_is_the_special_case_clip_high_equal_clip_low():
    assert _pg(1.25, 1.0, 0.2, 0.2)[:2] == (pytest.approx(-1.2), 0.0)


def test_bad_clip_ranges_name_the_flag():
    with pytest.raises(ValueError, match="clip_low"):
        clipped_pg_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        clipped_pg_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), clip_high=-0.1)


# --------------------------------------------------------------------------------------------------- k3 KL
def test_k3_hand_computed_and_zero_when_equal():
    # policy 0.5, reference 0.25: exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.693147 - 1
    got = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    torch.testing.assert_close(got, torch.tensor([0.5 + math.log(2.0) - 1.0]))
    logps = torch.log(torch.tensor([0.1, 0.7, 0.2]))
    assert torch.equal(k3_kl(logps, logps), torch.zeros(3))


def test_k3_expectation_under_the_policy_is_kl_policy_to_reference():
    policy = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = (policy * (policy.log() - ref.log())).sum()  # KL(policy || ref), not the reverse
    torch.testing.assert_close((policy * k3_kl(policy.log(), ref.log())).sum(), expected)


def test_k3_gradient_reaches_the_policy_only():
    policy = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-2.0], requires_grad=True)
    k3_kl(policy, ref).sum().backward()
    assert policy.grad is not None and ref.grad is None
    torch.testing.assert_close(policy.grad, torch.tensor([1.0 - math.exp(-1.0)]))  # d/dp = 1 - exp(q - p)


# ---------------------------------------------------------------------------------------------- token mean
def test_token_mean_is_the_same_for_micro_batch_4x1_and_1x4_float64():
    torch.manual_seed(0)
    lengths = [3, 1, 5, 2]  # completions of different lengths: a per-sequence mean would weight them differently
    total = sum(lengths)
    logps = torch.randn(total, dtype=torch.float64) * 0.1 - 1.0
    old = logps + torch.randn(total, dtype=torch.float64) * 0.2  # ratios on both sides of the clip range
    adv = torch.repeat_interleave(torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64), torch.tensor(lengths))

    whole = logps.clone().requires_grad_(True)
    loss = normalised_sum(clipped_pg_loss(whole, old, adv)["loss"], total, accumulate=1)
    loss.backward()

    split = logps.clone().requires_grad_(True)
    accumulated = 0.0
    for piece, o, a in zip(split.split(lengths), old.split(lengths), adv.split(lengths)):
        micro = normalised_sum(clipped_pg_loss(piece, o, a)["loss"], total, accumulate=4)
        (micro / 4).backward()  # Lightning divides each micro-batch loss by accumulate_grad_batches
        accumulated += float(micro.detach()) / 4
    assert accumulated == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=0, atol=1e-15)
    token_mean = clipped_pg_loss(logps, old, adv)["loss"].mean()
    assert float(loss.detach()) == pytest.approx(float(token_mean), rel=1e-12)
