"""``python -m sdzero_pl.compare``: every method x seed on the same questions, one comparison table (:mod:`sdzero_pl.pipelines.compare`)."""

import sys

from sdzero_pl.pipelines.compare import main

if __name__ == "__main__":
    sys.exit(main())
