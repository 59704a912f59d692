"""The command line: LightningCLI with the model and data chosen by ``class_path`` (subclass mode).

    python main.py fit --config configs/qwen.yaml [--trainer.strategy=fsdp ...]
    python main.py fit --help          # every argument, from the constructors' docstrings

Argument groups (``--data.questions.*``, ``--model.optim.*``, ``--data.control.*``) are dataclasses whose attribute
docstrings document their fields in ``--help``. One run directory: ``--trainer.default_root_dir`` is linked to the
logger's ``save_dir``, and every output (the HF export, Phase 1's collection) defaults to a path under it.
"""

from __future__ import annotations

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from sdzero_pl.core.console import SDZeroParser, parsing, quiet, short_errors

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass fields are documented in --help


class SDZeroCLI(LightningCLI):
    """LightningCLI whose modules and data modules are picked by ``class_path`` in the YAML."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")


def main(args: list[str] | None = None, run: bool = True) -> SDZeroCLI:
    """The CLI; ``args`` replaces ``sys.argv[1:]`` (tests and the pipelines call it directly). Errors raise; a bad
    flag or config key exits with a short message (:class:`~sdzero_pl.core.console.SDZeroParser`)."""
    quiet()
    with parsing(args):
        return SDZeroCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_class=SDZeroParser,
            args=args,
            run=run,
        )


def entry(args: list[str] | None = None) -> int:
    """``main.py`` and the ``sdzero`` script: :func:`main`, with any error reported as the project's own message in a
    few lines (``SDZERO_DEBUG=1``: the full traceback); returns the exit code."""
    with short_errors() as failure:
        main(args)
    return failure.code
