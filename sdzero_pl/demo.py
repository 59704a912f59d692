"""``python -m sdzero_pl.demo``: the embedded default: Phase 1 -> Phase 2 -> held-out evaluation on CPU (:mod:`sdzero_pl.pipelines.demo`)."""

import sys

from sdzero_pl.pipelines.demo import main

if __name__ == "__main__":
    sys.exit(main())
