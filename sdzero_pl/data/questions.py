"""Questions (x, a) from HF ``datasets``: a hub name (+ config, split) or a local JSON / JSONL / Parquet file.

:class:`QuestionSource` is the argument group every training data module takes (``--data.questions.*``): where the
rows are, which columns hold what, which rows to use and how a question is shown to the model. The verifier of the
task reads the rows (a domain owns its data format: ``sdzero_pl.tasks``); :meth:`QuestionSource.select` then picks
the rows a run uses. Every row is checked when loaded; a bad one raises an error that names the file, the row
(counted from 1) and the field, before any model weights load.

Hub datasets are read column by column: only the columns a run uses are loaded (OpenR1-Math's rows also carry
about 5 GB of R1 generations). :func:`hub_mirrors` points hub names at local dataset directories for a block of
code (the dry run's schema-shaped stand-ins, ``sdzero_pl.pipelines.dryrun``), read by the same ``datasets`` code
path, so a wrong config, split or column name fails there as it would against the hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# (hub name, config, split) -> a local dataset directory or None (the hub), while :func:`hub_mirrors` is active
_HUB_MIRRORS: list[Callable[[str, str | None, str], str | None]] = []


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the raw text of x, before the chat template
    answer: Any  # the reference a (math: a string); never shown to the model
    solution: str | None = None  # a reference solution (SDFT's demonstration); only the SDFT teacher sees it


class DataError(ValueError):
    """A data row or file the project cannot use; the message names the file, row and field."""


@dataclass(frozen=True)
class QuestionSource:
    """Which questions a data module uses and how each is shown to the model (``--data.questions.*``)."""

    dataset: str
    """hub dataset name, or a local .json / .jsonl / .parquet file of questions."""
    dataset_config: str | None = None
    """hub dataset configuration name."""
    split: str = "train"
    """hub dataset split (local files have one)."""
    question_field: str | None = None
    """column holding the question text x; null: the verifier's default (math "problem", code "prompt")."""
    answer_field: str | None = None
    """column holding the reference a; null: the verifier's default (math "answer", code "examples")."""
    id_field: str | None = None
    """column holding a unique question id; null: the verifier's default (math: the row number, code "id")."""
    solution_field: str | None = None
    """column holding a reference solution per question (only the SDFT teacher reads it)."""
    instruction: str = ""
    """text appended to every question (e.g. "Put your final answer within \\boxed{}.")."""
    system_prompt: str | None = None
    """optional system message of the chat."""
    chat_template_kwargs: dict[str, Any] | None = None
    """extra keyword arguments of the tokenizer's chat template when x is rendered, e.g. ``{enable_thinking:
    false}`` for hybrid-thinking models (Qwen3-4B / -8B; the paper uses non-thinking mode); null: none."""
    skip_first: int = 0
    """leave out the first N rows (e.g. the ones Phase 1 used)."""
    skip_last: int = 0
    """leave out the last N rows (e.g. a held-out benchmark cut from the same split: the ``openr1`` benchmark is
    the last 500 rows of OpenR1-Math default/train)."""
    exclude_ids_file: str | None = None
    """leave out the question ids listed in this file (JSON list or one id per line)."""
    num_questions: int | None = None
    """use only the first N questions left after ``skip_first`` and the exclusions; null = all."""
    shuffle: bool = False
    """shuffle the questions used, once, with the data module's ``seed``."""

    def __post_init__(self) -> None:
        if self.skip_first < 0:
            raise ValueError(f"`--data.questions.skip_first` must be >= 0, got {self.skip_first}")
        if self.skip_last < 0:
            raise ValueError(f"`--data.questions.skip_last` must be >= 0, got {self.skip_last}")
        if self.num_questions is not None and self.num_questions < 0:
            raise ValueError(f"`--data.questions.num_questions` must be >= 0 or null, got {self.num_questions}")

    @property
    def name(self) -> str:
        """The file path, or ``hub name[config:split]``: how messages name this dataset."""
        if Path(self.dataset).suffix.lower() in LOCAL_FORMATS:
            return self.dataset
        return f"{self.dataset}[{self.dataset_config or 'default'}:{self.split}]"

    def text(self, question: "Question") -> str:
        """The user turn of x: the question with the instruction appended (before the chat template)."""
        return question.question + self.instruction

    def select(self, questions: Sequence["Question"], seed: int, exclude_ids: Iterable[str] = ()) -> list["Question"]:
        """The questions a run uses: skip the first ``skip_first`` and the last ``skip_last``, drop excluded ids
        (``exclude_ids_file`` and ``exclude_ids``), keep the first ``num_questions``, shuffle once with ``seed`` if
        asked."""
        excluded = set(exclude_ids) | (read_id_file(self.exclude_ids_file) if self.exclude_ids_file else set())
        kept = questions[: max(len(questions) - self.skip_last, 0)]
        chosen = select_questions(kept, self.skip_first, excluded)[: self.num_questions]
        if self.shuffle:
            random.Random(seed).shuffle(chosen)
        return chosen


