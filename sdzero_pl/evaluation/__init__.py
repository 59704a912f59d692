"""Evaluation and analyses: benchmarks, the evaluator (avg@k, pass@k, generate-then-revise), metrics, plots."""

from sdzero_pl.evaluation.evaluate import EvalDataModule, EvalModule

__all__ = ["EvalDataModule", "EvalModule"]
