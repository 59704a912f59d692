"""What a user sees on the console: the project's own error message instead of a traceback, and no harmless noise.

* :func:`short_errors` (``main.py``, the demo, the comparison): an exception ends the command with the message the
  project raised (found at the bottom of jsonargparse's and Lightning's wrappers), in a few lines, and exit code 1;
  ``SDZERO_DEBUG=1`` (or jsonargparse's own ``JSONARGPARSE_DEBUG``) shows the full traceback instead.
* :class:`SDZeroParser`: a command-line or YAML mistake (an unknown key, a value of the wrong type) is reported as
  the flag, or the config file, line and key, with the accepted names closest to a typo, in place of
  jsonargparse's usage text and union-type dump; exit code 2, as argparse.
* :func:`quiet`: Lightning's advertising tips and warnings that are expected here (the frozen teacher is in eval
  mode on purpose; the rank shards are iterable datasets with a length) are silenced.
* :func:`advance_bar`: the evaluation's progress bar moves while a batch generates, not only between batches.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from lightning.pytorch.cli import LightningArgumentParser

MAX_LINES = 8  # of the message itself; the whole report stays within about 10 lines
PROJECT = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "callbacks"))


def debug() -> bool:
    return any(os.environ.get(name, "").lower() not in ("", "0", "false", "no")
               for name in ("SDZERO_DEBUG", "JSONARGPARSE_DEBUG"))


# ------------------------------------------------------------------------------------------ exceptions
def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``__cause__``, else an unsuppressed ``__context__``),
    outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _raised_by_project(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PROJECT)


def root_cause(error: BaseException) -> BaseException:
    """The exception the user should read: the innermost one raised by the project's code (it names the flag and
    the value), else the innermost of the chain."""
    chain = exception_chain(error)
    own = [e for e in chain if _raised_by_project(e)]
    return own[-1] if own else chain[-1]


def short_error(error: BaseException) -> str:
    """A few lines: the root cause's type and message, and how to see everything."""
    cause = root_cause(error)
    lines = str(cause).strip().splitlines() or [repr(cause)]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES] + [f"... ({len(lines) - MAX_LINES} more lines: SDZERO_DEBUG=1 shows them)"]
    return "\n".join([f"error ({type(cause).__name__}): {lines[0]}", *lines[1:],
                      "(SDZERO_DEBUG=1 shows the full traceback)"])


@dataclass
class Failure:
    code: int = 0  # 0 while nothing failed
    message: str = ""


