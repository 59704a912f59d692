"""Benchmark of the Phase 2 distillation loss (docs/method.md, "Phase 2", step 4) at the real sizes, on CPU.

Compares, in the same run, two ways to get the top-k (k = 64) distillation loss and its gradients w.r.t. the
student's hidden states and LM-head weight, for Qwen3-4B-like sizes (vocab 151,936, hidden 2,560) and 4,096
completion tokens, float32:

* ``chunked`` (what ``SelfDistillModule.training_step`` does): ``teacher_topk`` in a no-grad pass over chunks of
  tokens, student logits only at the k ids via ``gathered_logits``, ``topk_divergence``, ``.sum() / N``, backward;
* ``naive`` (the reference): full [N, V] student logits with grad and full [N, V] teacher logits under no_grad,
  ``naive_topk_divergence``, ``.sum() / N``, backward. The [N, V] tensors are locals of the forward function, so they
  are freed before backward, as in a ``training_step`` that returns the loss to Lightning;
* ``naive_held`` (``--naive-held``): the same with both [N, V] tensors kept referenced through backward.

Both paths end with a dense float32 gradient of the student's LM head, V x H x 4 bytes (1.45 GiB at the real
sizes): no implementation can peak below that, and the report prints it as a fraction of naive's peak.

``--dtype bfloat16`` runs the same in bf16, as a GPU run would (hidden states and LM heads in bf16; the chunked
path's top-k logits are float32 products of the bf16 rows, the naive path's [N, V] logits are bf16). The report
also gives each implementation's working memory above the dense LM-head gradient (V x H in the weights' dtype),
the figure that says what the loss itself costs.

Each implementation runs in its own fresh subprocess, so one's allocations cannot hide the other's peak. Peak
memory is the growth of the process's resident set over the resident set measured right after the inputs are
built: the kernel's high-water mark (VmHWM, reset by writing "5" to /proc/self/clear_refs once the inputs exist)
minus that baseline, cross-checked by a thread sampling VmRSS every 2 ms. Each subprocess saves its loss and
gradients; the parent compares them. Targets (issue 2): chunked peak <= 1/4 of naive, time <= 1.2x naive.

    .venv/bin/python perf/bench_distill_loss.py                        # real sizes, several minutes
    .venv/bin/python perf/bench_distill_loss.py --vocab 8192 --hidden 256 --tokens 512 --k 16   # smoke
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's sdzero_pl

import torch  # noqa: E402

from sdzero_pl.core.losses import gathered_logits, naive_topk_divergence, teacher_topk, topk_divergence  # noqa: E402

GIB = 1024**3
IMPLS = ("naive", "naive_held", "chunked")
TARGET_MEMORY_RATIO = 0.25  # issue 2: chunked peak memory at most a quarter of naive
TARGET_TIME_RATIO = 1.2  # issue 2: chunked time no worse than 1.2x naive
# equality of chunked and naive: |dloss| absolute on the token-mean loss, max|a - b| / max|b| (b = naive) per gradient;
# in bf16 the naive logits themselves are rounded to bf16, so the two paths differ by that rounding
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-12, 1e-10), "bfloat16": (2e-2, 5e-2)}


# --------------------------------------------------------------------------------------------- inputs and steps
def make_inputs(vocab: int, hidden: int, tokens: int, seed: int = 0, dtype=torch.float32,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random student/teacher final hidden states ~ N(0, 1) and LM heads ~ N(0, 0.02^2), from a fixed seed (drawn on
    the CPU, then moved: the same values on any device)."""
    if device != "cpu":
        inputs = make_inputs(vocab, hidden, tokens, seed, dtype)
        return {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_s": torch.empty(tokens, hidden, dtype=dtype).normal_(0.0, 1.0, generator=gen),  # (N, H)
        "hidden_t": torch.empty(tokens, hidden, dtype=dtype).normal_(0.0, 1.0, generator=gen),  # (N, H)
        "weight_s": torch.empty(vocab, hidden, dtype=dtype).normal_(0.0, 0.02, generator=gen),  # (V, H)
        "weight_t": torch.empty(vocab, hidden, dtype=dtype).normal_(0.0, 0.02, generator=gen),  # (V, H)
    }
    inputs["hidden_s"].requires_grad_(True)
    inputs["weight_s"].requires_grad_(True)
    return inputs


