"""Code questions (x, a) for the code domain: a = the problem's example tests (docs/method.md, "Data and verification").

Reads ``open-r1/codeforces-cots`` rows (``prompt``, ``examples`` = [{"input", "output"}], ``id``; the default
field names) and LiveCodeBench-style rows (``question_content``, ``public_test_cases`` as a JSON string with a
``testtype`` per test, ``question_id``: pass those field names), from the hub or a local .json / .jsonl / .parquet
file, into the project's :class:`~sdzero_pl.data.questions.Question` with ``answer`` = [{"input": str, "output": str}].
Only the columns used are read (codeforces-cots rows also hold R1's long generations).

The question text x: the ``prompt_field`` column as it is (``statement="column"``), or, for codeforces-cots
(``statement="codeforces"``), the bare problem statement rebuilt from its ``title``, ``time_limit``,
``memory_limit``, ``description``, ``input_format``, ``output_format``, ``examples`` and ``note`` columns
(:func:`codeforces_statement`): codeforces-cots' ``prompt`` is the whole prompt sent to R1, its own instructions
included, so the project's instruction would land on top of R1's. LiveCodeBench's private tests
(``private_tests_field``) are JSON or ``base64(zlib(pickle(JSON)))``; both are decoded (:func:`decode_tests`, with
an unpickler that refuses every object but text) and added to the public ones.

Skipped, counted and logged (never silently): rows without tests (nothing to verify, e.g. interactive problems),
rows with tests other than stdin/stdout (LiveCodeBench's ``functional`` LeetCode tests), and repeated ids
(codeforces-cots holds several generations per problem; the first row of an id is kept). A malformed row raises a
:class:`~sdzero_pl.data.questions.DataError` naming the file, the row (counted from 1) and the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import pickle
import zlib
from typing import Any

from sdzero_pl.data.questions import DataError, Question, load_rows

logger = logging.getLogger(__name__)

STDIN_TEST_TYPES = (None, "stdin")
STATEMENTS = ("column", "codeforces")
CODEFORCES_FIELDS = ("title", "time_limit", "memory_limit", "description", "input_format", "output_format", "note")


def load_code_questions(
    source: str,
    split: str = "train",
    config: str | None = None,
    prompt_field: str = "prompt",
    tests_field: str = "examples",
    id_field: str | None = "id",
    statement: str = "column",
    private_tests_field: str | None = None,
) -> list[Question]:
    """Questions whose answer is a list of stdin/stdout tests.

    Args:
        source: hub dataset name (e.g. ``open-r1/codeforces-cots``) or a local .json / .jsonl / .parquet file.
        split: split of a hub dataset (local files have one split).
        config: hub dataset config (codeforces-cots: ``solutions``, ``solutions_py``, ...; LiveCodeBench:
            ``release_v5``, ``v5_v6``, ...).
        prompt_field: column with the problem statement x (codeforces-cots ``prompt``, LiveCodeBench
            ``question_content``); unused with ``statement="codeforces"``.
        tests_field: column with the tests: a list of {"input", "output"} objects or a JSON string of one
            (codeforces-cots ``examples``, LiveCodeBench ``public_test_cases``).
        id_field: column with the problem id (LiveCodeBench ``question_id``); None numbers the rows.
        statement: "column" (x = ``prompt_field``) or "codeforces" (x rebuilt from the statement columns).
        private_tests_field: a second tests column added to ``tests_field``'s (LiveCodeBench
            ``private_test_cases``, JSON or base64+zlib+pickle); None: only ``tests_field``'s tests.
    """
    if statement not in STATEMENTS:
        raise ValueError(f"`statement` must be one of {STATEMENTS}, got {statement!r}")
    text_fields = (*CODEFORCES_FIELDS, "examples") if statement == "codeforces" else (prompt_field,)
    wanted = [f for f in dict.fromkeys((*text_fields, tests_field, private_tests_field, id_field)) if f is not None]
    rows, name = load_rows(source, config, split, columns=wanted)
    present = set().union(*(row.keys() for row in rows)) if rows else set(wanted)
    for field_name in wanted:  # local JSON rows come whole: a column no row has is named here
        if field_name not in present:
            raise DataError(f"{name}: no column {field_name!r} (columns: {sorted(present)})")
    questions: list[Question] = []
    seen: set[str] = set()
    skipped = {"no tests": 0, "non-stdin tests": 0, "repeated id": 0}
    for index, row in enumerate(rows):
        where = f"{name}: row {index + 1}"
        prompt = codeforces_statement(row, where) if statement == "codeforces" else row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field {prompt_field!r} must be a non-empty string, got {prompt!r:.80}")
        qid = str(row.get(id_field)) if id_field is not None else str(index)
        if id_field is not None and row.get(id_field) is None:
            raise DataError(f"{where}: field {id_field!r} is empty")
        tests = parse_tests(row.get(tests_field), f"{where}: field {tests_field!r}")
        if private_tests_field is not None and tests is not None:
            private = parse_tests(decode_tests(row.get(private_tests_field), f"{where}: field {private_tests_field!r}"),
                                  f"{where}: field {private_tests_field!r}")
            tests = None if private is None else tests + private
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


def codeforces_statement(row: dict, where: str) -> str:
    """The bare problem statement of a codeforces-cots / open-r1/codeforces row, in the layout of the prompt R1 was
    given (limits, statement, input and output format, examples, note) but without R1's instructions."""
    description = row.get("description")
    if not isinstance(description, str) or not description.strip():
        raise DataError(f"{where}: field 'description' must be a non-empty string, got {description!r:.80}")
    parts = [f"# {row['title']}" if row.get("title") else "# Problem"]
    limits = []
    if row.get("time_limit") is not None:
        limits.append(f"Time limit per test: {row['time_limit']:g} seconds")
    if row.get("memory_limit") is not None:
        limits.append(f"Memory limit per test: {row['memory_limit']:g} megabytes")
    parts += ["\n".join(limits)] if limits else []
    parts.append(description.strip())
    for field_name, title in (("input_format", "Input Format"), ("output_format", "Output Format")):
        if isinstance(row.get(field_name), str) and row[field_name].strip():
            parts.append(f"## {title}\n{row[field_name].strip()}")
    examples = row.get("examples") or []
    if examples:
        blocks = [f"```input\n{e['input'].rstrip()}\n```\n```output\n{e['output'].rstrip()}\n```" for e in examples]
        parts.append("## Examples\n" + "\n".join(blocks))
    if isinstance(row.get("note"), str) and row["note"].strip():
        parts.append(f"## Note\n{row['note'].strip()}")
    return "\n\n".join(parts)


class _TextOnlyUnpickler(pickle.Unpickler):
    """LiveCodeBench pickles a JSON string; anything that would build an object is refused (untrusted data)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only text is expected")


def decode_tests(value: Any, where: str) -> Any:
    """A tests value as :func:`parse_tests` reads it: JSON text stays as it is; ``base64(zlib(pickle(JSON)))``
    (LiveCodeBench's private tests) is decoded to its JSON text. Anything else raises :class:`DataError`."""
    if not isinstance(value, str) or not value.strip() or value.lstrip().startswith(("[", "{")):
        return value
    try:
        text = _TextOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value.strip(), validate=True)))).load()
    except (binascii.Error, zlib.error, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"{where}: neither JSON nor base64(zlib(pickle)) ({error})") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the decoded value is {type(text).__name__}, expected JSON text")
    return text


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
