"""Benchmark: one Phase-2 training step of this project against TRL's trainers and a naive full-logit reference.

Same random Qwen3 (vocab 151,936, hidden 256, 4 layers: the LM head dominates, as at the paper's vocabulary with a
small body), same completions (8 prompts x (64 + 512) tokens, random ids; SD-Zero's teacher sequence
``x + y + P_r + y`` with a 16-token delimiter), one optimizer step = teacher pass + student forward / backward +
AdamW, float32, CPU. What each computes (so the comparison is honest):

| impl | divergence | over | teacher context |
|---|---|---|---|
| ``sdzero`` (this project, ``SelfDistillModule.distill_loss``) | 0.5 fwd + 0.5 rev KL | teacher's top-64, renormalised; logits only at those ids | ``x + y + P_r + y`` |
| ``naive`` (reference) | the same | the same, from full [N, V] logits of both | ``x + y + P_r + y`` |
| ``trl_distillation`` (``trl.DistillationTrainer``) | generalized JSD, beta 0.5 | FULL vocabulary, chunked | ``x + y`` (its teacher reads the student's sequence) |
| ``trl_sdft`` (``trl.experimental.sdft.SDFTTrainer``) | generalized JSD, alpha 0.5 | the STUDENT's top-64 of full [B, C, V] logits | ``x + y + P_r + y`` (given as its teacher prompt) |

``sdzero_drift`` / ``sdzero_tail`` (``--impls``): this project's step with the drift monitor computed at that step
(``student/topk_mass``: a no-grad chunked pass of the student's LM head) / with the tail term (the same pass with
gradient): what each option costs.

TRL is installed into its own virtual environment by this script (``--venv``, created with this interpreter's
``venv`` module, ``pip install torch==2.13.0 trl==<--trl-version>``; never a project dependency); its steps run
there (perf/trl_worker.py). Every measurement is a fresh subprocess (a warm-up step, then ``--steps`` timed ones),
implementations interleaved round by round, median over rounds; peak = growth of the resident set during the timed
steps (VmHWM after /proc/self/clear_refs), each implementation in its own process.

    python perf/bench_vs_trl.py                    # creates /tmp/sdzero-trl-venv on first use (~1 min)
    python perf/bench_vs_trl.py --vocab 4096 --completion-len 64 --rounds 1    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from perf.phase2_step import (  # noqa: E402
    SIZES, build_model, env_threads, load_module, optimizer_step, plan_batches, synthetic_examples
)

IMPLS = ("sdzero", "naive", "trl_distillation", "trl_sdft", "sdzero_drift", "sdzero_tail")
DEFAULT_IMPLS = IMPLS[:4]
HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


# ------------------------------------------------------------------------------------------------ TRL environment
def ensure_trl_venv(venv: str, version: str) -> str:
    """The TRL virtual environment's python, created and installed if missing (torch pinned to the local wheel)."""
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", f"import trl, sys; sys.exit(trl.__version__ != {version!r})"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating the TRL environment {venv} (trl=={version}, torch==2.13.0) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0", f"trl=={version}"], check=True)
    subprocess.run(check, check=True)
    return python


# --------------------------------------------------------------------------------------------------- the inputs
def make_inputs(args: argparse.Namespace) -> list:
    return synthetic_examples([args.completion_len] * args.prompts, args.vocab, args.prompt_len, args.control_len,
                              args.seed)


def save_inputs(examples, prompt_len: int, path: str) -> None:
    """The token ids TRL's worker reads: prompt, completion, SD-Zero's teacher sequence."""
    torch.save({"prompt_ids": [e.student_ids[:prompt_len] for e in examples],
                "completion_ids": [e.student_ids[prompt_len:] for e in examples],
                "teacher_ids": [e.teacher_ids for e in examples]}, path)


# ---------------------------------------------------------------------------------------- this project's workers
def naive_loss(student, teacher, batch: dict, k: int = 64):
    """Full [N, V] logits of both models at the completion positions, then the same top-k divergence."""
    from sdzero_pl.core.losses import naive_topk_divergence
    from sdzero_pl.core.sequences import select_targets

    def full_logits(model, role):
        out = model.model(input_ids=batch[f"{role}_ids"], attention_mask=batch[f"{role}_attention_mask"])
        h, _ = select_targets(out.last_hidden_state, batch[f"{role}_ids"], batch[f"{role}_mask"])  # (N, H)
        return model.lm_head(h)  # (N, V)

    with torch.no_grad():
        teacher_logits = full_logits(teacher, "teacher")
    student_logits = full_logits(student, "student")
    terms = naive_topk_divergence(student_logits, teacher_logits, k, "mixed")
    return terms["loss"].sum() / terms["loss"].shape[0]