def chunked_forward(inputs: dict, k: int, chunk_size: int, divergence: str) -> dict:
    """The loss as ``SelfDistillModule.training_step`` computes it; {"loss", "ids", "phases": [teacher_s, student_s]}."""
    start = time.perf_counter()
    ids, teacher_logits, _ = teacher_topk(inputs["hidden_t"], inputs["weight_t"], k, chunk_size)  # (N, k) x2
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    student_logits = gathered_logits(inputs["hidden_s"], inputs["weight_s"], ids, chunk_size)  # (N, k)
    loss = topk_divergence(student_logits, teacher_logits, divergence)["loss"].sum() / ids.shape[0]
    return {"loss": loss, "ids": ids, "phases": [teacher_s, time.perf_counter() - start]}


def naive_forward(inputs: dict, k: int, chunk_size: int, divergence: str, hold_logits: bool = False) -> dict:
    """The loss through full [N, V] logits. With ``hold_logits`` the two [N, V] tensors stay referenced through
    backward (a script that keeps them in scope); without, they die with this function, as in a training_step
    that returns the loss to Lightning before backward."""
    del chunk_size  # no chunks: that is the point
    start = time.perf_counter()
    with torch.no_grad():
        teacher_logits = inputs["hidden_t"] @ inputs["weight_t"].T  # (N, V)
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    student_logits = inputs["hidden_s"] @ inputs["weight_s"].T  # (N, V), with grad
    loss = naive_topk_divergence(student_logits, teacher_logits, k, divergence)["loss"].sum() / student_logits.shape[0]
    student_s = time.perf_counter() - start
    ids = teacher_logits.topk(k, dim=-1).indices  # (N, k), diagnostic only, outside the timed regions
    out = {"loss": loss, "ids": ids, "phases": [teacher_s, student_s]}
    if hold_logits:
        out["held"] = (teacher_logits, student_logits)
    return out


FORWARDS = {
    "naive": naive_forward,
    "naive_held": functools.partial(naive_forward, hold_logits=True),
    "chunked": chunked_forward,
}


def run_impl(impl: str, inputs: dict, k: int, chunk_size: int, divergence: str, repeats: int = 1) -> dict:
    """``repeats`` forward + backward passes (gradients reset in between); loss, grads and ids of the last one.
    Phases per repeat: [teacher_s, student forward_s, backward_s]."""
    times, phases = [], []
    cuda = inputs["hidden_s"].is_cuda
    for _ in range(repeats):
        inputs["hidden_s"].grad = inputs["weight_s"].grad = None
        gc.collect()
        out = FORWARDS[impl](inputs, k, chunk_size, divergence)
        start = time.perf_counter()
        out["loss"].backward()
        if cuda:
            torch.cuda.synchronize()  # the total is exact; on a GPU the phase split is not (kernels run async)
        phase = out["phases"] + [time.perf_counter() - start]
        loss, ids = out["loss"].detach(), out["ids"]
        del out
        times.append(sum(phase))
        phases.append(phase)
    return {
        "loss": loss,
        "ids": ids,
        "grad_hidden": inputs["hidden_s"].grad,
        "grad_weight": inputs["weight_s"].grad,
        "times": times,
        "phases": phases,
    }


