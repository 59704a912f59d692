"""Smoke tests of the Phase-2 step benchmarks at toy sizes (no timing asserted): the GPU check's issue-16 steps in
their CPU smoke mode (fixed-count vs length-aware batching, the bf16 distillation loss) and the project side of the
TRL comparison (TRL itself lives in the benchmark's own environment, which a test cannot install offline)."""

from __future__ import annotations

import json

import pytest

from perf import bench_vs_trl, gpu_figures


@pytest.mark.slow
def test_gpu_figures_run_every_step_in_smoke_mode(tmp_path):
    batching = gpu_figures.batching(str(tmp_path), smoke=True)
    assert batching["targets"]["equal_gradients"] and batching["grad_rel_diff"] < 1e-4
    assert set(batching["step_s"]) == {"count", "tokens"} and batching["real_tokens"] > 0
    assert batching["padding_frac"]["tokens"] <= batching["padding_frac"]["count"]
    loss = gpu_figures.distill_loss(str(tmp_path), smoke=True)
    assert loss["dtype"] == "bfloat16" and loss["ok"]


@pytest.mark.slow
def test_the_project_side_of_the_trl_comparison_runs(tmp_path):
    out = tmp_path / "figures.json"
    assert bench_vs_trl.main(["--vocab", "256", "--hidden", "32", "--layers", "1", "--prompts", "2",
                              "--completion-len", "16", "--rounds", "1", "--impls", "sdzero,naive",
                              "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["step_s"]) == {"sdzero", "naive"} and all(t > 0 for t in figures["step_s"].values())
