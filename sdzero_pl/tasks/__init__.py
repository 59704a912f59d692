"""Verifiable tasks generated locally (no download), used by the embedded CPU demo."""

from sdzero_pl.tasks.arithmetic import SPLITS, Problem, TaskSettings, generate_split, iter_problems, write_jsonl

__all__ = ["SPLITS", "Problem", "TaskSettings", "generate_split", "iter_problems", "write_jsonl"]
