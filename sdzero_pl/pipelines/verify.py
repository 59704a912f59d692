"""Check a dataset's rows with the project's verifiers, the same code the training reward runs.

    python -m sdzero_pl.verify math ROWS.jsonl > scored.jsonl
    python -m sdzero_pl.verify code ROWS.jsonl > scored.jsonl

Each input line is a JSON object ``{"completion": ..., "answer": ...}`` (code: ``{"completion": ..., "tests":
[{"input": ..., "output": ...}, ...]}`` and an optional ``"language"`` that overrides the code fence's); each is
written back to stdout with a ``"reward"`` field (0 or 1). Rows whose reference cannot be used get
``"reward": 0`` and a ``"reward_error"``; a summary goes to stderr. A malformed row stops the run with an error
naming its line number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from sdzero_pl.tasks import MathReward, RewardBatch, Verifier
from sdzero_pl.tasks.code.reward import LANGUAGES, CodeReward, check_tests


class RowError(ValueError):
    pass


def read_rows(path: Path, required: dict[str, type | tuple[type, ...]]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) from a JSONL file, checking that each row has the required fields and types."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RowError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise RowError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for name, kind in required.items():
                if name not in row:
                    raise RowError(f"{path}:{line_number}: missing field {name!r}")
                if not isinstance(row[name], kind):
                    raise RowError(
                        f"{path}:{line_number}: field {name!r} must be {_kind_name(kind)}, "
                        f"got {type(row[name]).__name__}"
                    )
            yield line_number, row


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def score_file(
    path: Path,
    verifier: Verifier,
    required: dict[str, Any],
    answer_of: Callable[[dict], Any],
    out=sys.stdout,
    batch_size: int = 64,
) -> dict[str, int]:
    """Score every row of ``path`` in batches; write rows with ``reward`` to ``out``; return counts."""
    counts = {"rows": 0, "correct": 0, "skipped": 0, "timeouts": 0}
    batch: list[dict] = []

    def flush() -> None:
        result: RewardBatch = verifier([r["completion"] for r in batch], [answer_of(r) for r in batch])
        for row, reward, error in zip(batch, result.rewards, result.errors):
            row["reward"] = int(reward or 0)
            if reward is None or (error and "longer than" in error):
                row["reward_error"] = error
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["correct"] += row["reward"]
        counts["rows"] += len(batch)
        counts["skipped"] += result.skipped
        counts["timeouts"] += result.timeouts
        batch.clear()

    for _, row in read_rows(path, required):
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return counts


def _math(args: argparse.Namespace) -> dict[str, int]:
    verifier = MathReward(timeout_s=args.timeout)
    try:
        return score_file(args.rows, verifier, {"completion": str, "answer": str}, lambda r: r["answer"])
    finally:
        verifier.close()


def _code(args: argparse.Namespace) -> dict[str, int]:
    required = {"completion": str, "tests": list}
    for line_number, row in read_rows(args.rows, required):  # a first pass, so errors name the line
        try:
            check_tests(row["tests"], f"{args.rows}:{line_number}: field 'tests'")
        except TypeError as err:
            raise RowError(str(err)) from None
        language = row.get("language")
        if language is not None and (not isinstance(language, str) or language.lower() not in LANGUAGES):
            known = sorted(k for k in LANGUAGES if k)
            raise RowError(f"{args.rows}:{line_number}: field 'language' must be one of {known}, got {language!r}")
    verifier = CodeReward(time_limit_s=args.time_limit, num_workers=args.workers, memory_mb=args.memory_mb)
    print(verifier.protections.summary(), file=sys.stderr)

    def with_language(completions: list[str], answers: list[tuple[list, str | None]]) -> RewardBatch:
        return verifier(completions, [tests for tests, _ in answers], [language for _, language in answers])

    try:
        return score_file(args.rows, with_language, required, lambda r: (r["tests"], r.get("language")))
    finally:
        verifier.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.verify", description=__doc__.split("\n\n")[0])
    domains = parser.add_subparsers(dest="domain", required=True)
    math = domains.add_parser("math", help='rows {"completion": str, "answer": str}; last \\boxed{} is graded')
    math.add_argument("rows", type=Path, help="JSONL file of rows")
    math.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    math.set_defaults(run=_math)
    code = domains.add_parser("code", help='rows {"completion": str, "tests": [{"input", "output"}]}; last code block')
    code.add_argument("rows", type=Path, help="JSONL file of rows")
    code.add_argument("--time-limit", type=float, default=2.0, help="wall-clock seconds per test (default 2)")
    code.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")
    code.add_argument("--workers", type=int, default=4, help="programs verified at once (default 4)")
    code.set_defaults(run=_code)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.rows.is_file():
        print(f"error: {args.rows}: no such file", file=sys.stderr)
        return 2
    try:
        counts = args.run(args)
    except RowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{counts['rows']} rows, {counts['correct']} correct, {counts['skipped']} with an unusable reference, "
        f"{counts['timeouts']} timed out",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
