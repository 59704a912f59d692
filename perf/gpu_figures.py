"""Issue 16's figures on a GPU, as self-contained functions the GPU check's device part runs as its steps
``batching`` and ``distill_loss_bf16`` (scripts/gpu_check_device.py); none needs vLLM. Each returns its figures
(``ok`` among them); run alone, this script prints one ``RESULT {json}`` line per function (the GPU check's format).

* ``batching``: one Phase-2 optimizer step at Qwen3-4B shapes (random weights from its config: vocab 151,936,
  hidden 2560, 36 layers; bf16 weights and AdamW state, gradient checkpointing, top-k 64), fixed-count vs
  length-aware micro-batching of 16 long-tailed rollouts (lognormal, 50-2,000 tokens): step time, peak
  ``torch.cuda.max_memory_allocated``, padded-token share, gradient agreement (perf/bench_batching.py);
* ``distill_loss``: the distillation loss alone at Qwen3-4B's LM head (4,096 completion tokens, k = 64) in bf16,
  chunked vs naive full logits: time, peak memory and the working memory above the LM-head gradient
  (perf/bench_distill_loss.py).

    python perf/gpu_figures.py WORK_DIR [batching|distill_loss ...]     # on a GPU: both, about 4-6 minutes
    GPU_CHECK_SMOKE=1 python perf/gpu_figures.py WORK_DIR                 # the same steps on CPU at toy sizes

Not yet run on a GPU (no GPU was lent to the issue that wrote it): the CPU smoke mode is tested.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"


def batching(work: str, smoke: bool = SMOKE) -> dict:
    from perf import bench_batching

    argv = (["--sizes", "smoke", "--samples", "8", "--high", "200", "--rounds", "1"] if smoke else
            ["--sizes", "qwen3-4b", "--device", "cuda", "--dtype", "bfloat16", "--gradient-checkpointing",
             "--rounds", "1", "--steps", "2"])
    args = bench_batching.parse_args([*argv, "--keep", os.path.join(work, "batching")])
    summary = bench_batching.run(args)
    bench_batching.report(summary)
    summary.pop("rows")
    targets = summary.pop("ok")  # smoke sizes say nothing about the speed targets; gradients must agree anyway
    ok = all(targets.values()) if not smoke else targets["equal_gradients"]
    return {"ok": ok, "targets": targets, **summary}


def distill_loss(work: str, smoke: bool = SMOKE) -> dict:
    from perf import bench_distill_loss

    argv = (["--vocab", "997", "--hidden", "32", "--tokens", "100", "--k", "8", "--chunk-size", "16", "--threads", "1"]
            if smoke else
            ["--device", "cuda", "--repeats", "3"])
    figures = bench_distill_loss.run([*argv, "--dtype", "bfloat16"])
    figures["targets_pass"] = figures.pop("pass")  # the 0.25x memory target is out of reach (the head gradient)
    chunked = next(v for k, v in figures.items() if k.startswith("chunked@"))
    return {"ok": chunked["equal"], **figures}


STEPS = {"batching": batching, "distill_loss": distill_loss}


def main(argv: list[str]) -> int:
    work, names = argv[0], argv[1:] or list(STEPS)
    os.makedirs(work, exist_ok=True)
    ok = True
    for name in names:
        figures = STEPS[name](work)
        print("RESULT " + json.dumps({"step": name, **figures}, default=str), flush=True)
        ok &= bool(figures["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
