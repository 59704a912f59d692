"""Benchmark of what robustness costs (docs/robustness.md), each against a reference measured in the same run:

* checkpoint writing: ``AtomicCheckpointIO`` (streams into a temporary sibling, fsync, rename) against Lightning's
  ``TorchCheckpointIO`` (serialises into memory, then writes through an fsspec transaction), for a state dict of
  ``--mb`` MiB of float32 tensors: wall time and peak resident-memory growth, each writer in its own subprocess
  (the kernel's high-water mark, reset once the state dict exists);
* the HF export: ``export_hf`` (staged directory, sha256 manifest, fsync, rename) against plain ``save_pretrained``
  of model and tokenizer, for a random Qwen3 of about ``--params`` M parameters;
* the divergence guard's per-step checks (every gradient before the step, every weight after it) against one AdamW
  step over the same ``--params`` M parameters.

    .venv/bin/python -m perf.bench_artifacts                     # 512 MiB checkpoint, ~100M-parameter model
    .venv/bin/python -m perf.bench_artifacts --mb 8 --params 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_checkpoint(writer: str, mb: int, directory: str) -> dict:
    """One checkpoint of ``mb`` MiB with ``writer`` ("atomic" | "lightning"): seconds and peak RSS growth (bytes)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from sdzero_pl.core.artifacts import AtomicCheckpointIO

    n = mb * 2**20 // 4 // 16
    state = {"state_dict": {f"w{i}": torch.randn(n) for i in range(16)}, "epoch": 0}
    io = AtomicCheckpointIO() if writer == "atomic" else TorchCheckpointIO()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: the state dict exists now
    base = _vm("VmRSS")
    start = time.perf_counter()
    io.save_checkpoint(state, os.path.join(directory, f"{writer}.ckpt"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": _vm("VmHWM") - base}


def _in_subprocess(writer: str, mb: int, directory: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from perf.bench_artifacts import write_checkpoint; "
            f"print(json.dumps(write_checkpoint({writer!r}, {mb}, {directory!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_times(params_m: float, directory: str, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of ``export_hf`` and of plain ``save_pretrained`` (model + tokenizer)."""
    from sdzero_pl.core.models import export_hf, load_tokenizer
    from sdzero_pl.core.tiny import save_tiny_model

    tiny = save_tiny_model(Path(directory) / "tokenizer_source", seed=0)
    tokenizer = load_tokenizer(str(tiny))
    model = _model(params_m)
    times = {"export_hf": [], "save_pretrained": []}
    for i in range(repeats):
        start = time.perf_counter()
        model.save_pretrained(Path(directory) / f"plain{i}")
        tokenizer.save_pretrained(Path(directory) / f"plain{i}")
        times["save_pretrained"].append(time.perf_counter() - start)
        start = time.perf_counter()
        export_hf(model, tokenizer, Path(directory) / f"atomic{i}")
        times["export_hf"].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _model(params_m: float):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden = 512 if params_m >= 20 else 128
    layers = max(1, round(params_m * 1e6 / (12 * hidden * hidden)))
    config = Qwen3Config(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=hidden // 8)
    return Qwen3ForCausalLM(config)


def guard_times(params_m: float, repeats: int) -> dict:
    """Seconds of the guard's checks (gradients + weights) and of one AdamW step over the same parameters."""
    from sdzero_pl.core.guard import nonfinite

    model = _model(params_m)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()  # the moments exist
    checks, steps = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        assert not nonfinite([p.grad for p in params]) and not nonfinite(params)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    return {"guard_checks": min(checks), "adamw_step": min(steps), "parameters": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MiB (default 512)")
    parser.add_argument("--params", type=float, default=100, help="model size in millions of parameters (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the export and guard timings")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        ckpt = {w: _in_subprocess(w, args.mb, directory) for w in ("lightning", "atomic")}
        export = export_times(args.params, directory, args.repeats)
    guard = guard_times(args.params, args.repeats)
    ref = ckpt["lightning"]
    print(f"checkpoint, {args.mb} MiB | time | x Lightning | peak RSS growth | x Lightning")
    for writer, row in ckpt.items():
        print(f"{writer:>10} | {row['seconds']:.2f} s | {row['seconds'] / ref['seconds']:.2f} | "
              f"{row['peak_bytes'] / 2**20:.0f} MiB | {row['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}")
    print(f"export, {guard['parameters'] / 1e6:.0f}M parameters: export_hf {export['export_hf']:.2f} s, "
          f"save_pretrained {export['save_pretrained']:.2f} s, x {export['export_hf'] / export['save_pretrained']:.2f}")
    print(f"guard per optimizer step: {guard['guard_checks'] * 1e3:.1f} ms, AdamW step {guard['adamw_step'] * 1e3:.1f} ms,"
          f" x {guard['guard_checks'] / guard['adamw_step']:.2f}")
    return {"checkpoint": ckpt, "export": export, "guard": guard}


if __name__ == "__main__":
    main()
