"""Questions (x, a) from HF ``datasets``: a hub name (+ config, split) or a local JSON / JSONL / Parquet file.

Every row is checked when loaded; a bad one raises an error that names the file, the row (counted from 1) and
the field, before any generation runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the raw text of x, before the chat template
    answer: Any  # the reference a (math: a string); never shown to the model
    solution: str | None = None  # a reference solution (SDFT's demonstration); only the SDFT teacher sees it


class DataError(ValueError):
    """A data row or file the project cannot use; the message names the file, row and field."""


def load_rows(source: str, config: str | None = None, split: str = "train") -> tuple[list[dict], str]:
    """The rows of a dataset as dicts, and a human-readable name for it (the file path, or hub name + split).

    Local JSON / JSONL are read with the ``json`` module, so values keep their exact types (Arrow's type
    inference would turn an answer "1" into the integer 1 when another row holds an integer); Parquet and hub
    datasets go through ``datasets``.
    """
    suffix = Path(source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"dataset file {source!r} does not exist")
        if suffix == ".parquet":
            import datasets

            return list(datasets.load_dataset("parquet", data_files=source, split="train")), source
        return _read_json_rows(source), source
    import datasets

    return list(datasets.load_dataset(source, config, split=split)), f"{source}[{config or 'default'}:{split}]"


def _read_json_rows(path: str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_number}: not valid JSON ({err.msg})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index + 1}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_questions(
    source: str,
    config: str | None = None,
    split: str = "train",
    question_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    check_answer: Callable[[Any], str | None] | None = None,
    solution_field: str | None = None,
) -> list[Question]:
    """All rows of ``source`` as :class:`Question` s, validated. ``check_answer`` returns an error text or None;
    by default the answer must be a non-empty string (math). With ``solution_field``, that column must hold a
    non-empty string per row too (the reference solution, :attr:`Question.solution`)."""
    rows, name = load_rows(source, config, split)
    check = check_answer or _string_answer
    questions = []
    for index, row in enumerate(rows):
        where = f"{name}: row {index + 1}"
        for field_name in (question_field, answer_field, id_field, solution_field):
            if field_name is not None and field_name not in row:
                raise DataError(f"{where}: missing field {field_name!r} (fields: {sorted(row)})")
        text = row[question_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field {question_field!r} must be a non-empty string, got {text!r}")
        problem = check(row[answer_field])
        if problem:
            raise DataError(f"{where}: field {answer_field!r} {problem}")
        solution = row[solution_field] if solution_field is not None else None
        if solution_field is not None and (not isinstance(solution, str) or not solution.strip()):
            raise DataError(f"{where}: field {solution_field!r} must be a non-empty string, got {solution!r:.80}")
        qid = str(row[id_field]) if id_field is not None else str(index)
        questions.append(Question(id=qid, question=text, answer=row[answer_field], solution=solution))
    if id_field is not None and len({q.id for q in questions}) != len(questions):
        raise DataError(f"{name}: column {id_field!r} holds duplicate ids")
    return questions


def _string_answer(answer: Any) -> str | None:
    if not isinstance(answer, str):
        return f"must be a string, got {type(answer).__name__} {answer!r}"
    if not answer.strip():
        return "must not be empty"
    return None


def read_id_file(path: str) -> set[str]:
    """Question ids from a JSON list or a file with one id per line (Phase 1 writes one of these)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"id file {path!r} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        ids = json.loads(text)
        if not isinstance(ids, list):
            raise DataError(f"{path}: expected a JSON list of ids")
        return {str(i) for i in ids}
    return {line.strip() for line in text.splitlines() if line.strip()}


def select_questions(
    questions: Sequence[Question], skip_first: int = 0, exclude_ids: set[str] | None = None
) -> list[Question]:
    """Questions left after reserving the first ``skip_first`` rows and any excluded ids (Phase 1's share)."""
    if skip_first < 0:
        raise ValueError(f"`skip_first` must be >= 0, got {skip_first}")
    exclude_ids = exclude_ids or set()
    return [q for q in questions[skip_first:] if q.id not in exclude_ids]


def epoch_questions(questions: Sequence[Question], epoch: int, per_epoch: int) -> list[Question]:
    """The questions of one epoch of on-policy training (all ranks): the next ``per_epoch`` after the previous
    epochs', wrapping around the pool. The epoch number alone fixes the data position (resume needs nothing else)."""
    n, start = len(questions), epoch * per_epoch
    return [questions[(start + i) % n] for i in range(per_epoch)]
