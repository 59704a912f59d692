"""Losses of the GRPO baseline (docs/method.md, "Results": "GRPO (DAPO variant)"): pure functions, tensors in, tensors out.

* :func:`group_advantages`: GRPO's group-relative advantage ``(r - mean_group) / (std_group + eps)`` of a binary
  reward, or ``r - mean_group`` with ``scale_by_std=False`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783). The
  std is the unbiased sample std (``torch.std``, as in TRL and verl). Rows whose reward is unknown (an unusable
  reference answer) are left out of the group statistics and get advantage 0.
* :func:`clipped_pg_loss`: PPO's clipped surrogate per token with DAPO's decoupled clip range
  ``[1 - clip_low, 1 + clip_high]`` ("Clip-Higher", DAPO, Yu et al. 2025, arXiv 2503.14476: 0.2 / 0.28).
* :func:`k3_kl`: the k3 estimator of KL(policy || reference) from the sampled tokens' log-probs (Schulman 2020,
  as in GRPO's DeepSeekMath paper, arXiv 2402.03300, Eq. 4).

Token-mean normalisation over the global batch (DAPO's "token-level policy gradient loss") is
:func:`sdzero_pl.core.losses.normalised_sum`, shared with Phase 2.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor | None = None, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised advantages. rewards (G, n): n completions of each of G questions -> (G, n).

    ``valid`` (G, n) marks the rewards that exist; the others are excluded from the mean and std and get 0.
    A group whose valid rewards are all equal (all right or all wrong) gets exactly 0 everywhere.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, group_size), got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    weight = valid.to(rewards.dtype)  # (G, n)
    count = weight.sum(-1, keepdim=True)  # (G, 1)
    mean = (rewards * weight).sum(-1, keepdim=True) / count.clamp(min=1)  # (G, 1)
    centred = (rewards - mean) * weight  # (G, n)
    if not scale_by_std:
        return centred
    std = ((centred**2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # (G, 1), unbiased
    return centred / (std + eps)


def zero_signal_groups(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(G,) True where a group's valid rewards are all equal (or fewer than two): its advantages are all 0, the
    groups DAPO's dynamic sampling filters out. rewards, valid (G, n)."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    high = torch.where(valid, rewards, torch.full_like(rewards, -float("inf"))).amax(-1)  # (G,)
    low = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(-1)  # (G,)
    return (valid.sum(-1) < 2) | (high == low)


def clipped_pg_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> dict[str, torch.Tensor]:
    """Per-token clipped policy-gradient loss ``-min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)``.

    logps (N,) are the current policy's log-probs of the sampled tokens (with gradient), old_logps (N,) those of
    the policy that sampled them (no gradient), advantages (N,) the advantage of each token's completion.
    Returns ``{"loss": (N,), "ratio": (N,), "clipped_low": (N,) bool, "clipped_high": (N,) bool}``; a token is
    "clipped" where the clipped branch is the active one (its gradient is 0).
    """
    check_clip(clip_low, clip_high)
    logps = logps.to(torch.promote_types(logps.dtype, torch.float32))
    ratio = torch.exp(logps - old_logps.detach().to(logps.dtype))  # (N,)
    advantages = advantages.detach().to(logps.dtype)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)  # (N,)
    active = clipped < unclipped  # the min picks the constant branch
    return {
        "loss": loss,
        "ratio": ratio.detach(),
        "clipped_low": active & (advantages < 0),
        "clipped_high": active & (advantages > 0),
    }


def check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"`--model.clip_low` must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"`--model.clip_high` must be >= 0, got {clip_high}")


def k3_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) per sampled token: ``exp(q - p) - (q - p) - 1`` with p = log
    policy(y_t), q = log ref(y_t). Non-negative, 0 where the two agree; its expectation under the policy is the KL.
    policy_logps (N,) carries the gradient, ref_logps (N,) is detached here. -> (N,)"""
    policy_logps = policy_logps.to(torch.promote_types(policy_logps.dtype, torch.float32))
    delta = ref_logps.detach().to(policy_logps.dtype) - policy_logps
    return torch.exp(delta) - delta - 1.0
