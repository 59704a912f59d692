"""Hub data as it really is: the stored schemas, schema-shaped rows served through the same ``datasets`` path, only
the needed columns read, stable ids, wrong names named, held-out rows and question pools checked."""

from __future__ import annotations

import pytest

from sdzero_pl.data.batching import check_question_pool
from sdzero_pl.data.hub import MirrorHub, load_schemas, parse_type, synthetic_rows
from sdzero_pl.data.questions import DataError, Question, QuestionSource, hub_mirrors, load_questions, load_rows

SCHEMAS = load_schemas()
OPENR1 = "open-r1/OpenR1-Math-220k"


@pytest.fixture(scope="module")
def hub(dryrun_workdir):
    return MirrorHub(dryrun_workdir / "hub")


def test_every_schema_names_its_roles_among_its_columns_and_parses():
    assert {OPENR1, "open-r1/codeforces-cots", "math-ai/aime25", "meituan-longcat/AMO-Bench",
            "livecodebench/code_generation_lite"} <= set(SCHEMAS)
    for schema in SCHEMAS.values():
        for config in schema.configs:
            columns = schema.column_types(config)
            for spec in columns.values():
                parse_type(spec)
            for role, column in schema.fields.items():
                assert column is None or column in columns, (schema.name, role, column)


@pytest.mark.parametrize("name", ["HuggingFaceH4/aime_2024", "meituan-longcat/AMO-Bench", "open-r1/codeforces-cots"])
def test_synthetic_rows_carry_the_schema_columns_and_row_count(name):
    schema = SCHEMAS[name]
    config = schema.config_for(None) or "solutions"
    split = next(iter(schema.configs[config]))
    rows = synthetic_rows(schema, config, split)
    assert len(rows) == schema.configs[config][split]
    assert all(set(row) == set(schema.column_types(config)) for row in rows[:50])


def test_openr1_reads_only_the_columns_it_needs_and_ids_are_its_uuids(hub):
    with hub_mirrors(hub):
        rows, name = load_rows(OPENR1, "default", "train", columns=["problem", "answer", "uuid"])
        questions = load_questions(OPENR1, "default", "train", id_field="uuid")
    assert name == "open-r1/OpenR1-Math-220k[default:train]" and len(rows) == 93733
    assert set(rows[0]) == {"problem", "answer", "uuid"}  # not the R1 generations
    assert [q.id for q in questions[:3]] == [r["uuid"] for r in rows[:3]] and len({q.id for q in questions}) == 93733


@pytest.mark.parametrize("config, split, columns, message", [
    ("nope", "train", None, "BuilderConfig 'nope' not found"),
    ("default", "test", None, "Unknown split"),
    ("default", "train", ["problem", "id"], "no column 'id'"),
])
def test_wrong_config_split_or_column_fails_as_on_the_hub(hub, config, split, columns, message):
    with hub_mirrors(hub), pytest.raises(ValueError, match=message):
        load_rows(OPENR1, config, split, columns=columns or ["problem"])


def test_a_dataset_without_a_default_config_asks_for_one(hub):
    with hub_mirrors(hub), pytest.raises(DataError, match="(?s)Config name is missing.*dataset_config"):
        load_rows("open-r1/codeforces-cots", None, "train", columns=["id"])


def test_skip_last_leaves_out_the_held_out_tail():
    questions = [Question(str(i), f"q{i}", "1") for i in range(10)]
    source = QuestionSource("x.jsonl", skip_first=2, skip_last=3)
    assert [q.id for q in source.select(questions, seed=0)] == ["2", "3", "4", "5", "6"]
    with pytest.raises(ValueError, match="skip_last"):
        QuestionSource("x.jsonl", skip_last=-1)


def test_a_run_that_would_cycle_through_its_pool_fails_with_the_numbers():
    with pytest.raises(ValueError, match=r"4,082 questions left .*31 epochs x .*128 = 3,968|needs 70 epochs") as err:
        check_question_pool(4082, 128, 70, "open-r1/codeforces-cots[solutions:train]", "9,082 in the dataset", False)
    assert "8,960 new questions" in str(err.value) and "reuse_questions" in str(err.value)
    check_question_pool(4082, 128, 31, "x", "why", False)  # 3,968 fit
    check_question_pool(10, 128, 70, "x", "why", True)  # reuse asked for
    check_question_pool(10, 128, None, "x", "why", False)  # unbounded run: nothing to compare with