def project_worker(args: argparse.Namespace) -> dict:
    from sdzero_pl.data.batching import Batching

    env_threads(args.threads)
    examples = make_inputs(args)
    batches, _, trainer = plan_batches(examples, args.prompts, 1, Batching())  # one micro-batch of all prompts
    module = load_module(args.model, "float32", "cpu", trainer, drift_every_n_steps=int(args.impl == "sdzero_drift"),
                         tail=args.impl == "sdzero_tail")
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-6)
    if args.impl.startswith("sdzero"):
        run = lambda: optimizer_step(module, batches, optimizer, "cpu")  # noqa: E731
    else:
        def run() -> dict:
            start, cpu = time.perf_counter(), time.process_time()
            naive_loss(module.policy, module.teacher, batches[0]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {"step_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    warmup_s = run()["step_s"]
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    steps = [run() for _ in range(args.steps)]
    return {"times": [s["step_s"] for s in steps], "cpu_times": [s["cpu_s"] for s in steps], "warmup_s": warmup_s,
            "peak_gib": (_status_kib("VmHWM") - base) / 2**20}


# ------------------------------------------------------------------------------------------------------ parent
def spawn(impl: str, args: argparse.Namespace, work: str, trl_python: str | None, round_: int) -> dict:
    out = os.path.join(work, f"{impl}-{round_}.json")
    if impl.startswith("trl_"):
        cmd = [trl_python, os.path.join(HERE, "trl_worker.py"), impl.removeprefix("trl_"), args.model,
               os.path.join(work, "inputs.pt"), out, f"--steps={args.steps}", f"--threads={args.threads}"]
    else:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("vocab", "hidden", "layers", "prompts", "prompt_len", "completion_len", "control_len",
                          "steps", "threads", "seed", "model")]
        cmd = [sys.executable, os.path.abspath(__file__), *flags, "--impl", impl, "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{impl} worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(out) as handle:
        return json.load(handle)


def report(args: argparse.Namespace, results: dict) -> dict:
    step = {i: statistics.median(t for r in results[i] for t in r["times"]) for i in results}
    cpu = {i: statistics.median(t for r in results[i] for t in r["cpu_times"]) for i in results}
    peak = {i: max(r["peak_gib"] for r in results[i]) for i in results}
    ref = "sdzero" if "sdzero" in results else next(iter(results))
    print(f"\nvocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x ({args.prompt_len} + "
          f"{args.completion_len}) tokens, teacher x + y + P_r + y = {args.prompt_len + 2 * args.completion_len + args.control_len} "
          f"tokens; float32 CPU, {args.threads} thread(s); median of {args.rounds} round(s) x {args.steps} step(s)")
    print(f"{'impl':<18}{'step s':>9}{'x ' + ref:>14}{'CPU s':>9}{'x ' + ref:>14}{'peak GiB':>10}{'x ' + ref:>14}")
    for impl in results:
        print(f"{impl:<18}{step[impl]:>9.2f}{step[impl] / step[ref]:>14.2f}{cpu[impl]:>9.2f}{cpu[impl] / cpu[ref]:>14.2f}"
              f"{peak[impl]:>10.2f}{peak[impl] / max(peak[ref], 1e-9):>14.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return {"step_s": step, "cpu_s": cpu, "peak_gib": peak,
            "rounds": {i: [(r["times"], r["cpu_times"]) for r in results[i]] for i in results},
            "config": {k: v for k, v in vars(args).items() if k not in ("impl", "out")}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=512)
    parser.add_argument("--control-len", type=int, default=16)
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"some of {','.join(IMPLS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess, after a warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", default="/tmp/sdzero-trl-venv", help="TRL's own virtual environment")
    parser.add_argument("--trl-version", default="1.16.0")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--impl", choices=("sdzero", "naive", "sdzero_drift", "sdzero_tail"), default=None,
                        help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        parser.error(f"`--impls` must name some of {IMPLS}, got {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.impl is not None:
        with open(args.out, "w") as handle:
            json.dump(project_worker(args), handle)
        return 0
    impls = args.impls.split(",")
    trl_python = ensure_trl_venv(args.venv, args.trl_version) if any(i.startswith("trl_") for i in impls) else None
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl-") as work:
        sizes = {**SIZES["cpu"], "vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers}
        args.model = build_model(os.path.join(work, "model"), sizes,
                                 max_position_embeddings=args.prompt_len + 2 * args.completion_len + args.control_len + 8)
        save_inputs(make_inputs(args), args.prompt_len, os.path.join(work, "inputs.pt"))
        results = {impl: [] for impl in impls}
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                print(f"  round {r + 1}/{args.rounds}: {impl} ...", flush=True)
                results[impl].append(spawn(impl, args, work, trl_python, r))
        summary = report(args, results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
