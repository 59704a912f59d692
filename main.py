"""sdzero-pl command line: ``python main.py fit --config configs/qwen.yaml`` (see ``--help``)."""

from sdzero_pl.cli import main

if __name__ == "__main__":
    main()
