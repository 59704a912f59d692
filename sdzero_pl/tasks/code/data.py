"""Code questions (x, a) for the code domain: a = the problem's example tests (docs/method.md, "Data and verification").

Reads ``open-r1/codeforces-cots`` rows (``prompt``, ``examples`` = [{"input", "output"}], ``id``; the default
field names) and LiveCodeBench-style rows (``question_content``, ``public_test_cases`` as a JSON string with a
``testtype`` per test, ``question_id``: pass those field names), from the hub or a local .json / .jsonl / .parquet
file, into the project's :class:`~sdzero_pl.data.questions.Question` with ``answer`` = [{"input": str, "output": str}].

Skipped, counted and logged (never silently): rows without tests (nothing to verify, e.g. interactive problems),
rows with tests other than stdin/stdout (LiveCodeBench's ``functional`` LeetCode tests), and repeated ids
(codeforces-cots holds several generations per problem; the first row of an id is kept). A malformed row raises a
:class:`~sdzero_pl.data.questions.DataError` naming the file, the row (counted from 1) and the field.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sdzero_pl.data.questions import DataError, Question

logger = logging.getLogger(__name__)

STDIN_TEST_TYPES = (None, "stdin")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_code_questions(
    source: str,
    split: str = "train",
    config: str | None = None,
    prompt_field: str = "prompt",
    tests_field: str = "examples",
    id_field: str | None = "id",
) -> list[Question]:
    """Questions whose answer is a list of stdin/stdout tests.

    Args:
        source: hub dataset name (e.g. ``open-r1/codeforces-cots``) or a local .json / .jsonl / .parquet file.
        split: split of a hub dataset (local files have one split).
        config: hub dataset config (codeforces-cots: ``solutions``, ``solutions_py``, ...).
        prompt_field: column with the problem statement x (codeforces-cots ``prompt``, LiveCodeBench
            ``question_content``).
        tests_field: column with the tests: a list of {"input", "output"} objects or a JSON string of one
            (codeforces-cots ``examples``, LiveCodeBench ``public_test_cases``).
        id_field: column with the problem id (LiveCodeBench ``question_id``); None numbers the rows.
    """
    rows, name = _load_table(source, config, split)
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    for field_name in (prompt_field, tests_field, id_field):
        if field_name is not None and field_name not in rows.column_names:
            raise DataError(f"{name}: no column {field_name!r} (columns: {rows.column_names})")
    # Only the columns we read: codeforces-cots also holds long generations that are slow to decode.
    rows = rows.select_columns([f for f in dict.fromkeys((prompt_field, tests_field, id_field)) if f is not None])
    questions: list[Question] = []
    seen: set[str] = set()
    skipped = {"no tests": 0, "non-stdin tests": 0, "repeated id": 0}
    for index, row in enumerate(rows):
        where = f"{name}: row {index + 1}"
        prompt = row[prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field {prompt_field!r} must be a non-empty string, got {prompt!r:.80}")
        qid = str(row[id_field]) if id_field is not None else str(index)
        if id_field is not None and row[id_field] is None:
            raise DataError(f"{where}: field {id_field!r} is empty")
        tests = parse_tests(row[tests_field], f"{where}: field {tests_field!r}")
        if tests is None:
            skipped["non-stdin tests"] += 1
        elif not tests:
            skipped["no tests"] += 1
        elif qid in seen:
            skipped["repeated id"] += 1
        else:
            seen.add(qid)
            questions.append(Question(id=qid, question=prompt, answer=tests))
    if any(skipped.values()):
        logger.info("%s: %d code questions; skipped %s", name, len(questions), skipped)
    return questions


def _load_table(source: str, config: str | None, split: str) -> tuple[Any, str]:
    """A ``datasets.Dataset`` and a readable name for it (the file path, or hub name + config + split)."""
    import datasets

    suffix = Path(source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"dataset file {source!r} does not exist")
        return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=source, split="train"), source
    return datasets.load_dataset(source, config, split=split), f"{source}[{config or 'default'}:{split}]"


def parse_tests(value: Any, where: str) -> list[dict[str, str]] | None:
    """[{"input", "output"}] from a list or a JSON string of one; None if any test is not stdin/stdout.

    Raises :class:`DataError` naming ``where`` for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: must be a list of {{'input', 'output'}} objects, got {type(value).__name__}")
    tests = []
    for k, test in enumerate(value):
        if not isinstance(test, dict):
            raise DataError(f"{where}: test {k} must be an object, got {type(test).__name__}")
        if test.get("testtype") not in STDIN_TEST_TYPES:
            return None
        for key in ("input", "output"):
            if not isinstance(test.get(key), str):
                raise DataError(f"{where}: test {k} needs a string {key!r}, got {test.get(key)!r:.80}")
        tests.append({"input": test["input"], "output": test["output"]})
    return tests
