"""The GPU check's device part (scripts/gpu_check.sh device) on CPU: the carried-wheel install path the lent GPU
machine uses (pure-Python wheels into a target folder, the project on PYTHONPATH), inside a simulated copy of that
machine's package set (scripts/gpu_image_env.py), every step at toy sizes. No figure is checked: only that the first
GPU run cannot fail on packaging or on a step that does not run at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEELS = sorted((ROOT / ".whl").glob("*.whl"))
DEVICE_STEPS = ["build", "numerics", "distill_loss", "hf_generate", "phase2_step_4b", "fit_fsdp", "distill_loss_bf16",
                "batching"]


def _importable(name: str, pythonpath: str) -> bool:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-S", "-c", f"import {name}"], env=env, capture_output=True).returncode == 0


def test_the_simulated_image_lacks_what_the_gpu_image_lacks(tmp_path):
    subprocess.run([sys.executable, "scripts/gpu_image_env.py", str(tmp_path / "image")], cwd=ROOT, check=True,
                   capture_output=True)
    pythonpath = f"{tmp_path / 'image'}:{ROOT}"
    assert _importable("lightning.pytorch", pythonpath) and _importable("transformers", pythonpath)
    for name in ("jsonargparse", "vllm", "datasets", "math_verify"):
        assert not _importable(name, pythonpath), name


@pytest.mark.slow
@pytest.mark.skipif(not WHEELS, reason="no carried wheels in .whl/: `bash scripts/gpu_check.sh wheels` downloads them "
                                       "(scripts/test.sh does, where a package index is reachable)")
def test_device_part_runs_on_cpu_through_the_carried_wheel_install(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "GPU_CHECK_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "device"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "gpu_check_device.json").read_text())
    assert [s["step"] for s in summary["steps"]] == DEVICE_STEPS
    assert all(s["ok"] for s in summary["steps"]), [s for s in summary["steps"] if not s["ok"]]
    origin = summary["environment"]["imported_from"]
    assert origin["jsonargparse"].startswith(str(tmp_path / "site"))  # from the carried wheels, not this venv
    assert origin["math_verify"].startswith(str(tmp_path / "site"))
    assert origin["sdzero_pl"] == str(ROOT / "sdzero_pl")  # the project from PYTHONPATH, not pip-installed
    assert proc.stdout.count("RESULT ") == len(DEVICE_STEPS)
