#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone, CPU only, no downloads: bash scripts/demo.sh [--seed N]
# Phase 1 (collection + SRT) -> Phase 2 (SD-Zero) -> held-out evaluation of base / SRT / SD-Zero, on the shipped
# tiny arithmetic model (python -m sdzero_pl.demo --help for the options). Outputs: runs/demo/seed<N>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
.venv/bin/python -m sdzero_pl.demo "$@"
