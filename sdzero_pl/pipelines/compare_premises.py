"""The comparison's premise steps (:mod:`sdzero_pl.evaluation.premises`): which rows need which measurement, running
one on the suite's validation split, and reading them back for the table.

One measurement per seed: the reviser probe of that seed's SRT model (SD-Zero's premise, shown on the control's
row too), and for each SDFT variant its teacher against its student on the base model. Each writes
``<out>/seed<s>/<method>/premise/premise.json`` through :func:`~sdzero_pl.core.artifacts.staged_dir`, so a
finished measurement is reused like every other step.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Sequence

import yaml

from sdzero_pl.core.artifacts import staged_dir
from sdzero_pl.core.prompts import ControlPhrases
from sdzero_pl.evaluation import premises
from sdzero_pl.phase2.onpolicy import DEMONSTRATION_TEMPLATE

PREMISE_OF = {"sdzero": "srt", "control": "srt", "sdft": "sdft", "sdft_answer": "sdft_answer"}  # row -> step method
KIND = {"srt": "reviser", "sdft": "demonstration", "sdft_answer": "answer"}


def premise_methods(methods: Sequence[str]) -> list[str]:
    """The methods whose premise step runs (``srt`` = the reviser probe), in ``methods``' order."""
    return list(dict.fromkeys(PREMISE_OF[m] for m in methods if m in PREMISE_OF))


def _instantiate(spec: dict):
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def run_premise(method: str, model: str, questions: Path, config: Path, eval_config: Path, out_dir: Path, n: int,
                seed: int) -> None:
    """Measure ``method``'s premise (``srt``: the reviser probe, read with ``config``'s control phrases = Phase 2's;
    ``sdft`` / ``sdft_answer``: teacher vs student with ``config``'s teacher prompt) on the first ``n`` questions,
    sampling as ``eval_config`` does, with ``config``'s training verifier; writes ``out_dir/premise.json``."""
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    rollout = yaml.safe_load(eval_config.read_text())["model"]["init_args"]["rollout"]["init_args"]
    reward = _instantiate(data["reward"])
    try:
        measured = premises.measure(
            KIND[method], model, str(questions), reward=reward, n=n, seed=seed,
            instruction=data["questions"].get("instruction", ""), system_prompt=data["questions"].get("system_prompt"),
            template=data.get("demonstration_template", DEMONSTRATION_TEMPLATE),
            phrases=ControlPhrases(**data.get("control", {})).phrases, temperature=rollout["temperature"],
            max_new_tokens=rollout["max_new_tokens"])
    finally:
        reward.close()
    record = {"method": method, "kind": KIND[method], "model": model, "questions": str(questions), "n": n,
              "seed": seed, "config": str(config), "measured": measured}
    with staged_dir(out_dir, "premise") as tmp:
        (tmp / "premise.json").write_text(json.dumps(record, indent=2) + "\n")


def premise_verdicts(methods: Sequence[str], measured: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row of the table its verdict (:func:`~sdzero_pl.evaluation.premises.judge`) and the seed-mean numbers;
    ``measured``: per premise step method, one ``measured`` dict per seed (absent: not measured)."""
    out = {}
    for method in methods:
        step = PREMISE_OF.get(method)
        values = measured.get(step) if step else None
        mean = premises.mean_over_seeds([{k: v for k, v in m.items() if k != "probe"} for m in values]) \
            if values else None
        out[method] = {**premises.judge(method, mean), "measured": mean,
                       "per_seed": [{k: v for k, v in m.items() if k != "probe"} for m in values] if values else None}
    return out
