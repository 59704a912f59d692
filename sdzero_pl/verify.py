"""Check a dataset's rows with the project's verifiers, the same code the training reward runs.

    python -m sdzero_pl.verify math ROWS.jsonl > scored.jsonl

Each input line is a JSON object ``{"completion": ..., "answer": ...}``; each is written back to stdout with a
``"reward"`` field (0 or 1). Rows whose reference cannot be used get ``"reward": 0`` and a ``"reward_error"``;
a summary goes to stderr. A malformed row stops the run with an error naming its line number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from sdzero_pl.rewards import MathReward, RewardBatch, Verifier


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.verify", description=__doc__.split("\n\n")[0])
    domains = parser.add_subparsers(dest="domain", required=True)
    math = domains.add_parser("math", help='rows {"completion": str, "answer": str}; last \\boxed{} is graded')
    math.add_argument("rows", type=Path, help="JSONL file of rows")
    math.add_argument("--timeout", type=float, default=5.0, help="seconds per check (default 5)")
    math.set_defaults(run=_math)
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
