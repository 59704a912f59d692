"""``python -m sdzero_pl.verify``: score a dataset's rows with the project's verifiers (:mod:`sdzero_pl.pipelines.verify`)."""

import sys

from sdzero_pl.pipelines.verify import main

if __name__ == "__main__":
    sys.exit(main())
