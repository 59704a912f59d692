"""Phase 1 of SD-Zero, Self-Revision Training: trace collection and SFT on verified revisions."""

from sdzero_pl.phase1.data import TraceDataModule
from sdzero_pl.phase1.srt import SelfReviseSFTModule

__all__ = ["SelfReviseSFTModule", "TraceDataModule"]
