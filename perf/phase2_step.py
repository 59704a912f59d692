"""One Phase-2 optimizer step on given completions, measured: the pieces shared by perf/bench_batching.py,
perf/bench_vs_trl.py and the GPU check (scripts/gpu_check.py ``phase2`` step).

A step is what ``SelfDistillModule`` does in training (docs/method.md, "Phase 2", steps 3-5), through its own
``distill_loss``: for every micro-batch the frozen teacher's chunked top-k pass over ``chat(x) + y + P_r + y``, the
student's forward at those k ids and its backward (the loss divided by the accumulation, as Lightning does), then
one AdamW step. Micro-batches come from ``OnPolicyDataModule._batches``, the planner training uses, on synthetic
rollouts: random token ids, prompt ``prompt_len`` tokens, completion lengths drawn from a long-tailed (lognormal)
distribution clipped to [low, high], the teacher's delimiter ``control_len`` tokens. The model is a random Qwen3
built from a config (no download): ``SIZES`` holds the CPU benchmark's shape (Qwen3-4B's body : LM-head
parameter ratio, 7 : 1 here vs 8.6 : 1, at a CPU-sized width) and Qwen3-4B's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

SIZES = {
    # hidden 256, 4 layers: body ~3.8M parameters, LM head 1.0M (Qwen3-4B: 3.35B / 0.39B)
    "cpu": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, intermediate_size=1024),
    "qwen3-4b": dict(vocab_size=151_936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728),
    "smoke": dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, intermediate_size=64),
}


def build_model(directory: str, sizes: dict, max_position_embeddings: int = 8192, seed: int = 0,
                dtype: str = "float32", device: str = "cpu") -> str:
    """A random Qwen3 with these sizes and the project's char tokenizer, saved as an HF directory (the model's
    vocabulary may be larger than the tokenizer's: the benchmark's token ids are random)."""
    from transformers import Qwen3ForCausalLM

    from sdzero_pl.core.tiny import build_char_tokenizer, tiny_qwen3_config

    tokenizer = build_char_tokenizer()
    config = tiny_qwen3_config(**sizes, max_position_embeddings=max_position_embeddings,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def lognormal_lengths(n: int, low: int = 50, high: int = 2000, median: float = 300.0, sigma: float = 1.0,
                      seed: int = 0) -> list[int]:
    """Completion lengths of real RL rollouts: long-tailed, most short, a few near ``high``."""
    rng = random.Random(seed)
    return [int(min(high, max(low, rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def synthetic_examples(lengths: list[int], vocab: int, prompt_len: int = 64, control_len: int = 16, seed: int = 0):
    """DistillExamples (student ``x + y``, teacher ``x + y + P_r + y``) of random ids, one per completion length."""
    from sdzero_pl.core.sequences import build_distill_example

    gen = torch.Generator().manual_seed(seed)
    control = torch.randint(3, vocab, (control_len,), generator=gen).tolist()
    examples = []
    for n in lengths:
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        completion = torch.randint(3, vocab, (n,), generator=gen).tolist()
        examples.append(build_distill_example(prompt, completion, control, [], prompt_len + 2 * n + control_len))
    return examples


def stub_trainer(accumulate: int, device: str = "cpu", global_step: int = 1) -> SimpleNamespace:
    """What the planner and ``distill_loss`` read from a trainer, for one process."""
    strategy = SimpleNamespace(root_device=torch.device(device), reduce=lambda tensor, reduce_op="sum": tensor)
    return SimpleNamespace(accumulate_grad_batches=accumulate, world_size=1, global_rank=0, global_step=global_step,
                           strategy=strategy)


def plan_batches(examples, batch_size: int, accumulate: int, batching, pad_id: int = 0):
    """The micro-batches training would build for one optimizer step of these examples (``OnPolicyDataModule``'s
    own planner), and the trainer whose accumulation it set."""
    from sdzero_pl.data.questions import QuestionSource
    from sdzero_pl.phase2.onpolicy import OnPolicyDataModule

    data = OnPolicyDataModule(QuestionSource("unused.jsonl"), prompts_per_epoch=len(examples), batch_size=batch_size,
                              batching=batching)
    data.trainer = stub_trainer(accumulate)
    batches, stats = data._batches(examples, pad_id)
    return batches, stats, data.trainer


def load_module(model_dir: str, dtype: str, device: str, trainer, chunk_size: int = 512,
                gradient_checkpointing: bool = False, drift_every_n_steps: int = 0, tail: bool = False,
                top_k: int = 64, lora=None):
    """The project's SelfDistillModule (student + frozen teacher copy; with ``lora`` (LoraArgs) the student's
    adapters and no copy) on ``device``, bound to a stub trainer."""
    from sdzero_pl.phase2.distill import SelfDistillModule

    module = SelfDistillModule(model_dir, dtype=dtype, top_k=top_k, chunk_size=chunk_size,
                               gradient_checkpointing=gradient_checkpointing, drift_every_n_steps=drift_every_n_steps,
                               tail=tail, lora=lora)
    module.configure_model()
    module.to(device)
    module.trainer = trainer
    module.policy.train()
    return module


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def optimizer_step(module, batches: list[dict], optimizer, device: str, probe: bool = False) -> dict:
    """One optimizer step over the micro-batches: wall-clock seconds of it and of its teacher passes, the process's
    CPU seconds (on a shared machine the fairer clock: other jobs' load inflates wall time, not CPU time, of a
    one-thread run), and (``probe``) a sample of the gradients taken before the update (outside the timed region)."""
    accumulate = module.trainer.accumulate_grad_batches
    synchronize(device)
    start, cpu_start, teacher_s = time.perf_counter(), time.process_time(), 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _, timings = module.distill_loss(batch)
        (loss / accumulate).backward()  # Lightning divides each micro-batch loss by the accumulation
        teacher_s += timings["time/teacher_s"]
    synchronize(device)
    backward_done, cpu_backward_done = time.perf_counter(), time.process_time()
    out = {"grad_probe": gradient_probe(module)} if probe else {}
    resumed, cpu_resumed = time.perf_counter(), time.process_time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    out.update(step_s=(backward_done - start) + (time.perf_counter() - resumed), teacher_s=teacher_s,
               cpu_s=(cpu_backward_done - cpu_start) + (time.process_time() - cpu_resumed))
    return out


def gradient_probe(module, samples: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random sample of every gradient (and its norm): enough to compare two runs' gradients without
    saving a model-sized tensor."""
    gen = torch.Generator().manual_seed(seed)
    probe = {}
    for name, param in module.policy.named_parameters():
        grad = param.grad.detach().flatten()  # sampled where it lives: no model-sized copy to the host
        index = torch.randint(0, grad.numel(), (min(samples, grad.numel()),), generator=gen).to(grad.device)
        norm = torch.linalg.vector_norm(grad, dtype=torch.float64 if grad.device.type == "cpu" else torch.float32)
        probe[name] = torch.cat([grad[index].double(), norm.double().view(1)]).cpu()
    return probe


