"""GPU check of the scaling path, in two parts (see gpu_check.sh and docs/scaling.md, "GPU check").

    python scripts/gpu_check.py device [--steps a,b] [--out DIR]   # part 1: no vLLM (the lent GPU image)
    python scripts/gpu_check.py vllm --steps engine [--out DIR]     # part 2: vLLM, on users' own GPU machines

A part is an ordered list of steps; a step is a function ``fn(ctx) -> dict`` of figures registered with
``@step(part, name)`` (part 1's live in ``gpu_check_device.py``, part 2's in ``gpu_check_vllm.py``). To add a check,
write one more registered function: the driver runs the steps in registration order, each with its own timer and
peak-memory counter, prints one ``RESULT {json}`` line per step and rewrites ``<out>/gpu_check_<part>.json`` after
every step, so a run cut short keeps what it measured. A step that raises is recorded as failed (its traceback
tail in the JSON) and the next one still runs. A step's ``ok`` is its own checks (True when it has none).

GPU_CHECK_SMOKE=1: the same steps on CPU at toy sizes (float32 where the GPU uses bf16, no FSDP1), to prove the
script and its packaging without a GPU. The figures of a smoke run mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
DEVICE, DTYPE = ("cpu", "float32") if SMOKE else ("cuda", "bfloat16")
N = 8 if SMOKE else 1  # size divisor of the small workloads in smoke mode

STEPS: dict[str, list[tuple[str, Callable]]] = {"device": [], "vllm": []}


@dataclass
class Context:
    """What the steps of one run share: the work directory, the random model ``build`` made, earlier results."""

    work: Path
    results: dict[str, dict] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.work / "model"


def step(part: str, name: str):
    """Register ``fn(ctx) -> dict`` as the next step of ``part``."""
    def register(fn: Callable) -> Callable:
        STEPS[part].append((name, fn))
        return fn
    return register


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def free_memory() -> None:
    import gc

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------- the shared model
def build(ctx: Context) -> dict:
    """A random Qwen3 (~110M parameters; toy in smoke mode) and the char tokenizer from config: no download."""
    from sdzero_pl.core.tiny import save_tiny_model

    sizes = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  intermediate_size=128) if SMOKE else
             dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                  intermediate_size=3072))
    path = save_tiny_model(ctx.model_dir, seed=0, max_position_embeddings=4096, **sizes)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = DTYPE  # vLLM's dtype "auto" -> bf16, as for a real checkpoint
    config_path.write_text(json.dumps(config, indent=2))
    from safetensors.torch import load_file

    return {"path": str(path), "params": sum(t.numel() for t in load_file(str(path / "model.safetensors")).values())}


for _part in STEPS:
    step(_part, "build")(build)


# ------------------------------------------------------------------------------------------------- the driver
def environment() -> dict:
    import lightning
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "lightning": lightning.__version__, "transformers": transformers.__version__, "smoke": SMOKE,
            "imported_from": {}}
    for name in ("torch", "lightning", "transformers", "jsonargparse", "math_verify", "sdzero_pl"):
        try:  # where each came from: the image, the carried wheels' target folder or the repository
            info["imported_from"][name] = os.path.dirname(importlib.import_module(name).__file__)
        except ImportError as err:
            info["imported_from"][name] = f"not importable: {err}"
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible (GPU_CHECK_SMOKE=1 runs the CPU smoke mode)")
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    return info


def run(part: str, names: list[str] | None, out: Path, work: Path) -> bool:
    importlib.import_module("gpu_check_device")  # registers part 1's steps

    if part == "vllm":
        importlib.import_module("gpu_check_vllm")  # part 2's steps (they import vllm themselves)
    known = [name for name, _ in STEPS[part]]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise SystemExit(f"--steps: unknown step(s) {unknown} of part {part!r}; known: {known}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{part}.json"
    summary = {"part": part, "work": str(work), "environment": environment(), "steps": []}
    if path.exists():  # a part run one step per process (vllm) adds to the same file
        previous = json.loads(path.read_text())
        if previous.get("work") == str(work):
            summary["steps"] = previous["steps"]
    print("ENV " + json.dumps(summary["environment"]), flush=True)
    ctx, all_ok, start_all = Context(work), True, time.perf_counter()
    for name, fn in STEPS[part]:
        if names is not None and name not in names and name != "build":
            continue
        if name == "build" and (ctx.model_dir / "config.json").exists():
            continue
        free_memory()
        start = time.perf_counter()
        try:
            figures = fn(ctx)
            row = {"step": name, "ok": bool(figures.pop("ok", True)), **figures}
        except Exception as err:  # noqa: BLE001  (recorded; the next step still runs)
            row = {"step": name, "ok": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-3000:]}
        row.update(seconds=round(time.perf_counter() - start, 1), step_peak_gpu_gib=peak_gib())
        ctx.results[name] = row
        all_ok &= row["ok"]
        summary["steps"].append(row)
        summary["total_s"] = round(time.perf_counter() - start_all, 1)
        path.write_text(json.dumps(summary, indent=2, default=str))
        print("RESULT " + json.dumps({k: v for k, v in row.items() if k != "traceback"}, default=str), flush=True)
        if not row["ok"] and "traceback" in row:
            print(row["traceback"], file=sys.stderr, flush=True)
    print(f"== {part}: {'all checks passed' if all_ok else 'SOME CHECKS FAILED'} in {summary['total_s']} s; "
          f"figures in {path}", flush=True)
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(STEPS))
    parser.add_argument("--steps", default=None, help="comma-separated subset of the part's steps (build always runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="where the JSON goes")
    parser.add_argument("--work", default=None, help="scratch directory (model, runs); default a fresh temp dir")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="sdzero-gpu-check-"))
    names = args.steps.split(",") if args.steps else None
    try:
        return 0 if run(args.part, names, Path(args.out), work) else 1
    finally:
        if args.work is None:  # our own scratch directory (models, runs): the figures are in the JSON
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # run as the module `gpu_check`, the one the step files register with
    sys.exit(importlib.import_module("gpu_check").main())
