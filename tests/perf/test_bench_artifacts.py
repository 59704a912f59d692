"""Smoke test of perf/bench_artifacts.py at tiny sizes: each measurement runs and reports what it measured (no
timing asserted)."""

from __future__ import annotations

import pytest

from perf.bench_artifacts import export_times, guard_times, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_measurement_runs_at_tiny_sizes(tmp_path):
    for writer in ("lightning", "atomic"):
        row = write_checkpoint(writer, 1, str(tmp_path))
        assert row["seconds"] > 0 and (tmp_path / f"{writer}.ckpt").stat().st_size > 2**20
    export = export_times(0.5, str(tmp_path), repeats=1)
    assert export["export_hf"] > 0 and export["save_pretrained"] > 0
    assert (tmp_path / "atomic0" / "sdzero_manifest.json").is_file()
    guard = guard_times(0.5, repeats=1)
    assert guard["guard_checks"] > 0 and guard["adamw_step"] > 0 and guard["parameters"] > 0