def max_diffs(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> tuple[float, float]:
    """(max|a - b|, max|a - b| / max|b|), row block by row block so no full-size temporary is made."""
    abs_diff, ref = 0.0, 0.0
    for start in range(0, a.shape[0], rows):
        x, y = a[start:start + rows].double(), b[start:start + rows].double()
        abs_diff = max(abs_diff, (x - y).abs().max().item())
        ref = max(ref, y.abs().max().item())
    return abs_diff, abs_diff / ref if ref > 0 else float("inf")


def compare(chunked: dict, naive: dict, dtype: str = "float32") -> dict:
    """Loss and gradient differences of ``chunked`` against the ``naive`` reference, with PASS flags."""
    loss_atol, grad_rtol = TOLERANCES[dtype]
    loss_diff = abs(float(chunked["loss"]) - float(naive["loss"]))
    out = {"loss_abs_diff": loss_diff, "loss_ok": loss_diff <= loss_atol,
           "ids_rows_differing": int((chunked["ids"].sort(-1).values != naive["ids"].sort(-1).values).any(-1).sum())}
    for name in ("grad_hidden", "grad_weight"):
        abs_diff, rel_diff = max_diffs(chunked[name], naive[name])
        out[f"{name}_abs_diff"], out[f"{name}_rel_diff"] = abs_diff, rel_diff
        out[f"{name}_ok"] = rel_diff <= grad_rtol
    out["equal"] = out["loss_ok"] and out["grad_hidden_ok"] and out["grad_weight_ok"]
    return out


def compare_in_process(vocab: int, hidden: int, tokens: int, k: int, chunk_size: int = 512,
                       divergence: str = "mixed", seed: int = 0, dtype=torch.float32) -> dict:
    """Both implementations on the same inputs in this process (no timing, no memory): the smoke-test entry."""
    results = {}
    for impl in ("naive", "chunked"):
        inputs = make_inputs(vocab, hidden, tokens, seed, dtype)
        results[impl] = run_impl(impl, inputs, k, chunk_size, divergence)
    return {"chunked_loss": float(results["chunked"]["loss"]), "naive_loss": float(results["naive"]["loss"]),
            **compare(results["chunked"], results["naive"], str(dtype).removeprefix("torch."))}


# ------------------------------------------------------------------------------------------ memory measurement
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class RssSampler(threading.Thread):
    """Max VmRSS seen every ``interval`` seconds; torch's big kernels release the GIL, so this keeps sampling."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak_kib, self._stop_event = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kib, _status_kib("VmRSS"))


def cuda_worker(args: argparse.Namespace) -> None:
    """The worker on a GPU: peak = ``torch.cuda.max_memory_allocated`` over the allocation right after the inputs."""
    inputs = make_inputs(args.vocab, args.hidden, args.tokens, args.seed, getattr(torch, args.dtype), args.device)
    checksum = [float(t.detach().double().sum()) for t in inputs.values()]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run_impl(args.impl, inputs, args.k, args.chunk_size, args.divergence, args.repeats)
    peak = (torch.cuda.max_memory_allocated() - baseline) / GIB
    result = {k: v.cpu() if torch.is_tensor(v) else v for k, v in result.items()}
    result.update(checksum=checksum, baseline_gib=baseline / GIB, peak_gib=peak, sampled_gib=peak)
    torch.save(result, args.out)


def worker(args: argparse.Namespace) -> None:
    """One implementation in this fresh process: build inputs, reset the high-water mark, run, save results."""
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        return cuda_worker(args)
    inputs = make_inputs(args.vocab, args.hidden, args.tokens, args.seed, getattr(torch, args.dtype))
    checksum = [float(t.detach().double().sum()) for t in inputs.values()]
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    sampler = RssSampler()
    sampler.start()
    result = run_impl(args.impl, inputs, args.k, args.chunk_size, args.divergence, args.repeats)
    sampled_kib = sampler.stop()
    hwm_kib = _status_kib("VmHWM")
    result.update(checksum=checksum, baseline_gib=baseline_kib * 1024 / GIB,
                  peak_gib=(hwm_kib - baseline_kib) * 1024 / GIB, sampled_gib=(sampled_kib - baseline_kib) * 1024 / GIB)
    torch.save(result, args.out)


# ------------------------------------------------------------------------------------------------------ parent
def estimate_gib(impl: str, args: argparse.Namespace) -> float:
    """Rough RSS the worker needs: inputs + gradients + the implementation's big temporaries (float32 upper bound
    for the float32 temporaries of the bf16 run)."""
    v, h, n, c = args.vocab, args.hidden, args.tokens, min(args.chunk_size, args.tokens)
    base = 3 * v * h + 3 * n * h  # two LM heads, the student's head gradient, hidden states and their gradient
    extra = 3 * n * v if impl.startswith("naive") else max(3 * c * v, 2 * c * args.k * h)
    return 4 * (base + extra) / GIB


def wait_for_memory(need_gib: float, wait_s: float) -> None:
    """Block until MemAvailable covers ``need_gib`` (other jobs share this machine), or give up after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        with open("/proc/meminfo") as handle:
            available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:")) * 1024 / GIB
        if available >= need_gib:
            return
        if time.monotonic() >= deadline:
            raise SystemExit(f"need ~{need_gib:.1f} GiB, only {available:.1f} GiB available after waiting {wait_s:.0f} s; "
                             "retry later or pass smaller --vocab/--tokens")
        print(f"  waiting for memory: need ~{need_gib:.1f} GiB, {available:.1f} GiB available", flush=True)
        time.sleep(30)


