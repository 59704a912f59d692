"""Sample-budget ledger: generations and generated tokens per phase, saved as ``budget.json`` next to the outputs.

The paper compares methods at equal sample budgets (SD-Zero: 10K + 30K = 40K Phase-1 generations + 9K Phase-2
rollouts, against about 60K for the baselines; docs/method.md, "Results"). Every phase that samples from a model adds its
counts here, so a run can state "40K generations, N tokens" the same way.

Entries are keyed by phase name (``"phase1/init"``, ``"phase1/revision"``, ``"phase2/rollout"``, ...). ``add``
increments an entry (a phase that generates step by step), ``set`` replaces it with an absolute count (a phase
that can recount itself from its own outputs, such as resumable trace collection, so a resumed run never counts a
generation twice). The file is rewritten atomically after every change; only one process (rank 0) should write it.

    ledger = BudgetLedger("runs/srt/budget.json")
    ledger.add("phase2/rollout", generations=128, tokens=91_344)
    ledger.summary()  # "phase1/init: 10,000 generations, ...; total: 40,000 generations, 412,300,112 tokens"
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class BudgetLedger:
    """Generation and token counts per phase, persisted as JSON at ``path`` (loaded if it exists)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.phases: dict[str, dict[str, int]] = {}
        if self.path.exists():
            self.phases = _read(self.path)

    def add(self, phase: str, generations: int, tokens: int) -> None:
        """Add ``generations`` samples holding ``tokens`` generated tokens to ``phase`` and save."""
        entry = self.phases.setdefault(phase, {"generations": 0, "tokens": 0})
        self.set(phase, entry["generations"] + generations, entry["tokens"] + tokens)

    def set(self, phase: str, generations: int, tokens: int) -> None:
        """Replace the counts of ``phase`` (absolute values) and save."""
        if generations < 0 or tokens < 0:
            raise ValueError(f"budget counts must be >= 0, got generations={generations}, tokens={tokens}")
        self.phases[phase] = {"generations": int(generations), "tokens": int(tokens)}
        self.save()

    def merge(self, other: str | os.PathLike) -> None:
        """Copy the entries of another ledger file (e.g. the previous phase's) into this one; its entries replace
        entries of the same name, so merging the same file twice counts it once."""
        self.phases.update(_read(Path(other)))
        self.save()

    def totals(self) -> dict[str, int]:
        return {
            "generations": sum(e["generations"] for e in self.phases.values()),
            "tokens": sum(e["tokens"] for e in self.phases.values()),
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"phases": self.phases, "total": self.totals()}, indent=2) + "\n")
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file, never half of one

    def summary(self) -> str:
        parts = [f"{name}: {_counts(e)}" for name, e in sorted(self.phases.items())]
        return "; ".join(parts + [f"total: {_counts(self.totals())}"])


def _counts(entry: dict[str, int]) -> str:
    return f"{entry['generations']:,} generations, {entry['tokens']:,} tokens"


def _read(path: Path) -> dict[str, dict[str, int]]:
    try:
        data = json.loads(path.read_text())
        phases = data["phases"]
        return {str(k): {"generations": int(v["generations"]), "tokens": int(v["tokens"])} for k, v in phases.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a budget ledger ({type(error).__name__}: {error})") from error
