"""Rollout backends behind one interface; pick one in YAML by ``class_path``."""

from sdzero_pl.rollout.base import Rollout, RolloutBackend, RolloutCallback, before_rollout, rollout_seed, split_at_stop
from sdzero_pl.rollout.hf import HFRollout
from sdzero_pl.rollout.vllm import VLLMRollout  # imports vllm only when an engine is built

__all__ = [
    "Rollout", "RolloutBackend", "RolloutCallback", "HFRollout", "VLLMRollout", "before_rollout", "rollout_seed",
    "split_at_stop",
]
