"""Part 1 of the GPU check: what runs on a GPU image WITHOUT vLLM (the machine this project is sometimes lent:
Python 3.12, torch 2.11 CUDA, transformers 5.17, lightning 2.6.6; no vLLM, jsonargparse, datasets or math-verify, no
network). The project runs from PYTHONPATH and the few missing pure-Python wheels are carried
(``scripts/gpu_wheels.txt``, installed into a target folder by ``gpu_check.sh device``).

Each ``@step("device", name)`` function below is one independent check with its own figures; add a step by adding
a function (the driver in ``gpu_check.py`` runs them in this file's order). Sizes: the real ones on a GPU,
toy ones in ``GPU_CHECK_SMOKE=1`` mode (CPU, figures meaningless).
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from gpu_check import DEVICE, DTYPE, SMOKE, Context, N, peak_gib, step, sync

# Qwen3-4B-Instruct-2507's shapes (its config.json): the model of the paper's main table.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                tie_word_embeddings=True)
QWEN3_TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True)
# bf16 numerics bounds (not yet calibrated on a GPU: the first run reports the values they are checked against)
LOGP_GAP_BF16_MAX = 0.05  # bf16 vs float32 trainer log-probs of sampled tokens (the vLLM check's refreshed-gap bound)
LOSS_REL_BF16_MAX = 0.05  # chunked distillation loss, bf16 inputs vs float32
PAD_REL_BF16_MAX = 0.05  # final hidden states, left vs right padding, relative to their scale
ROLES_LOSS_BF16_MAX = 1e-3  # identical student and teacher: the loss is 0 up to gather-vs-matmul rounding


def _model(directory, dtype: str):
    from sdzero_pl.core.models import load_model

    return load_model(str(directory), dtype).to(DEVICE).eval()


def _random_completions(vocab: int, rows: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, length), generator=generator).tolist()


@step("device", "numerics")
def numerics(ctx: Context) -> dict:
    """bf16 against float32 on the GPU kernels the method relies on: log-probs of sampled tokens, the chunked
    distillation loss, padding invariance of the decoder, and the zero loss of identical roles."""
    from perf.bench_distill_loss import make_inputs
    from sdzero_pl.core.losses import gathered_logits, teacher_topk, topk_divergence
    from sdzero_pl.core.models import hidden_states
    from sdzero_pl.core.prompts import encode_prompts
    from sdzero_pl.core.sequences import pad_sequences
    from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps

    fp32, bf16 = _model(ctx.model_dir, "float32"), _model(ctx.model_dir, "bfloat16")
    from sdzero_pl.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(ctx.model_dir))
    prompts = encode_prompts(tokenizer, [f"What is {i}+{i}?" for i in range(16)])
    completions = _random_completions(len(tokenizer), 16, 128 // N, seed=0)
    gap = logprob_gap(sampled_token_logps(bf16, prompts, completions, tokenizer.pad_token_id),
                      sampled_token_logps(fp32, prompts, completions, tokenizer.pad_token_id))

    rows = [p + c for p, c in zip(prompts, completions)]
    rows = [r[: len(r) - 7 * (i % 4)] for i, r in enumerate(rows)]  # ragged, so padding differs per side
    states = {}
    for side in ("left", "right"):
        ids = pad_sequences(rows, tokenizer.pad_token_id, side).to(DEVICE)
        mask = pad_sequences([[1] * len(r) for r in rows], 0, side).to(DEVICE)
        with torch.no_grad():
            h = hidden_states(bf16, ids, mask).float()
        states[side] = h[mask.bool()]  # (tokens, H) in (row, position) order, the same for both sides
    pad_rel = float((states["left"] - states["right"]).abs().max() / states["right"].abs().max())

    sizes = dict(vocab=151936 // (64 if SMOKE else 1), hidden=2560 // (40 if SMOKE else 1), tokens=1024 // N)
    inputs = {k: v.detach().to(DEVICE) for k, v in make_inputs(**sizes).items()}
    losses = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        h_t, w_t = inputs["hidden_t"].to(dtype), inputs["weight_t"].to(dtype)
        ids, teacher_logits, _ = teacher_topk(h_t, w_t, 64, 512)
        student = gathered_logits(inputs["hidden_s"].to(dtype), inputs["weight_s"].to(dtype), ids, 512)
        losses[name] = float(topk_divergence(student, teacher_logits, "mixed")["loss"].mean())
        if name == "bfloat16":  # identical roles: the teacher's own hidden states and head as the student
            same = gathered_logits(h_t, w_t, ids, 512)
            roles_loss = float(topk_divergence(same, teacher_logits, "mixed")["loss"].abs().max())
    loss_rel = abs(losses["bfloat16"] - losses["float32"]) / abs(losses["float32"])
    ok = (gap < LOGP_GAP_BF16_MAX and pad_rel < PAD_REL_BF16_MAX and loss_rel < LOSS_REL_BF16_MAX
          and roles_loss < ROLES_LOSS_BF16_MAX)
    return {"ok": ok, "logp_gap_bf16_vs_fp32": gap, "logp_gap_max": LOGP_GAP_BF16_MAX,
            "padding_rel_diff_bf16": pad_rel, "padding_rel_max": PAD_REL_BF16_MAX,
            "loss_fp32": losses["float32"], "loss_bf16": losses["bfloat16"], "loss_rel_diff_bf16": loss_rel,
            "identical_roles_loss_bf16": roles_loss, "sizes": sizes}


@step("device", "distill_loss")
def distill_loss(ctx: Context) -> dict:
    """perf/bench_distill_loss.py's comparison at the real sizes (vocab 151,936, hidden 2,560, 4,096 tokens, k 64,
    float32) on the GPU: time and peak GPU memory of the chunked loss vs the naive full-logits loss, and equality."""
    from perf.bench_distill_loss import compare, make_inputs, run_impl

    sizes = dict(vocab=151936 // (64 if SMOKE else 1), hidden=2560 // (40 if SMOKE else 1), tokens=4096 // N)
    rows = {}
    for impl in ("naive", "chunked"):
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        inputs = {k: v.detach().to(DEVICE).requires_grad_(v.requires_grad) for k, v in make_inputs(**sizes).items()}
        base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_impl(impl, inputs, 64, 512, "mixed", repeats=1)  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        result = run_impl(impl, inputs, 64, 512, "mixed", repeats=3)
        sync()
        rows[impl] = {"result": result, "time_s": (time.perf_counter() - start) / 3,
                      "peak_gib": ((torch.cuda.max_memory_allocated() - base) / 2**30) if DEVICE == "cuda" else None}
    diff = compare(rows["chunked"]["result"], rows["naive"]["result"])
    out = {"ok": diff["equal"], "sizes": sizes, "k": 64, "chunk_size": 512, **{k: v for k, v in diff.items()}}
    for impl, row in rows.items():
        out[f"{impl}_time_s"] = round(row["time_s"], 4)
        out[f"{impl}_peak_gib"] = None if row["peak_gib"] is None else round(row["peak_gib"], 3)
    out["time_ratio"] = round(rows["chunked"]["time_s"] / rows["naive"]["time_s"], 3)
    if DEVICE == "cuda":
        out["memory_ratio"] = round(rows["chunked"]["peak_gib"] / rows["naive"]["peak_gib"], 3)
    return out


@step("device", "hf_generate")
def hf_generate(ctx: Context) -> dict:
    """HF generate tokens/s on the ~110M random Qwen3 in bf16: 64 prompts x 256 new tokens, one batch."""
    from perf.bench_generate import hf_tokens_per_s
    from sdzero_pl.core.models import load_tokenizer
    from sdzero_pl.core.prompts import encode_prompts

    model, tokenizer = _model(ctx.model_dir, DTYPE), load_tokenizer(str(ctx.model_dir))
    prompts = encode_prompts(tokenizer, [f"What is {i}+{i + 3}? Answer in \\boxed{{}}." for i in range(64 // N)])
    return hf_tokens_per_s(model, tokenizer, prompts, max_new_tokens=256 // N, batch_size=64 // N, device=DEVICE)


def _distill_batch(vocab: int, rows: int, prompt_len: int, completion_len: int, device: str) -> dict:
    """A Phase-2 micro-batch of random ids: chat(x) + y for the student, x + y' + delimiter + y for the teacher."""
    from sdzero_pl.core.sequences import build_distill_example, collate_distill

    prompts = _random_completions(vocab, rows, prompt_len, seed=1)
    completions = _random_completions(vocab, rows, completion_len, seed=2)
    control = _random_completions(vocab, 1, 15, seed=3)[0]  # "\n\nWait, this response is not correct...\n\n"
    examples = [build_distill_example(p, c, control, [0], prompt_len + 2 * completion_len + 15)
                for p, c in zip(prompts, completions)]
    batch = {k: v.to(device) for k, v in collate_distill(examples, pad_id=0).items()}
    batch["global_tokens"] = torch.tensor(sum(e.num_tokens for e in examples))
    return batch