def spawn(impl: str, chunk_size: int, args: argparse.Namespace, out_dir: str) -> dict:
    """Run one implementation in a fresh subprocess and load what it saved."""
    out = os.path.join(out_dir, f"{impl}-{chunk_size}.pt")
    sub_args = argparse.Namespace(**{**vars(args), "chunk_size": chunk_size})
    if args.device == "cpu":
        wait_for_memory(1.2 * estimate_gib(impl, sub_args) + 0.5, args.wait_for_memory)
    flags = [f"--{name.replace('_', '-')}={getattr(sub_args, name)}" for name in
             ("vocab", "hidden", "tokens", "k", "chunk_size", "repeats", "divergence", "seed", "threads", "dtype",
              "device")]
    for attempt in range(1, args.retries + 2):
        print(f"  running {impl} (chunk {chunk_size}) in a subprocess, attempt {attempt} ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl, "--out", out, *flags])
        if proc.returncode == 0:
            return torch.load(out, mmap=True)
        if proc.returncode != -9 or attempt > args.retries:  # -9: SIGKILL, most likely the OOM killer
            raise SystemExit(f"{impl} worker failed with exit code {proc.returncode} (-9: killed, likely out of memory)")
        print("  killed (out of memory?): other jobs share this machine; retrying in 60 s", flush=True)
        time.sleep(60)
        if args.device == "cpu":
            wait_for_memory(1.2 * estimate_gib(impl, sub_args) + 0.5, args.wait_for_memory)
    raise AssertionError("unreachable: the loop returns or exits")


def report(args: argparse.Namespace, results: dict) -> bool:
    naive = results["naive"]
    naive_time, naive_peak = statistics.median(naive["times"]), naive["peak_gib"]
    print(f"\nvocab {args.vocab}, hidden {args.hidden}, tokens {args.tokens}, k {args.k}, divergence {args.divergence}, "
          f"{args.dtype}, {args.device}, torch {torch.__version__}, {args.threads} threads, median of {args.repeats} "
          "repeat(s)")
    print("time = forward + backward, split teacher | student forward | backward. Peak = growth of the worker's resident\n"
          "set over its RSS right after the inputs were built: each impl runs in a fresh subprocess, which resets the\n"
          "kernel's high-water mark (VmHWM, via /proc/self/clear_refs) once the inputs exist and reads it after the runs;\n"
          "in brackets the max VmRSS seen by a thread sampling /proc/self/status every 2 ms.\n")
    head = (f"{'impl':<14}{'time s':>9}{'phases s':>24}{'x naive':>9}{'peak GiB':>10}{'(sampled)':>11}{'x naive':>9}"
            f"{'loss':>13}{'|dloss|':>10}{'dgrad_h abs/rel':>20}{'dgrad_W abs/rel':>20}{'ids!=':>7}  result")
    print(head)
    print("-" * len(head))
    all_pass = True
    for name, res in results.items():
        t = statistics.median(res["times"])
        phases = "|".join(f"{statistics.median(p[i] for p in res['phases']):.1f}" for i in range(3))
        row = (f"{name:<14}{t:>9.2f}{phases:>24}{t / naive_time:>9.2f}{res['peak_gib']:>10.2f}"
               f"({res['sampled_gib']:>8.2f}){res['peak_gib'] / naive_peak:>9.3f}{float(res['loss']):>13.8f}")
        if name == "naive":
            print(row + f"{'-':>10}{'(reference)':>20}{'':>20}{'':>7}")
            continue
        if name == "naive_held":  # a second baseline, not subject to the targets
            print(row + f"{abs(float(res['loss']) - float(naive['loss'])):>10.1e}{'(baseline)':>20}{'':>20}{'':>7}")
            continue
        if res["checksum"] != naive["checksum"]:
            raise SystemExit(f"{name}: inputs differ from naive's (checksums {res['checksum']} vs {naive['checksum']})")
        diff = compare(res, naive, args.dtype)
        ok_mem = res["peak_gib"] <= TARGET_MEMORY_RATIO * naive_peak
        ok_time = t <= TARGET_TIME_RATIO * naive_time
        verdict = " ".join(f"{label}:{'PASS' if ok else 'FAIL'}" for label, ok in
                           (("mem", ok_mem), ("time", ok_time), ("equal", diff["equal"])))
        all_pass &= ok_mem and ok_time and diff["equal"]
        print(row + f"{diff['loss_abs_diff']:>10.1e}"
              f"{diff['grad_hidden_abs_diff']:>11.1e}/{diff['grad_hidden_rel_diff']:.1e}"
              f"{diff['grad_weight_abs_diff']:>11.1e}/{diff['grad_weight_rel_diff']:.1e}"
              f"{diff['ids_rows_differing']:>7}  {verdict}")
    loss_atol, grad_rtol = TOLERANCES[args.dtype]
    print(f"\ntargets: peak <= {TARGET_MEMORY_RATIO} x naive, time <= {TARGET_TIME_RATIO} x naive, |dloss| <= "
          f"{loss_atol} (absolute), max|dgrad| / max|grad_naive| <= {grad_rtol} for d/d hidden_s and d/d W_s; "
          "ids!= = tokens whose teacher top-k id set differs from naive's")
    floor = args.vocab * args.hidden * getattr(torch, args.dtype).itemsize / GIB
    print(f"floor: the dense W_s gradient alone is {floor:.2f} GiB = {floor / naive_peak:.3f} x naive's peak")
    print("working memory above that floor (the loss's own): " + ", ".join(
        f"{name} {res['peak_gib'] - floor:.2f} GiB" for name, res in results.items()))
    print(f"overall: {'PASS' if all_pass else 'FAIL'} (load average at the end {os.getloadavg()[0]:.2f})")
    return all_pass


def figures(args: argparse.Namespace, results: dict) -> dict:
    """The report's numbers as a dict (the GPU check records them): time and peak per impl, both against naive, and
    the working memory above the dense LM-head gradient."""
    naive = results["naive"]
    floor = args.vocab * args.hidden * getattr(torch, args.dtype).itemsize / GIB
    out = {"dtype": args.dtype, "device": args.device, "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens,
           "head_grad_gib": floor}
    for name, res in results.items():
        t = statistics.median(res["times"])
        out[name] = {"time_s": t, "time_x_naive": t / statistics.median(naive["times"]), "peak_gib": res["peak_gib"],
                     "peak_x_naive": res["peak_gib"] / naive["peak_gib"], "above_head_grad_gib": res["peak_gib"] - floor}
        if name != "naive" and name != "naive_held":
            out[name]["equal"] = compare(res, naive, args.dtype)["equal"]
    return out


def run(argv: list[str] | None = None) -> dict:
    """Every implementation in its own subprocess; the :func:`report` printed, its :func:`figures` returned."""
    args = parse_args(argv)
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")] if args.chunk_sizes else [args.chunk_size]
    out_dir = tempfile.mkdtemp(prefix="bench_distill_loss-")
    try:
        results = {"naive": spawn("naive", args.chunk_size, args, out_dir)}
        for chunk_size in chunk_sizes:
            results[f"chunked@{chunk_size}"] = spawn("chunked", chunk_size, args, out_dir)
        passed = report(args, results)
        return {**figures(args, results), "pass": passed}
    finally:
        for name in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, name))
        os.rmdir(out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2_560)
    parser.add_argument("--tokens", type=int, default=4_096, help="completion tokens N in the micro-batch")
    parser.add_argument("--k", type=int, default=64, help="teacher top-k (paper: 64)")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk (chunked impl)")
    parser.add_argument("--chunk-sizes", default=None, help="comma list: run the chunked impl once per chunk size")
    parser.add_argument("--naive-held", action="store_true",
                        help="also run the naive impl with both [N, V] logits kept alive through backward")
    parser.add_argument("--repeats", type=int, default=1, help="timed forward+backward passes per impl (median)")
    parser.add_argument("--divergence", default="mixed", choices=("reverse", "forward", "mixed"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="hidden states and LM heads (bfloat16: as a GPU run)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory from the CUDA allocator)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a worker killed by SIGKILL (OOM)")
    parser.add_argument("--wait-for-memory", type=float, default=900.0, help="seconds to wait for free RAM")
    parser.add_argument("--keep", default=None, help="directory to keep the saved results in (default: temporary)")
    parser.add_argument("--impl", choices=IMPLS, default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("vocab", "hidden", "tokens", "k", "chunk_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.k > args.vocab:
        parser.error(f"`--k` must be <= `--vocab` ({args.vocab}), got {args.k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.impl is not None:
        worker(args)
        return 0
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")] if args.chunk_sizes else [args.chunk_size]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}", flush=True)
    out_dir = args.keep or tempfile.mkdtemp(prefix="bench_distill_loss-")
    os.makedirs(out_dir, exist_ok=True)
    try:
        results = {"naive": spawn("naive", args.chunk_size, args, out_dir)}
        if args.naive_held:
            results["naive_held"] = spawn("naive_held", args.chunk_size, args, out_dir)
        for chunk_size in chunk_sizes:
            results[f"chunked@{chunk_size}"] = spawn("chunked", chunk_size, args, out_dir)
        return 0 if report(args, results) else 1
    finally:
        if args.keep is None:
            for name in os.listdir(out_dir):
                os.remove(os.path.join(out_dir, name))
            os.rmdir(out_dir)


if __name__ == "__main__":
    sys.exit(main())
