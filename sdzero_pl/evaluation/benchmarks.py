"""Benchmark adapters (docs/method.md, "Data and verification": AIME24, AIME25, HMMT25, AMOBench, MATH-500, OpenR1 held-out),
plus any local JSON / JSONL file of questions.

An adapter names where the rows live (hub dataset + config + split, or a file), which columns hold the question,
the reference answer and an id, which rows to keep, and how the reference answer is normalised before
math-verify sees it. The hub names, configs, splits and columns below were checked against the datasets' cards
and loaders as stored offline (``sdzero_pl/data/hub_schemas.json``; ``python -m sdzero_pl.dryrun`` reads an eval
config against them); the live hub can be newer. Every field can be overridden in YAML
(``--data.benchmark_overrides``), e.g.

    benchmark_overrides:
      aime25: {source: yentinglin/aime_2025, split: train, id_field: null}

Choices made against those schemas: AIME25 is ``math-ai/aime25`` (``problem`` / ``answer`` / ``id``, split
``test``): the ``yentinglin/aime_2025`` copy shows no ``id`` column. AMO-Bench's ``answer_type="description"``
answers (11 of 50) are proofs / descriptions that math-verify cannot grade: they are left out of the scores and
reported separately (``ungraded`` in the results), never scored 0; its gold answers may carry a ``\\boxed{}``,
which the ``boxed`` normaliser unwraps. OpenR1's held-out rows are the LAST 500 of default/train, keyed by
``uuid`` (stable whatever the row order); training configs leave them out with ``--data.questions.skip_last=500``.

The code benchmarks of the paper (Codeforces held-out, LiveCodeBench) need a code verifier and are not here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdzero_pl.data.questions import LOCAL_FORMATS, DataError, Question, load_rows, questions_from_rows
from sdzero_pl.tasks import extract_last_boxed


# ------------------------------------------------------------------------------------- answer normalisation
def _strip(answer: str) -> str:
    return answer.strip()


def _integer(answer: str) -> str:
    """AIME answers are integers 0-999; hub copies store them as ints or zero-padded strings ("025")."""
    text = answer.strip().strip("$").strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def _latex(answer: str) -> str:
    """Drop surrounding ``$...$`` / ``\\(...\\)`` delimiters; math-verify reads the bare LaTeX in a box."""
    text = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            return text[len(left) : -len(right)].strip()
    return text


def _boxed(answer: str) -> str:
    """For answer columns that may hold a ``\\boxed{}`` (or a whole solution): its last box's content (the text
    itself if none), without ``$`` delimiters."""
    boxed = extract_last_boxed(answer)
    return _latex(boxed if boxed is not None else answer)


NORMALISERS: dict[str, Callable[[str], str]] = {"strip": _strip, "integer": _integer, "latex": _latex, "boxed": _boxed}


# ------------------------------------------------------------------------------------------------ adapters
@dataclass(frozen=True)
class Benchmark:
    name: str  # key in results tables and metric names
    source: str  # hub dataset id, or a local .json / .jsonl / .parquet file
    config: str | None = None  # hub dataset configuration
    split: str = "train"  # hub split (ignored for local files)
    question_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None  # default: the row number
    normalise: str = "latex"  # one of NORMALISERS
    start: int | None = None  # rows[start:stop] after loading (Python slice, negatives count from the end)
    stop: int | None = None
    type_field: str | None = None  # column holding each answer's kind (AMO-Bench ``answer_type``)
    ungraded_types: tuple[str, ...] = ()  # kinds math-verify cannot grade: left out and counted, never scored 0


# Hub names, splits and columns as the stored schemas show them (sdzero_pl/data/hub_schemas.json).
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", split="train", id_field="id", normalise="integer"),
        Benchmark("aime25", "math-ai/aime25", split="test", id_field="id", normalise="integer"),
        Benchmark("hmmt25", "MathArena/hmmt_feb_2025", split="train", id_field="problem_idx", normalise="latex"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", split="test", id_field="unique_id", normalise="latex"),
        Benchmark("amobench", "meituan-longcat/AMO-Bench", split="test", question_field="prompt",
                  id_field="question_id", normalise="boxed", type_field="answer_type",
                  ungraded_types=("description",)),
        # The paper's OpenR1 held-out set: 500 questions Phase 1 and Phase 2 never see; here the LAST 500 rows.
        Benchmark("openr1", "open-r1/OpenR1-Math-220k", config="default", split="train", id_field="uuid",
                  normalise="latex", start=-500),
    )
}
PAPER_BENCHMARKS = ["aime24", "aime25", "hmmt25", "amobench", "openr1", "math500"]


def resolve_benchmark(entry: str, overrides: dict[str, dict[str, Any]] | None = None) -> Benchmark:
    """A registry name ("aime24") or a local file path, with any YAML overrides of its fields applied.

    A local file is named after its stem (``data/mine.jsonl`` -> ``mine``); overrides are keyed by that name.
    """
    if entry in BENCHMARKS:
        bench = BENCHMARKS[entry]
    elif Path(entry).suffix.lower() in LOCAL_FORMATS:
        if not os.path.isfile(entry):
            raise FileNotFoundError(f"`--data.benchmarks`: local benchmark file {entry!r} does not exist")
        bench = Benchmark(Path(entry).stem, entry, normalise="latex")
    else:
        raise ValueError(
            f"`--data.benchmarks`: {entry!r} is neither a known benchmark {sorted(BENCHMARKS)} nor a "
            f".json / .jsonl / .parquet file"
        )
    change = dict((overrides or {}).get(bench.name, {}))
    unknown = set(change) - {f.name for f in dataclasses.fields(Benchmark)} | ({"name"} & set(change))
    if unknown:
        raise ValueError(f"`--data.benchmark_overrides.{bench.name}`: unknown or fixed fields {sorted(unknown)}")
    if "ungraded_types" in change:
        change["ungraded_types"] = tuple(change["ungraded_types"])
    bench = dataclasses.replace(bench, **change)
    if bench.normalise not in NORMALISERS:
        raise ValueError(f"benchmark {bench.name!r}: `normalise` must be one of {sorted(NORMALISERS)}, "
                         f"got {bench.normalise!r}")
    return bench


def _answer_check(answer: Any) -> str | None:
    """Benchmarks store answers as strings or numbers; anything else is a data error."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"must be a string or a number, got {type(answer).__name__} {answer!r}"
    if isinstance(answer, str) and not answer.strip():
        return "must not be empty"
    return None


