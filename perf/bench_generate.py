"""Rollout speed: HF ``generate`` vs the vLLM engine on the same model and prompts, measured in one run.

Default model: SmolLM2-135M-Instruct, the pretrained stand-in (``sdzero_pl/core/pretrained.py``, converted on first
use); prompts: the demo's arithmetic questions in the ``configs/smollm2`` format. Both backends sample at
temperature 1.0 with the same number of new tokens; every figure is generated tokens per second of wall-clock
time after one warm-up call. HF runs first: the in-process vLLM engine pins the process to one torch thread.

    python perf/bench_generate.py                                   # SmolLM2, HF then vLLM (CPU build on CPU)
    python perf/bench_generate.py --backends hf --prompts 16        # HF only
    python perf/bench_generate.py --model DIR --device cuda --dtype bfloat16   # any HF directory, on a GPU

Prints one line per backend and a JSON summary (``--json PATH`` writes it too). The GPU check's HF step uses
:func:`hf_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

from sdzero_pl.core.models import load_model, load_tokenizer  # noqa: E402
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids  # noqa: E402

INSTRUCTION = " Answer with the number only."


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(rollout, prompts, device: str) -> tuple[float, int]:
    """(seconds, generated tokens) of one seeded ``generate`` call, after a warm-up on a few prompts."""
    rollout.generate(prompts[:4], seed=0)
    _sync(device)
    start = time.perf_counter()
    rollouts = rollout.generate(prompts, seed=1)
    _sync(device)
    return time.perf_counter() - start, sum(len(r.completion_ids) for r in rollouts)


def hf_tokens_per_s(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, device: str) -> dict:
    """HF ``generate`` throughput on ``model`` (already on ``device``): tokens/s and what was measured."""
    from sdzero_pl.rollout import HFRollout

    rollout = HFRollout(temperature=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
    rollout.setup(model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    seconds, tokens = timed_generate(rollout, prompts, device)
    return {"backend": "hf", "tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2),
            "prompts": len(prompts), "batch_size": batch_size, "torch_threads": torch.get_num_threads()}


def vllm_tokens_per_s(model, tokenizer, prompts, max_new_tokens: int, dtype: str, device: str) -> dict:
    from sdzero_pl.rollout import VLLMRollout

    start = time.perf_counter()
    rollout = VLLMRollout(temperature=1.0, max_new_tokens=max_new_tokens, dtype=dtype, max_model_len=1024,
                          enforce_eager=device == "cpu", show_progress=False)
    rollout.setup(model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    init_s = time.perf_counter() - start
    try:
        seconds, tokens = timed_generate(rollout, prompts, device)
    finally:
        rollout.close()
    return {"backend": "vllm", "tokens_per_s": round(tokens / seconds, 1), "tokens": tokens,
            "seconds": round(seconds, 2), "prompts": len(prompts), "engine_init_s": round(init_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the SmolLM2 stand-in)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="HF generate batch size")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    from sdzero_pl.tasks.arithmetic import generate_split

    if args.model is None:
        from sdzero_pl.core.pretrained import smollm2_dir

        args.model = str(smollm2_dir())
    model = load_model(args.model, args.dtype).to(args.device).eval()
    tokenizer = load_tokenizer(args.model)
    questions = [p.problem + INSTRUCTION for p in generate_split("heldout", args.prompts)]
    prompts = encode_prompts(tokenizer, questions)
    rows = []
    for backend in args.backends.split(","):
        if backend == "hf":
            rows.append(hf_tokens_per_s(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.device))
        elif backend == "vllm":
            rows.append(vllm_tokens_per_s(model, tokenizer, prompts, args.max_new_tokens, args.dtype, args.device))
        else:
            raise SystemExit(f"--backends: unknown backend {backend!r} (hf, vllm)")
        print(f"{backend}: {rows[-1]['tokens_per_s']} tokens/s ({rows[-1]['tokens']} tokens in "
              f"{rows[-1]['seconds']} s, {len(prompts)} prompts)", flush=True)
    summary = {"model": args.model, "device": args.device, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
               "rows": rows}
    if len(rows) == 2:
        summary["vllm_over_hf"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
