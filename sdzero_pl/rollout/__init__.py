"""Rollout backends behind one interface; pick one in YAML by ``class_path``."""

from sdzero_pl.rollout.base import Rollout, RolloutBackend, split_at_stop
from sdzero_pl.rollout.hf import HFRollout

__all__ = ["Rollout", "RolloutBackend", "HFRollout", "split_at_stop"]