def load_rows(source: str, config: str | None = None, split: str = "train",
              columns: Sequence[str] | None = None) -> tuple[list[dict], str]:
    """The rows of a dataset as dicts, and a human-readable name for it (the file path, or hub name + split).

    Local JSON / JSONL are read with the ``json`` module, so values keep their exact types (Arrow's type
    inference would turn an answer "1" into the integer 1 when another row holds an integer); Parquet and hub
    datasets go through ``datasets`` and, with ``columns``, load only those columns (a column the data does not
    have is a :class:`DataError` that names it and the columns there are). JSON rows are returned whole. A dataset
    without rows is a :class:`DataError` too.
    """
    rows, name = _rows_and_name(source, config, split, columns)
    if not rows:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    return rows, name


def _rows_and_name(source: str, config: str | None, split: str, columns: Sequence[str] | None
                   ) -> tuple[list[dict], str]:
    suffix = Path(source).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"dataset file {source!r} does not exist")
        if suffix == ".parquet":
            return _load_with_datasets(source, "parquet", {"data_files": source, "split": "train"}, columns), source
        return _read_json_rows(source), source
    name = f"{source}[{config or 'default'}:{split}]"
    mirror = _HUB_MIRRORS[-1](source, config, split) if _HUB_MIRRORS else None
    kwargs = {"name": config, "split": split, **({"cache_dir": os.path.join(mirror, ".cache")} if mirror else {})}
    return _load_with_datasets(name, mirror or source, kwargs, columns), name


def _load_with_datasets(name: str, path: str, kwargs: dict, columns: Sequence[str] | None) -> list[dict]:
    import datasets

    wanted = list(dict.fromkeys(columns)) if columns is not None else None
    try:
        table = datasets.load_dataset(path, **kwargs, **({"columns": wanted} if wanted is not None else {}))
    except ValueError as error:
        if kwargs.get("name", "") is not None or wanted is None or "data_files=None" not in str(error):
            raise
        # no config given, and the dataset has no default one: `columns` hides datasets' own message; get it
        builder_kwargs = {k: v for k, v in kwargs.items() if k == "cache_dir"}
        try:
            datasets.load_dataset_builder(path, **builder_kwargs)
        except ValueError as missing:
            raise DataError(f"{name}: {missing} (`--data.questions.dataset_config`)") from None
        raise
    except datasets.exceptions.DatasetGenerationError as error:
        missing = re.search(r"No match for FieldRef\.Name\((.*?)\)", str(error.__cause__ or error.__context__))
        if missing is None:
            raise
        raise DataError(f"{name}: no column {missing.group(1)!r} (asked for {wanted}; the data holds: "
                        f"{_schema_names(str(error.__cause__ or error.__context__))})") from None
    return table.to_list()


def _schema_names(arrow_message: str) -> list[str]:
    """Column names from pyarrow's "No match for FieldRef" message (it prints the file's schema, one per line)."""
    names = re.findall(r"(?:^| in )(\w+): ", arrow_message, re.MULTILINE)
    return [n for n in dict.fromkeys(names) if not n.startswith("__")]


@contextlib.contextmanager
def hub_mirrors(mirrors: Mapping[str, str] | Callable[[str, str | None, str], str | None]) -> Iterator[None]:
    """Within the block, hub datasets are read from local dataset directories laid out as on the hub (a README with
    ``configs`` + data files) through the same ``datasets`` code path: ``mirrors`` maps hub names to directories,
    or is a function (name, config, split) -> directory, or None for the real hub
    (:class:`sdzero_pl.data.hub.MirrorHub`)."""
    resolve = mirrors if callable(mirrors) else (lambda source, config, split: mirrors.get(source))
    _HUB_MIRRORS.append(resolve)
    try:
        yield
    finally:
        _HUB_MIRRORS.remove(resolve)


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
    non-empty string per row too (the reference solution, :attr:`Question.solution`). Only those columns are read."""
    fields = [f for f in (question_field, answer_field, id_field, solution_field) if f is not None]
    rows, name = load_rows(source, config, split, columns=fields)
    return questions_from_rows(rows, name, question_field, answer_field, id_field, check_answer, solution_field)


def questions_from_rows(
    rows: Sequence[dict],
    name: str,
    question_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    check_answer: Callable[[Any], str | None] | None = None,
    solution_field: str | None = None,
    row_numbers: Sequence[int] | None = None,
) -> list[Question]:
    """:func:`load_questions` on rows already read (``name`` names them in errors). ``row_numbers``: each row's
    position in the dataset (errors and row-number ids use it), when ``rows`` is a subset."""
    check = check_answer or _string_answer
    questions = []
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index
        where = f"{name}: row {number + 1}"
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
        qid = str(row[id_field]) if id_field is not None else str(number)
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
        raise ValueError(f"`--data.questions.skip_first` must be >= 0, got {skip_first}")
    exclude_ids = exclude_ids or set()
    return [q for q in questions[skip_first:] if q.id not in exclude_ids]


def epoch_questions(questions: Sequence[Question], epoch: int, per_epoch: int) -> list[Question]:
    """The questions of one epoch of on-policy training (all ranks): the next ``per_epoch`` after the previous
    epochs', wrapping around the pool. The epoch number alone fixes the data position (resume needs nothing else)."""
    n, start = len(questions), epoch * per_epoch
    return [questions[(start + i) % n] for i in range(per_epoch)]
