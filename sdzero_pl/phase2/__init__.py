"""Phase 2 of SD-Zero: on-policy self-distillation of the Reviser into the Generator."""

from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule

__all__ = ["SelfDistillModule", "OnPolicyDataModule"]
