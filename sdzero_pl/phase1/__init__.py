"""Phase 1 of SD-Zero, Self-Revision Training: trace collection and SFT on verified revisions."""

from sdzero_pl.phase1.srt import SelfReviseSFTModule, TraceDataModule

__all__ = ["SelfReviseSFTModule", "TraceDataModule"]
