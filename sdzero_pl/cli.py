"""The command line: LightningCLI with the model and data chosen by ``class_path`` (subclass mode).

    python main.py fit --config configs/qwen.yaml [--trainer.strategy=fsdp ...]
    python main.py fit --help          # every argument, from the constructors' docstrings
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class SDZeroCLI(LightningCLI):
    """LightningCLI whose modules and data modules are picked by ``class_path`` in the YAML."""


def main(args: list[str] | None = None, run: bool = True) -> SDZeroCLI:
    """Entry point of ``main.py``; ``args`` replaces ``sys.argv[1:]`` (tests call it directly)."""
    return SDZeroCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
