#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone, CPU only, no downloads: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python main.py fit --config configs/tiny/sdzero.yaml "$@"
