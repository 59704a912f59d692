"""GPU check of the scaling path, one step per process (vLLM's parallel state is per process): see gpu_check.sh.

    python scripts/gpu_check.py build DIR        # a random Qwen3 (~110M parameters) + char tokenizer, no download
    python scripts/gpu_check.py engine DIR       # vLLM CUDA backend: HF parity, weight-refresh parity, tokens/s
    python scripts/gpu_check.py fit DIR WORK [--sleep]   # Phase-2 fit, FSDP on 1 GPU, vLLM rollouts + refresh
    python scripts/gpu_check.py perf WORK        # no vLLM: Phase-2 step at Qwen3-4B shapes, count vs length-aware
                                                 # micro-batching, bf16 distillation loss (perf/gpu_figures.py)

Every step prints one line ``RESULT {json}`` with its figures and checks; gpu_check.sh collects them.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

QUESTIONS = [f"What is {a}+{b}? Answer in \\boxed{{}}." for a in range(16) for b in range(16)]  # 256 prompts
GAP_REFRESHED_MAX = 0.05  # bf16 engine vs bf16 trainer: kernel rounding only
# GPU_CHECK_SMOKE=1: the same steps on CPU at toy sizes (float32, no FSDP), to test this script without a GPU
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
DEVICE, DTYPE = ("cpu", "float32") if SMOKE else ("cuda", "bfloat16")
N = 8 if SMOKE else 1  # size divisor


def result(step: str, **figures) -> None:
    print("RESULT " + json.dumps({"step": step, **figures}), flush=True)


def build(directory: str) -> None:
    from sdzero_pl.core.tiny import save_tiny_model

    sizes = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  intermediate_size=128) if SMOKE else
             dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                  intermediate_size=3072))
    path = save_tiny_model(directory, seed=0, max_position_embeddings=4096, **sizes)
    with open(os.path.join(path, "config.json")) as handle:
        config = json.load(handle)
    config["dtype"] = DTYPE  # vLLM's dtype "auto" -> bf16, as for a real checkpoint
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    result("build", path=str(path))


def _gap(rollouts, model, tokenizer, prompts) -> float:
    from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps

    trainer_logps = sampled_token_logps(model, prompts, [r.completion_ids for r in rollouts], tokenizer.pad_token_id,
                                        batch_size=32)
    return logprob_gap([r.logps for r in rollouts], trainer_logps)


def _agreement(a, b) -> float:
    """Fraction of prompts whose greedy completions are token-identical."""
    return sum(x.completion_ids == y.completion_ids for x, y in zip(a, b)) / len(a)


def engine(directory: str) -> None:
    from sdzero_pl.core.models import load_model, load_tokenizer
    from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
    from sdzero_pl.core.sharding import full_named_tensors
    from sdzero_pl.rollout import HFRollout, VLLMRollout

    model = load_model(directory, DTYPE).to(DEVICE).eval()
    tokenizer = load_tokenizer(directory)
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    prompts = encode_prompts(tokenizer, QUESTIONS[: len(QUESTIONS) // N])
    params = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    fast = VLLMRollout(temperature=1.0, max_new_tokens=256 // N, dtype=DTYPE, gpu_memory_utilization=0.4,
                       max_model_len=1024, enforce_eager=SMOKE, show_progress=False)
    fast.setup(model, tokenizer, stops)
    engine_init_s = time.perf_counter() - start
    fast.generate(prompts[:8], seed=0)  # warm-up
    _sync()
    start = time.perf_counter()
    sampled = fast.generate(prompts, seed=1)
    vllm_s = time.perf_counter() - start
    vllm_tokens = sum(len(r.completion_ids) for r in sampled)

    slow = HFRollout(temperature=1.0, max_new_tokens=256 // N, batch_size=64 // N, show_progress=False)
    slow.setup(model, tokenizer, stops)
    slow.generate(prompts[:4], seed=0)  # warm-up
    _sync()
    start = time.perf_counter()
    hf_sampled = slow.generate(prompts[: 64 // N], seed=1)
    _sync()
    hf_s = time.perf_counter() - start
    hf_tokens = sum(len(r.completion_ids) for r in hf_sampled)

    # parity: greedy tokens vs HF, and the engine's vs the trainer's log-probs, before and after a weight change
    fast.temperature, slow.temperature = 0.0, 0.0
    probe = prompts[: 32 // N]
    greedy = fast.generate(probe, seed=0)
    agreement_start = _agreement(greedy, slow.generate(probe, seed=0))
    gap_start = _gap(greedy, model, tokenizer, probe)
    with torch.no_grad():  # a "training step": every weight moves by ~1% of its scale
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * p.float().std() * 0.05)
    gap_stale = _gap(fast.generate(probe, seed=0), model, tokenizer, probe)
    _sync()
    refresh_s = fast.update_weights(full_named_tensors(model))
    greedy = fast.generate(probe, seed=0)
    agreement_refreshed = _agreement(greedy, slow.generate(probe, seed=0))
    gap_refreshed = _gap(greedy, model, tokenizer, probe)
    ok = gap_refreshed < GAP_REFRESHED_MAX and gap_stale > 5 * gap_refreshed and agreement_refreshed >= 0.5
    result("engine", ok=ok, params=params, engine_init_s=round(engine_init_s, 1),
           vllm_tokens_per_s=round(vllm_tokens / vllm_s), vllm_prompts=len(prompts), vllm_tokens=vllm_tokens,
           hf_tokens_per_s=round(hf_tokens / hf_s), hf_prompts=64 // N, hf_tokens=hf_tokens,
           refresh_s=round(refresh_s, 3), greedy_agreement_start=agreement_start,
           greedy_agreement_refreshed=agreement_refreshed, gap_start=gap_start, gap_stale=gap_stale,
           gap_refreshed=gap_refreshed)
    fast.close()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def fit(directory: str, work: str, sleep: bool) -> None:
    from sdzero_pl.cli import main

    args = [
        "fit", "--config", "configs/tiny/sdzero_vllm.yaml",
        *(["--trainer.accelerator=cpu"] if SMOKE else ["--trainer.accelerator=gpu", "--trainer.strategy=fsdp",
                                                        "--trainer.precision=bf16-mixed"]),
        "--trainer.devices=1", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={work}",
        f"--model.init_args.model_name_or_path={directory}", "--model.init_args.gradient_checkpointing=true",
        f"--model.init_args.export_dir={work}/hf_model", "--data.init_args.prompts_per_epoch=64",
        "--data.init_args.batch_size=8", "--data.init_args.max_teacher_len=512",
        f"--data.init_args.rollout.init_args.dtype={DTYPE}",
        "--data.init_args.rollout.init_args.max_model_len=512",
        "--data.init_args.rollout.init_args.max_new_tokens=128",
        "--data.init_args.rollout.init_args.gpu_memory_utilization=0.3",
        f"--data.init_args.rollout.init_args.enable_sleep_mode={str(sleep).lower()}",
        "--data.init_args.rollout.init_args.show_progress=false",
    ]
    start = time.perf_counter()
    cli = main(args)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(f"{work}/hf_model")
    student = cli.model.policy
    ok = (cli.trainer.global_step > 0 and cli.model.sharding == (None if SMOKE else "fsdp1")
          and metrics.get("rollout/logprob_gap", 1.0) < GAP_REFRESHED_MAX
          and metrics.get("rollout/weight_pushes", 0.0) >= 2 and exported is not None)
    result("fit", ok=ok, sleep_mode=sleep, seconds=round(seconds, 1), global_step=cli.trainer.global_step,
           wrapped=type(student).__name__, logprob_gap=metrics.get("rollout/logprob_gap"),
           weight_pushes=metrics.get("rollout/weight_pushes"), refresh_s=metrics.get("time/refresh_s"),
           generate_s=metrics.get("time/generate_s"), loss=metrics.get("train/loss_epoch"),
           peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None)


if __name__ == "__main__":
    step = sys.argv[1]
    if step == "build":
        build(sys.argv[2])
    elif step == "engine":
        engine(sys.argv[2])
    elif step == "fit":
        fit(sys.argv[2], sys.argv[3], "--sleep" in sys.argv[4:])
    elif step == "perf":  # issue 16's figures (no vLLM): perf/gpu_figures.py prints its own RESULT lines
        from perf.gpu_figures import main as perf_figures

        perf_figures(sys.argv[2:])
    else:
        raise SystemExit(f"unknown step {step!r}: build | engine | fit | perf")