@dataclass(frozen=True)
class LoadedBenchmark:
    questions: list[Question]  # the graded questions, sliced, with normalised string answers
    ungraded: int = 0  # rows left out because their answer kind cannot be graded (``ungraded_types``)


def load_benchmark(bench: Benchmark) -> LoadedBenchmark:
    """The adapter's rows (only the columns it names), sliced; rows whose ``type_field`` is one of
    ``ungraded_types`` are counted and left out; the rest become :class:`Question` s with normalised answers."""
    fields = [f for f in (bench.question_field, bench.answer_field, bench.id_field, bench.type_field) if f]
    rows, name = load_rows(bench.source, bench.config, bench.split, columns=fields)
    numbers = list(range(len(rows)))[bench.start : bench.stop]
    if bench.type_field is not None:
        missing = [n + 1 for n in numbers if bench.type_field not in rows[n]]
        if missing:
            raise DataError(f"{name}: row {missing[0]}: missing field {bench.type_field!r}")
    graded = [n for n in numbers if bench.type_field is None or rows[n][bench.type_field] not in bench.ungraded_types]
    questions = questions_from_rows([rows[n] for n in graded], name, bench.question_field, bench.answer_field,
                                    bench.id_field, check_answer=_answer_check, row_numbers=graded)
    normalise = NORMALISERS[bench.normalise]
    normalised = [Question(id=q.id, question=q.question, answer=normalise(_as_text(q.answer))) for q in questions]
    return LoadedBenchmark(normalised, len(numbers) - len(graded))


def _as_text(answer: Any) -> str:
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)
