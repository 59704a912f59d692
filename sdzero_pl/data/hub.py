"""Hub datasets as they really are: their stored schemas, and schema-shaped synthetic rows served as local mirrors.

``hub_schemas.json`` (next to this file) records, for each hub dataset the configs name, its configs, splits and row
counts, its columns and their types, and which columns hold the question, the answer and the id, normalised from
the stored copies of the datasets' cards and loaders (the live hub can be newer; each entry says what was seen and
what was inferred). :class:`MirrorHub` writes a local dataset directory per hub name, laid out as on the hub (a
README whose ``configs`` name the data files, Parquet files with exactly the schema's columns and types) and filled
with synthetic rows, and :func:`~sdzero_pl.data.questions.hub_mirrors` makes the loaders read it through the same
``datasets`` code path: a wrong config, split or column name fails as it would against the hub.

The synthetic rows carry the real row counts (so ``skip_first`` / ``num_questions`` / pool sizes behave as on the
cluster) and content the project's verifiers can grade: math questions "What is a + b?" with the answer, Codeforces
and LiveCodeBench problems "print a + b" with stdin/stdout tests. Each question ends with a marker
(:data:`SOLUTION_MARK`, :data:`PROGRAM_MARK`) a scripted stand-in policy can read (``sdzero_pl.pipelines.standins``).
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdzero_pl.data.questions import DataError

SCHEMAS_FILE = Path(__file__).with_name("hub_schemas.json")
SOLUTION_MARK = "[dry-run solution: {solution}]"  # a worked solution both math verifiers accept
PROGRAM_MARK = "[dry-run program: print a + b]"
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


@dataclass(frozen=True)
class HubSchema:
    """One hub dataset as its stored card shows it (see ``hub_schemas.json``)."""

    name: str
    domain: str  # "math" | "codeforces" | "livecodebench": what the synthetic rows hold
    configs: dict[str, dict[str, int]]  # config -> split -> rows
    default_config: str | None
    columns: dict[str, str]  # column -> type ("string", "int64", "list<...>", "struct{a: T, ...}")
    fields: dict[str, str | None]  # role (question, answer, id, solution, private_tests) -> column
    config_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # per-config changes and extras
    nullable: tuple[str, ...] = ()
    rows_per_id: dict[str, float] = field(default_factory=dict)  # config -> rows per distinct id
    formats: dict[str, str] = field(default_factory=dict)  # string column -> "json_tests" | ... (encoded content)
    categories: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> value -> rows
    boxed_answers: bool = False  # some gold answers carry a \boxed{}
    confidence: str = ""
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def config_for(self, config: str | None) -> str | None:
        """The config ``datasets`` loads for ``config`` (None: the default one, if the dataset has one)."""
        if config is not None:
            return config
        return self.default_config or ("default" if "default" in self.configs else None)

    def column_types(self, config: str) -> dict[str, str]:
        return {**self.columns, **self.config_columns.get(config, {})}

    def split_rows(self, config: str | None, split: str) -> int:
        """Rows of (config, split); a :class:`DataError` naming the choices for an unknown one."""
        name = self.config_for(config)
        if name not in self.configs:
            raise DataError(f"{self.name}: no config {config!r} (configs: {sorted(self.configs)})"
                            if config is not None else f"{self.name}: a config name is required "
                            f"(configs: {sorted(self.configs)})")
        if split not in self.configs[name]:
            raise DataError(f"{self.name}[{name}]: no split {split!r} (splits: {sorted(self.configs[name])})")
        return self.configs[name][split]

    def distinct_ids(self, config: str | None, split: str) -> int:
        """Distinct question ids of (config, split) (rows / ``rows_per_id``)."""
        return int(self.split_rows(config, split) / self.rows_per_id.get(self.config_for(config), 1))


def load_schemas(path: str | Path = SCHEMAS_FILE) -> dict[str, HubSchema]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    schemas = {}
    for name, entry in data.items():
        if name.startswith("_"):
            continue
        entry = dict(entry)
        for key in ("nullable", "notes", "sources"):
            entry[key] = tuple(entry.get(key, ()))
        schemas[name] = HubSchema(name=name, **entry)
    return schemas


# ------------------------------------------------------------------------------------------------------ types
def parse_type(spec: str) -> Any:
    """"string" / "int64" / "float64" / "bool" / "null", ("list", T) or ("struct", [(name, T), ...])."""
    spec = spec.strip()
    if spec.startswith("list<") and spec.endswith(">"):
        return ("list", parse_type(spec[5:-1]))
    if spec.startswith("struct{") and spec.endswith("}"):
        members, depth, start = [], 0, 7
        for i, ch in enumerate(spec[7:-1], start=7):
            depth += ch in "<{"
            depth -= ch in ">}"
            if ch == "," and depth == 0:
                members.append(spec[start:i])
                start = i + 1
        members.append(spec[start:-1])
        return ("struct", [(m.split(":", 1)[0].strip(), parse_type(m.split(":", 1)[1])) for m in members])
    if spec not in ("string", "int64", "float64", "bool", "null"):
        raise ValueError(f"unknown column type {spec!r}")
    return spec


def arrow_type(parsed: Any):
    import pyarrow as pa

    if isinstance(parsed, tuple) and parsed[0] == "list":
        return pa.list_(arrow_type(parsed[1]))
    if isinstance(parsed, tuple):
        return pa.struct([(name, arrow_type(t)) for name, t in parsed[1]])
    return {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
            "null": pa.null()}[parsed]


def filler(parsed: Any, column: str, i: int) -> Any:
    """A value of the type for a column no role gives content to."""
    if isinstance(parsed, tuple) and parsed[0] == "list":
        return [filler(parsed[1], column, i)]
    if isinstance(parsed, tuple):
        return {name: filler(t, name, i) for name, t in parsed[1]}
    return {"string": f"{column} {i}", "int64": i, "float64": float(i), "bool": i % 2 == 0, "null": None}[parsed]


# ------------------------------------------------------------------------------------------------------- rows
def _category(schema: HubSchema, column: str, i: int) -> str:
    """The ``i``-th row's value of a categorical column, spread over the rows in the recorded counts."""
    counts = schema.categories[column]
    cycle = [value for value, n in counts.items() for _ in range(n)]
    return cycle[(i * 7) % len(cycle)]  # 7 is prime to the counts' total: every value keeps its share