@step("device", "phase2_step_4b")
def phase2_step_4b(ctx: Context) -> dict:
    """One Phase-2 optimizer step as SelfDistillModule.training_step computes it, at Qwen3-4B shapes from a random
    config: float32 master weights, bf16 autocast (configs/qwen.yaml's precision), gradient checkpointing, a frozen
    teacher copy, 4 rollouts of 1,024 tokens after a 256-token prompt, top-k 64; time per step and peak memory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sdzero_pl.core.losses import normalised_sum, topk_divergence
    from sdzero_pl.phase2.distill import SelfDistillModule

    shapes = QWEN3_TOY if SMOKE else QWEN3_4B
    with torch.device(DEVICE):
        torch.manual_seed(0)
        student = Qwen3ForCausalLM(Qwen3Config(**shapes)).to(torch.float32)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    params = sum(p.numel() for p in student.parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-6, betas=(0.9, 0.95), **({"fused": True}
                                                                                        if DEVICE == "cuda" else {}))
    batch = _distill_batch(shapes["vocab_size"], 4, 256 // N, 1024 // N, DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16)

    def one_step() -> float:
        with autocast:
            with torch.no_grad():
                ids, teacher_logits, _ = SelfDistillModule._teacher_topk(
                    teacher, batch["teacher_ids"], batch["teacher_attention_mask"], batch["teacher_mask"], 64, 512)
            student_logits, _ = SelfDistillModule._student_logits(
                student, batch["student_ids"], batch["student_attention_mask"], batch["student_mask"], ids, 512, None)
            terms = topk_divergence(student_logits, teacher_logits, "mixed")
            loss = normalised_sum(terms["loss"], int(batch["global_tokens"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [one_step()]  # warm-up: optimizer state allocated, kernels chosen
    sync()
    start = time.perf_counter()
    losses += [one_step() for _ in range(3)]
    sync()
    seconds = (time.perf_counter() - start) / 3
    tokens = int(batch["global_tokens"])
    ok = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {"ok": ok, "params": params, "shapes": "qwen3-toy" if SMOKE else "qwen3-4b", "step_s": round(seconds, 3),
            "completion_tokens_per_step": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "teacher_len": int(batch["teacher_ids"].shape[1]), "peak_gpu_gib": peak_gib(), "losses": losses}


@step("device", "fit_fsdp")
def fit_fsdp(ctx: Context) -> dict:
    """A Phase-2 fit through main.py's CLI: FSDP1 on 1 GPU (--trainer.strategy=fsdp), bf16-mixed, activation
    checkpointing, HF rollouts, teacher sync every 4 optimizer steps; 3 epochs x 64 prompts, batch 8, accumulate 2
    (12 steps; smoke: 16 prompts, batch 4, 6 steps, a sync every 2)."""
    from safetensors.torch import load_file

    from sdzero_pl.cli import main

    run = ctx.work / "fit_fsdp"
    prompts, batch, sync_every = (16, 4, 2) if SMOKE else (64, 8, 4)
    steps = 3 * prompts // (batch * 2)  # configs/tiny/sdzero.yaml accumulates 2 micro-batches
    args = [
        "fit", "--config", "configs/tiny/sdzero.yaml",
        *(["--trainer.accelerator=cpu"] if SMOKE else ["--trainer.accelerator=gpu", "--trainer.strategy=fsdp"]),
        "--trainer.precision=bf16-mixed", "--trainer.devices=1", "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
        "--trainer.callbacks=[{class_path: callbacks.TeacherSync, init_args: {every_n_steps: %d}}]" % sync_every,
        f"--model.init_args.model_name_or_path={ctx.model_dir}", "--model.init_args.gradient_checkpointing=true",
        f"--model.init_args.export_dir={run}/hf_model", f"--data.init_args.prompts_per_epoch={prompts}",
        f"--data.init_args.batch_size={batch}", "--data.init_args.max_teacher_len=512",
        f"--data.init_args.rollout.init_args.max_new_tokens={128 // N}", "--data.init_args.rollout.init_args.batch_size=64",
        "--data.init_args.rollout.init_args.show_progress=false",
    ]
    sys.argv[1:] = []  # LightningCLI reads `args`, not the driver's own arguments
    start = time.perf_counter()
    cli = main(args)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    exported = load_file(f"{run}/hf_model/model.safetensors")
    started = load_file(str(ctx.model_dir / "model.safetensors"))
    moved = sum(not torch.equal(exported[k].float(), started[k].float()) for k in started)
    syncs = metrics.get("teacher/syncs", 0.0)
    ok = (cli.trainer.global_step == steps and cli.model.sharding == (None if SMOKE else "fsdp1") and syncs == 3
          and moved > 0 and all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("train/")))
    return {"ok": ok, "seconds": round(seconds, 1), "global_step": cli.trainer.global_step,
            "sharding": cli.model.sharding, "teacher_syncs": syncs, "tensors_moved": moved,
            "generate_s": metrics.get("time/generate_s"), "loss": metrics.get("train/loss_epoch"),
            "reward_mean": metrics.get("rollout/reward_mean"), "peak_gpu_gib": peak_gib()}


# Issue 16's figures (perf/gpu_figures.py), last: the longest steps, so a timeout keeps the figures above.
@step("device", "distill_loss_bf16")
def distill_loss_bf16(ctx: Context) -> dict:
    """The distillation loss alone at Qwen3-4B's LM head in bf16 (4,096 tokens, k 64), chunked vs naive full logits:
    time, peak memory and the working memory above the LM-head gradient (perf/bench_distill_loss.py)."""
    from perf import gpu_figures

    return gpu_figures.distill_loss(str(ctx.work), smoke=SMOKE)


@step("device", "batching")
def batching(ctx: Context) -> dict:
    """One Phase-2 optimizer step at Qwen3-4B shapes (bf16, gradient checkpointing, top-k 64) over 16 long-tailed
    rollouts, fixed-count vs length-aware micro-batching: step time, peak memory, padded share, equal gradients
    (perf/bench_batching.py)."""
    from perf import gpu_figures

    return gpu_figures.batching(str(ctx.work), smoke=SMOKE)
