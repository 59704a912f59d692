"""``python -m sdzero_pl.dryrun CONFIG [...]``: run a cluster config on the CPU for a few optimizer steps, with stand-ins
for what cannot run here, and report what was replaced and the first problem (:mod:`sdzero_pl.pipelines.dryrun`)."""

import sys

from sdzero_pl.pipelines.dryrun import main

if __name__ == "__main__":
    sys.exit(main())