def _content(schema: HubSchema, config: str, i: int, j: int) -> dict[str, Any]:
    """The role columns of row ``i`` (question ``j``): question, answer, id, solution, tests."""
    f, a, b = schema.fields, 3 + j % 97, 5 + (7 * j) % 89
    row: dict[str, Any] = {}
    if schema.domain == "math":
        answer = str(a + b)
        row[f["question"]] = f"What is {a} + {b}? " + SOLUTION_MARK.format(solution=math_solution(a, b))
        row[f["answer"]] = f"\\boxed{{{answer}}}" if schema.boxed_answers and j % 3 == 0 else answer
        if f.get("solution"):
            row[f["solution"]] = f"{a} + {b} = {answer}, so the answer is \\boxed{{{answer}}}."
        for column in schema.categories:
            row[column] = _category(schema, column, j)
            if row[column] == "description":  # a proof / construction: nothing math-verify can grade
                row[f["answer"]] = f"Describe every pair (m, n) with m + n = {answer} and explain why."
        return row
    tests = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"}, {"input": f"{b} {j}\n", "output": f"{b + j}\n"}]
    statement = f"You are given two integers a and b. Print a + b. {PROGRAM_MARK}"
    if schema.domain == "codeforces":
        row.update(description=statement, input_format="One line with two integers a and b.",
                   output_format="Print one integer: a + b.", note="" if j % 2 else "The answer fits in 64 bits.",
                   title=f"Sum {j}", time_limit=float(1 + j % 2), memory_limit=256,
                   examples=None if j % 20 == 19 else tests,
                   prompt=("You will be given a competitive programming problem. Please reason step by step "
                           "about the solution, then provide a complete implementation in C++17.\n\n# Problem\n\n"
                           f"{statement}\n\nPut your final solution within a single code block:\n```cpp\n"
                           "<your code here>\n```"))
        if "memory_limit" in schema.config_columns.get(config, {}):
            row["memory_limit"] = 256.0
        row[f["id"]] = f"{1000 + j}/{'ABCDE'[j % 5]}"
        return row
    # livecodebench: public tests as JSON text, private ones as JSON or base64(zlib(pickle(JSON))) text
    functional = j % 4 == 3  # LeetCode-style tests: not stdin/stdout, skipped (counted) by the loader
    kind = "functional" if functional else "stdin"
    public = [{**t, "testtype": kind} for t in tests[:1]]
    private = json.dumps([{**t, "testtype": kind} for t in tests[1:]])
    row.update({f["question"]: statement, f["answer"]: json.dumps(public), f["id"]: f"lcb{j:04d}",
                f["private_tests"]: private if j % 2 else encode_private_tests(private),
                "metadata": json.dumps({"func_name": "solve"} if functional else {}),
                "platform": "leetcode" if functional else ("atcoder", "codeforces")[j % 2],
                "starter_code": "class Solution:\n    def solve(self, a, b):\n" if functional else ""})
    return row


