"""sdzero-pl command line: ``python main.py fit --config configs/qwen.yaml`` (see ``--help``)."""

import sys

from sdzero_pl.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
