"""Part 2 of the GPU check: the vLLM backend, for users' own GPU machines with ``pip install -e .[vllm]`` (the GPU
machine this project is sometimes lent has no vLLM and cannot install it). vLLM's parallel state is per process,
so ``gpu_check.sh vllm`` runs each step below in its own process, sharing one work directory.

* ``engine``: rollout tokens/s vs HF generate, greedy parity with HF, weight-refresh parity (engine vs trainer
  log-probs before / after a weight change and a push), refresh time;
* ``fit_sleep`` / ``fit``: a Phase-2 fit with FSDP1 on 1 GPU, bf16-mixed, gradient checkpointing, vLLM rollouts
  with weight refresh, with and without sleep mode (CPU smoke: ``fit`` only; vLLM has no sleep mode on CPU).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from gpu_check import DEVICE, DTYPE, SMOKE, Context, N, peak_gib, step, sync

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

QUESTIONS = [f"What is {a}+{b}? Answer in \\boxed{{}}." for a in range(16) for b in range(16)]  # 256 prompts
GAP_REFRESHED_MAX = 0.05  # bf16 engine vs bf16 trainer: kernel rounding only


def _gap(rollouts, model, tokenizer, prompts) -> float:
    from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps

    trainer_logps = sampled_token_logps(model, prompts, [r.completion_ids for r in rollouts], tokenizer.pad_token_id,
                                        batch_size=32)
    return logprob_gap([r.logps for r in rollouts], trainer_logps)


def _agreement(a, b) -> float:
    """Fraction of prompts whose greedy completions are token-identical."""
    return sum(x.completion_ids == y.completion_ids for x, y in zip(a, b)) / len(a)


@step("vllm", "engine")
def engine(ctx: Context) -> dict:
    from sdzero_pl.core.models import load_model, load_tokenizer
    from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
    from sdzero_pl.core.sharding import full_named_tensors
    from sdzero_pl.rollout import HFRollout, VLLMRollout

    model = load_model(str(ctx.model_dir), DTYPE).to(DEVICE).eval()
    tokenizer = load_tokenizer(str(ctx.model_dir))
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    prompts = encode_prompts(tokenizer, QUESTIONS[: len(QUESTIONS) // N])

    start = time.perf_counter()
    fast = VLLMRollout(temperature=1.0, max_new_tokens=256 // N, dtype=DTYPE, gpu_memory_utilization=0.4,
                       max_model_len=1024, enforce_eager=SMOKE, show_progress=False)
    fast.setup(model, tokenizer, stops)
    engine_init_s = time.perf_counter() - start
    fast.generate(prompts[:8], seed=0)  # warm-up
    sync()
    start = time.perf_counter()
    sampled = fast.generate(prompts, seed=1)
    vllm_s = time.perf_counter() - start
    vllm_tokens = sum(len(r.completion_ids) for r in sampled)

    slow = HFRollout(temperature=1.0, max_new_tokens=256 // N, batch_size=64 // N, show_progress=False)
    slow.setup(model, tokenizer, stops)
    slow.generate(prompts[:4], seed=0)  # warm-up
    sync()
    start = time.perf_counter()
    hf_sampled = slow.generate(prompts[: 64 // N], seed=1)
    sync()
    hf_s = time.perf_counter() - start
    hf_tokens = sum(len(r.completion_ids) for r in hf_sampled)

    # parity: greedy tokens vs HF, and the engine's vs the trainer's log-probs, before and after a weight change
    fast.temperature, slow.temperature = 0.0, 0.0
    probe = prompts[: 32 // N]
    greedy = fast.generate(probe, seed=0)
    agreement_start = _agreement(greedy, slow.generate(probe, seed=0))
    gap_start = _gap(greedy, model, tokenizer, probe)
    with torch.no_grad():  # a "training step": every weight moves by 5% of its scale
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * p.float().std() * 0.05)
    gap_stale = _gap(fast.generate(probe, seed=0), model, tokenizer, probe)
    sync()
    refresh_s = fast.update_weights(full_named_tensors(model))
    greedy = fast.generate(probe, seed=0)
    agreement_refreshed = _agreement(greedy, slow.generate(probe, seed=0))
    gap_refreshed = _gap(greedy, model, tokenizer, probe)
    fast.close()
    ok = gap_refreshed < GAP_REFRESHED_MAX and gap_stale > 5 * gap_refreshed and agreement_refreshed >= 0.5
    return {"ok": ok, "engine_init_s": round(engine_init_s, 1), "vllm_tokens_per_s": round(vllm_tokens / vllm_s),
            "vllm_prompts": len(prompts), "vllm_tokens": vllm_tokens, "hf_tokens_per_s": round(hf_tokens / hf_s),
            "hf_prompts": 64 // N, "hf_tokens": hf_tokens, "refresh_s": round(refresh_s, 3),
            "greedy_agreement_start": agreement_start, "greedy_agreement_refreshed": agreement_refreshed,
            "gap_start": gap_start, "gap_stale": gap_stale, "gap_refreshed": gap_refreshed}


def _fit(ctx: Context, sleep: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from sdzero_pl.cli import main

    run = ctx.work / ("fit-sleep" if sleep else "fit")
    args = [
        "fit", "--config", "configs/tiny/sdzero_vllm.yaml",
        *(["--trainer.accelerator=cpu"] if SMOKE else ["--trainer.accelerator=gpu", "--trainer.strategy=fsdp",
                                                        "--trainer.precision=bf16-mixed"]),
        "--trainer.devices=1", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        f"--model.init_args.model_name_or_path={ctx.model_dir}", "--model.init_args.gradient_checkpointing=true",
        f"--model.init_args.export_dir={run}/hf_model", "--data.init_args.prompts_per_epoch=64",
        "--data.init_args.batch_size=8", "--data.init_args.max_teacher_len=512",
        f"--data.init_args.rollout.init_args.dtype={DTYPE}",
        "--data.init_args.rollout.init_args.max_model_len=512",
        "--data.init_args.rollout.init_args.max_new_tokens=128",
        "--data.init_args.rollout.init_args.gpu_memory_utilization=0.3",
        f"--data.init_args.rollout.init_args.enable_sleep_mode={str(sleep).lower()}",
        "--data.init_args.rollout.init_args.show_progress=false",
    ]
    sys.argv[1:] = []  # LightningCLI reads `args`, not the driver's own arguments
    start = time.perf_counter()
    cli = main(args)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    exported = AutoModelForCausalLM.from_pretrained(f"{run}/hf_model")
    ok = (cli.trainer.global_step > 0 and cli.model.sharding == (None if SMOKE else "fsdp1")
          and metrics.get("rollout/logprob_gap", 1.0) < GAP_REFRESHED_MAX
          and metrics.get("rollout/weight_pushes", 0.0) >= 2 and exported is not None)
    return {"ok": ok, "sleep_mode": sleep, "fit_s": round(seconds, 1), "global_step": cli.trainer.global_step,
            "wrapped": type(cli.model.policy).__name__, "logprob_gap": metrics.get("rollout/logprob_gap"),
            "weight_pushes": metrics.get("rollout/weight_pushes"), "refresh_s": metrics.get("time/refresh_s"),
            "generate_s": metrics.get("time/generate_s"), "loss": metrics.get("train/loss_epoch"),
            "peak_gpu_gib": peak_gib()}


@step("vllm", "fit_sleep")
def fit_sleep(ctx: Context) -> dict:
    if SMOKE:
        return {"ok": True, "skipped": "vLLM has no sleep mode on CPU"}
    return _fit(ctx, sleep=True)


@step("vllm", "fit")
def fit(ctx: Context) -> dict:
    return _fit(ctx, sleep=False)