def math_solution(a: int, b: int) -> str:
    """The worked solution of "What is a + b?" in the form the math and the arithmetic verifiers accept."""
    return f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"


def encode_private_tests(text: str) -> str:
    """LiveCodeBench's private-test encoding: base64(zlib(pickle(JSON text)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(text))).decode("ascii")


def synthetic_rows(schema: HubSchema, config: str | None, split: str) -> list[dict]:
    """Every row of (config, split), with the schema's columns and types: role columns hold gradable content
    (module docstring), the others a value of their type; ids repeat ``rows_per_id`` times."""
    name = schema.config_for(config)
    count = schema.split_rows(config, split)
    per_id = schema.rows_per_id.get(name, 1)
    types = {column: parse_type(spec) for column, spec in schema.column_types(name).items()}
    rows = []
    for i in range(count):
        j = int(i / per_id)  # the question this row is a copy of
        content = _content(schema, name, i, j)
        row = {}
        for column, parsed in types.items():
            if column in content:
                row[column] = content[column]
            elif column == schema.fields.get("id"):
                row[column] = j if parsed == "int64" else f"{column}-{j:06d}"
            elif column in schema.nullable and i % 50 == 49:
                row[column] = None
            else:
                row[column] = filler(parsed, column, i)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- mirrors
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name)


def write_mirror(root: str | Path, schema: HubSchema, config: str | None, split: str) -> Path:
    """The mirror directory of ``schema`` under ``root``: a README declaring every config, and the Parquet data of
    (config, split) when the schema has it (written once). An unknown config or split writes no data, so
    ``datasets`` itself refuses it, naming the choices."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(root) / slug(schema.name)
    directory.mkdir(parents=True, exist_ok=True)
    name = schema.config_for(config)
    if not (name in schema.configs and split in schema.configs[name]) and not any(directory.glob("*/*.parquet")):
        # nothing to serve, but ``datasets`` needs one config's files to read the README and refuse by name
        name, split = min(((c, s) for c, splits in schema.configs.items() for s in splits),
                          key=lambda cs: schema.configs[cs[0]][cs[1]])
    if name in schema.configs and split in schema.configs[name]:
        path = directory / slug(name) / f"{slug(split)}-00000-of-00001.parquet"
        if not path.exists():
            types = schema.column_types(name)
            arrow = pa.schema([(column, arrow_type(parse_type(spec))) for column, spec in types.items()])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pylist(synthetic_rows(schema, name, split), schema=arrow), tmp)
            tmp.rename(path)
    written = {p.parent.name for p in directory.glob("*/*.parquet")}
    lines = ["---", "configs:"]
    # configs with data first: ``datasets`` infers the file format from the first config's files
    for name, splits in sorted(schema.configs.items(), key=lambda item: slug(item[0]) not in written):
        lines.append(f"- config_name: {name}")
        if name == schema.default_config:
            lines.append("  default: true")
        lines.append("  data_files:")
        lines += [f"  - split: {s}\n    path: {slug(name)}/{slug(s)}-*.parquet" for s in splits]
    (directory / "README.md").write_text("\n".join(lines) + "\n---\n", encoding="utf-8")
    return directory


class MirrorHub:
    """A resolver for :func:`~sdzero_pl.data.questions.hub_mirrors`: hub names in ``schemas`` are served from
    mirrors written under ``root`` on first use; other names are not mirrored (None). ``served`` records what was
    asked for: (name, config, split) in order."""

    def __init__(self, root: str | Path, schemas: dict[str, HubSchema] | None = None) -> None:
        self.root = Path(root)
        self.schemas = schemas if schemas is not None else load_schemas()
        self.served: list[tuple[str, str | None, str]] = []

    def __call__(self, source: str, config: str | None, split: str) -> str | None:
        if source not in self.schemas:
            return None
        self.served.append((source, config, split))
        return str(write_mirror(self.root, self.schemas[source], config, split))