@contextlib.contextmanager
def short_errors() -> Iterator[Failure]:
    """Run a command's body; an exception is printed as :func:`short_error` (to stderr) and recorded in the yielded
    :class:`Failure` (``code`` 1) instead of a traceback. Ctrl-C and ``sys.exit`` pass through."""
    failure = Failure()
    try:
        yield failure
    except Exception as error:  # noqa: BLE001 - every failure of a command reaches the user this way
        if debug():
            raise
        failure.code, failure.message = 1, short_error(error)
        sys.stdout.flush()
        print(failure.message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- parsing
DROPPED = re.compile(r"^\s*(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|"
                     r"Expected a <class 'NoneType'>|Given value type:|Given value:|Not a valid subclass)")


def condense_parse_error(message: str, argv: Sequence[str]) -> str:
    """jsonargparse's message for a bad flag or config key, without its union-type dumps: the key, what is wrong
    with it, where it was given (the command-line flag as typed, or the config file and line) and, for a typo, the
    closest accepted names."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    path = ".".join(keys)
    prefix = f"{path}.init_args." if classes and path else (f"{path}." if path else "")
    owner = classes[-1] if classes else None
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not accepted|No action for key \"([^\"]+)\"", message)
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    subcommand = re.search(r"Subcommand '[^']+' does not accept option '([^']+)'", message)
    if unknown or group or subcommand:
        if group:
            name, yaml_key, accepted = group.group(2), f"{prefix}{group.group(1)}.{group.group(2)}", \
                _group_fields(owner, group.group(1))
        elif subcommand:
            yaml_key = subcommand.group(1)
            name, accepted = yaml_key.rsplit(".", 1)[-1], _parameters(_ROOTS.get(yaml_key.split(".")[0]))
        else:
            name = unknown.group(1) or unknown.group(2)
            yaml_key, accepted = f"{prefix}{name}", _parameters(owner)
        close = difflib.get_close_matches(name, accepted, n=3)
        hint = f"; did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""
        return f"{_where(name, yaml_key, argv)} is not an argument{f' of {owner}' if owner else ''}{hint}"
    stray = re.search(r"unrecognized arguments: (\S.*)", message)
    if stray:
        given = [arg for tail in stray.group(1).split() for arg in argv if arg.endswith(tail.lstrip("-"))]
        return f"{', '.join(f'`{arg}`' for arg in given or stray.group(1).split())} (command line): no such argument"
    details = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip().removeprefix("- ").strip())
               for line in message.splitlines() if line.strip() and not DROPPED.match(line)
               and "Problem with given class_path" not in line]
    details = [line for line in details if line]
    detail = details[-1] if details else message.strip().splitlines()[-1]
    typed = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)$", detail)
    if typed:
        detail = f"expected {typed.group(1)}, got {typed.group(2)!r}"
    return f"{_where(keys[-1], path, argv)}: {detail}" if keys else detail


_ROOTS = {"trainer": "lightning.pytorch.Trainer"}  # top-level groups whose arguments are a class's


def _resolve(class_path: str | None):
    if not class_path:
        return None
    module, _, attribute = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(class_path: str | None) -> list[str]:
    target = _resolve(class_path)
    try:
        return list(inspect.signature(target).parameters) if target is not None else []
    except (ValueError, TypeError):
        return []


def _group_fields(class_path: str | None, group: str) -> list[str]:
    """The field names of an argument group (a dataclass argument of ``class_path``)."""
    import dataclasses
    import typing

    target = _resolve(class_path)
    if target is None:
        return []
    hints = typing.get_type_hints(target.__init__)
    group_type = hints.get(group)
    return [f.name for f in dataclasses.fields(group_type)] if dataclasses.is_dataclass(group_type) else []


def _where(name: str, yaml_key: str, argv: Sequence[str]) -> str:
    """How the user gave ``name``: the flag as typed on the command line (it wins over config files), else the
    first --config file and line holding ``name:``, else the flag spelled from its key path."""
    for arg in reversed(argv):
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and re.search(rf"[.-]{re.escape(name)}$", flag):
            return f"`{arg}` (command line)"
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*:")
    for config in configs:
        with contextlib.suppress(OSError):
            for number, line in enumerate(Path(config).read_text().splitlines(), start=1):
                if pattern.match(line):
                    return f"`{yaml_key}` ({config} line {number})"
    return f"`--{yaml_key}`"


class SDZeroParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad flag or config key in a few lines (:func:`condense_parse_error`)."""

    def error(self, message: str, ex: Exception | None = None):
        if debug() or not self.exit_on_error:
            return super().error(message, ex)
        argv = sys.argv[1:] if _ARGV is None else _ARGV
        command = " ".join(["python main.py", *argv[:1]]) if argv and not argv[0].startswith("-") else "python main.py"
        sys.stderr.write(f"error: {condense_parse_error(message, argv)}\n"
                         f"(`{command} --help` lists the arguments; SDZERO_DEBUG=1 shows the parser's full message)\n")
        sys.exit(2)


_ARGV: list[str] | None = None  # the arguments of the CLI call being parsed (tests pass them in)


@contextlib.contextmanager
def parsing(argv: Sequence[str] | None) -> Iterator[None]:
    """Tell :class:`SDZeroParser` which arguments it is parsing (to find the config file of a bad key)."""
    global _ARGV
    saved, _ARGV = _ARGV, (None if argv is None else list(argv))
    try:
        yield
    finally:
        _ARGV = saved


# ------------------------------------------------------------------------------------------------ noise
NOISE = (
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen teacher / reference, by design
    r"Your `IterableDataset` has `__len__` defined",  # RankShard: a fixed list per rank, the length is exact
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, with torch 2.13
    r"LightningCLI's args parameter is intended to run from within Python",  # the pipelines call the CLI in-process
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet() -> None:
    """Silence Lightning's tips and the expected warnings above (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)


# ---------------------------------------------------------------------------------------------- progress
def advance_bar(trainer, stage: str, position: float) -> None:
    """Move the trainer's validation ("val") or test progress bar to ``position`` batches, a fraction inside the
    current one: an evaluation batch generates for minutes, and Lightning's bar only moves between batches. Works
    with Lightning's Rich and TQDM bars; no bar (disabled, a custom one): nothing."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):
        task = bar.val_progress_bar_id if stage == "val" else bar.test_progress_bar_id
        if bar.is_enabled and bar.progress is not None and task is not None:
            bar.progress.update(task, completed=position)
            bar.refresh()
    elif isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        tqdm_bar = bar.val_progress_bar if stage == "val" else bar.test_progress_bar
        if not tqdm_bar.disable:
            tqdm_bar.n = round(position, 2)
            tqdm_bar.refresh()