def probe_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b| (b the reference)."""
    worst = 0.0
    for name, ref in b.items():
        scale = float(ref.abs().max())
        worst = max(worst, float((a[name] - ref).abs().max()) / scale if scale > 0 else float((a[name]).abs().max()))
    return worst


def env_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------ benchmark workers (one process each)
def worker_flags(args, skip: tuple[str, ...]) -> list[str]:
    """``args`` back as command-line flags for a worker subprocess: every non-None value except ``skip`` (booleans
    are the caller's: argparse spells them differently)."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in skip and v is not None and not isinstance(v, bool)]


def add_timing_arguments(parser, modes: tuple[str, ...], rounds: int) -> None:
    """The flags every interleaved-subprocess benchmark shares: timed steps, rounds, threads, seed, where to keep the
    model, the JSON summary, and the hidden worker-mode flags (``--mode``, ``--out``)."""
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess (after a warm-up step)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="directory for the model and the workers' results")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--mode", choices=modes, default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)


def run_worker(name: str, cmd: list[str], out: str, env: dict | None = None) -> dict:
    """Run a worker to completion and read the result it wrote to ``out`` (JSON, or torch.save for ``.pt``)."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    if out.endswith(".pt"):
        return torch.load(out, weights_only=False)
    with open(out) as handle:
        return json.load(handle)


def write_worker_result(out: str, result: dict) -> int:
    """A worker's last act: its result where the parent reads it (``.pt``: torch.save, else JSON)."""
    if out.endswith(".pt"):
        torch.save(result, out)
    else:
        with open(out, "w") as handle:
            json.dump(result, handle)
    return 0


def interleaved(modes: tuple[str, ...], rounds: int, spawn) -> dict[str, list[dict]]:
    """``spawn(mode, round)`` for every round, the modes' order alternating so that neither always runs first."""
    results = {mode: [] for mode in modes}
    for r in range(rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            print(f"  round {r + 1}/{rounds}: {mode} ...", flush=True)
            results[mode].append(spawn(mode, r))
    return results


def run_modes(script: str, modes: tuple[str, ...], args, sizes: dict, prefix: str, extra_flags: list[str] = (),
              env: dict | None = None, suffix: str = ".json") -> dict[str, list[dict]]:
    """A benchmark's parent side: build the model once (unless ``args.model`` names one; sized for ``args``'
    prompt, completion and control lengths), then ``args.rounds`` rounds of one fresh ``script --mode M``
    subprocess per mode, alternating the order; each worker's result by mode."""
    out_dir = args.keep or tempfile.mkdtemp(prefix=prefix)
    if args.model is None:
        args.model = build_model(os.path.join(out_dir, "model"), sizes,
                                 max_position_embeddings=args.prompt_len + 2 * args.high + args.control_len + 8,
                                 dtype="float32" if args.device == "cpu" else args.dtype, device=args.device)
    flags = worker_flags(args, ("mode", "out", "rounds", "keep", "json")) + list(extra_flags)

    def spawn(mode: str, round_: int) -> dict:
        out = os.path.join(out_dir, f"{mode}-{round_}{suffix}")
        return run_worker(mode, [sys.executable, os.path.abspath(script), *flags, "--mode", mode, "--out", out], out,
                          env)

    return interleaved(modes, args.rounds, spawn)
