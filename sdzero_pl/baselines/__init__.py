"""Baselines of the paper's comparison: RFT (on Phase 1's SFT module) and GRPO (DAPO variant)."""

from sdzero_pl.baselines.grpo import GRPOModule
from sdzero_pl.baselines.grpo_data import GroupRolloutDataModule
from sdzero_pl.baselines.rft import RFTDataModule

__all__ = ["GRPOModule", "GroupRolloutDataModule", "RFTDataModule"]
