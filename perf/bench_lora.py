"""Benchmark: peak memory and step time of one Phase-2 optimizer step, full fine-tune vs LoRA (issue 17).

The same model, the same rollouts and the same micro-batches in both modes; one optimizer step through
``SelfDistillModule.distill_loss`` (perf/phase2_step.py): the teacher's top-k pass, the student's forward and
backward, one AdamW step. "full": the student plus its frozen teacher copy (two copies of the weights), AdamW over
every weight. "lora": one copy, rank-``--rank`` adapters on every linear layer of the decoder (``all-linear``), the
teacher is the same model with its adapters off, AdamW over the adapters only. Each measurement runs in its own
fresh subprocess (a warm-up step, then the timed steps), modes in alternating order round by round, median over
rounds. Peak memory counts everything the step holds (both models' weights, gradients, AdamW state, activations):
CPU: the worker's peak resident set during the timed steps (VmHWM reset after the warm-up step by
/proc/self/clear_refs) above its resident set just before the model was loaded, with glibc told to map every block
of 64 KiB or more on its own and unmap it when freed (``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``), so
the resident set follows the live tensors instead of the allocator's free lists (without that, memory freed while
loading or in the warm-up step sits in the heap and hides later allocations: a 100-200 MB error at these sizes);
GPU: ``torch.cuda.max_memory_allocated`` during the timed steps. Also printed: trainable parameters, weight / gradient / AdamW-state bytes, and the first
micro-batch's loss before any update (a zero adapter: both modes must agree). Target (issue 17): LoRA peak <= 0.4x
the full fine-tune's. Step time is judged on the workers' CPU time on CPU (one thread each; other jobs on a shared
machine inflate wall time, not CPU time), on wall time on a GPU; both are printed.

The target holds where weights and optimizer state dominate the step's memory (a model of billions of parameters
with gradient checkpointing, the one-GPU setting this mode is for); activations are the same in both modes, so a
tiny model on long sequences shows a smaller saving. The default "cpu" shape is weight-dominated: 35.7M parameters,
8 rollouts of 32-200 tokens as 8 micro-batches of one (``--batch-size 1 --accumulate 8``: the one-GPU setting trades
micro-batch size for memory), gradient checkpointing; ``--batch-size 4 --accumulate 2`` shows the smaller saving
where activations weigh more.

    python perf/bench_lora.py                                      # CPU, ~2 minutes on one thread per worker
    python perf/bench_lora.py --sizes smoke --samples 4 --high 32 --rounds 1                           # smoke
    python perf/bench_lora.py --device cuda --dtype bfloat16 --sizes qwen3-1.7b --high 1024 --median 300   # GPU
    GPU_CHECK_SMOKE=1 python perf/gpu_figures.py WORK_DIR lora_memory      # the GPU check's step, smoke mode
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from perf.phase2_step import (  # noqa: E402
    SIZES, add_timing_arguments, env_threads, load_module, lognormal_lengths, optimizer_step, plan_batches, run_modes,
    synchronize, synthetic_examples, write_worker_result
)
from sdzero_pl.core.artifacts import atomic_write_json  # noqa: E402

MODES = ("full", "lora")
TARGET_PEAK_RATIO = 0.4
LOSS_RTOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}  # zero adapters: the same loss
BENCH_SIZES = {
    **SIZES,
    # weight-dominated at a CPU-sized width: body 31.5M parameters (8 layers, hidden 512), LM head 4.2M (tied)
    "cpu": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                head_dim=64, intermediate_size=2048),
    # Qwen3-1.7B's config (the GPU check's size: its 3.4 GB bf16 checkpoint is written and loaded twice quickly)
    "qwen3-1.7b": dict(vocab_size=151_936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: plan, loss before any update, warm-up step, timed steps, peak memory."""
    import importlib

    from sdzero_pl.core.lora import LoraArgs, parameter_counts, trainable
    from sdzero_pl.data.batching import Batching

    for name in ("peft", "transformers.models.qwen3.modeling_qwen3", "sdzero_pl.phase2.distill"):
        importlib.import_module(name)  # before the baseline: imports are no part of either mode's memory

    env_threads(args.threads)
    cuda = args.device.startswith("cuda")
    lengths = lognormal_lengths(args.samples, args.low, args.high, args.median, args.sigma, args.seed)
    examples = synthetic_examples(lengths, BENCH_SIZES[args.sizes]["vocab_size"], args.prompt_len, args.control_len,
                                  args.seed)
    batches, _, trainer = plan_batches(examples, args.batch_size, args.accumulate, Batching("count"))
    trainer.strategy.root_device = torch.device(args.device)
    rss_before_model = _status_kib("VmRSS") * 1024
    lora = LoraArgs(rank=args.rank, alpha=2.0 * args.rank) if args.mode == "lora" else None
    module = load_module(args.model, args.dtype, args.device, trainer, args.chunk_size, args.gradient_checkpointing,
                         top_k=args.top_k, lora=lora)
    params = trainable(module.policy)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with torch.no_grad():
        first = {k: v.to(args.device) for k, v in batches[0].items()}
        loss0 = float(module.distill_loss(first)[0])
    warm = optimizer_step(module, batches, optimizer, args.device)
    if cuda:
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    steps = [optimizer_step(module, batches, optimizer, args.device) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024 - rss_before_model
    weights = {id(p): p for role in (module.policy, module.teacher) if role is not None for p in role.parameters()}
    train, total = parameter_counts(module.policy)
    return {"mode": args.mode, "times": [s["step_s"] for s in steps], "cpu_times": [s["cpu_s"] for s in steps],
            "warmup_s": warm["step_s"], "loss0": loss0, "peak_bytes": peak, "trainable": train, "policy_params": total,
            "weight_bytes": _bytes(weights.values()), "grad_bytes": _bytes(params),
            "optimizer_bytes": _bytes(v for state in optimizer.state.values() for v in state.values()
                                      if isinstance(v, torch.Tensor)),
            "micro_batches": len(batches),
            "real_tokens": sum(int(b[k].sum()) for b in batches
                               for k in ("student_attention_mask", "teacher_attention_mask"))}


def run(args: argparse.Namespace) -> dict:
    """Build the model once, then every round one fresh subprocess per mode (alternating order)."""
    checkpointing = ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    env = dict(os.environ)
    if args.device == "cpu":  # glibc: every block >= 64 KiB its own mapping, returned when freed (see the docstring)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    return summarize(run_modes(__file__, MODES, args, BENCH_SIZES[args.sizes], "bench_lora-", checkpointing, env), args)


def summarize(results: dict, args: argparse.Namespace) -> dict:
    first = {m: results[m][0] for m in MODES}
    step = {m: statistics.median(t for res in results[m] for t in res["times"]) for m in MODES}
    cpu = {m: statistics.median(t for res in results[m] for t in res["cpu_times"]) for m in MODES}
    peak = {m: max(res["peak_bytes"] for res in results[m]) for m in MODES}
    loss = {m: first[m]["loss0"] for m in MODES}
    summary = {
        "sizes": args.sizes, "device": args.device, "dtype": args.dtype, "rank": args.rank,
        "samples": args.samples, "batch_size": args.batch_size, "accumulate": args.accumulate,
        "gradient_checkpointing": args.gradient_checkpointing, "rounds": args.rounds,
        "real_tokens": first["full"]["real_tokens"], "micro_batches": first["full"]["micro_batches"],
        "peak_gib": {m: peak[m] / 2**30 for m in MODES}, "peak_ratio": peak["lora"] / peak["full"],
        "step_s": step, "cpu_s": cpu, "step_ratio": step["lora"] / step["full"], "cpu_ratio": cpu["lora"] / cpu["full"],
        **{key: {m: first[m][key] for m in MODES}
           for key in ("trainable", "policy_params", "weight_bytes", "grad_bytes", "optimizer_bytes")},
        "loss0": loss, "load_average": os.getloadavg()[0],
    }
    same_loss = abs(loss["lora"] - loss["full"]) <= LOSS_RTOL[args.dtype] * max(abs(loss["full"]), 1e-30)
    summary["ok"] = {"peak_ratio": summary["peak_ratio"] <= TARGET_PEAK_RATIO, "equal_loss": same_loss}
    return summary


def report(summary: dict) -> None:
    mib = 2**20
    print(f"\none Phase-2 optimizer step, {summary['samples']} rollouts ({summary['real_tokens']} real student + "
          f"teacher tokens, {summary['micro_batches']} micro-batches), {summary['sizes']} sizes, {summary['device']} "
          f"{summary['dtype']}, gradient checkpointing {summary['gradient_checkpointing']}, LoRA rank "
          f"{summary['rank']} all-linear; median of {summary['rounds']} round(s)")
    print(f"{'mode':<6}{'trainable':>13}{'of':>13}{'weights MiB':>13}{'grads MiB':>11}{'AdamW MiB':>11}"
          f"{'peak MiB':>10}{'step s':>9}{'CPU s':>8}{'loss0':>12}")
    for m in MODES:
        print(f"{m:<6}{summary['trainable'][m]:>13,}{summary['policy_params'][m]:>13,}"
              f"{summary['weight_bytes'][m] / mib:>13.1f}{summary['grad_bytes'][m] / mib:>11.1f}"
              f"{summary['optimizer_bytes'][m] / mib:>11.1f}{summary['peak_gib'][m] * 1024:>10.1f}"
              f"{summary['step_s'][m]:>9.2f}{summary['cpu_s'][m]:>8.2f}{summary['loss0'][m]:>12.6f}")
    ok = summary["ok"]
    print(f"LoRA / full: peak {summary['peak_ratio']:.3f}x (target <= {TARGET_PEAK_RATIO}: "
          f"{'PASS' if ok['peak_ratio'] else 'FAIL'}), step {summary['step_ratio']:.2f}x wall, "
          f"{summary['cpu_ratio']:.2f}x CPU time; loss before any update equal: {'PASS' if ok['equal_loss'] else 'FAIL'}"
          f"; load average at the end {summary['load_average']:.1f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", choices=sorted(BENCH_SIZES), default="cpu")
    parser.add_argument("--model", default=None, help="an existing HF model directory (default: build one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOSS_RTOL))
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--samples", type=int, default=8, help="rollouts in the optimizer step")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=8)
    parser.add_argument("--low", type=int, default=32)
    parser.add_argument("--high", type=int, default=200)
    parser.add_argument("--median", type=float, default=80.0)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--control-len", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    add_timing_arguments(parser, MODES, rounds=2)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode is not None:
        return write_worker_result(args.out, worker(args))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}",
          flush=True)
    summary = run(args)
    report(summary)
    if args.json:
        atomic_write_json(args.json, summary)
    return 0 if all(summary["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
