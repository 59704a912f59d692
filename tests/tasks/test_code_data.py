"""Code questions from codeforces-cots and LiveCodeBench-style rows: field mapping, skips counted, bad rows named."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sdzero_pl.data.questions import DataError, Question, QuestionSource  # noqa: E402
from sdzero_pl.tasks.code.data import load_code_questions, parse_tests  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "code"


def test_codeforces_cots_rows_map_to_questions_with_tests(caplog):
    with caplog.at_level(logging.INFO, logger="sdzero_pl.tasks.code.data"):
        questions = load_code_questions(str(FIXTURES / "codeforces_cots.jsonl"))
    assert [q.id for q in questions] == ["4/A", "1/A"]  # the repeated 4/A and the test-less problem are skipped
    assert all(isinstance(q, Question) for q in questions)
    assert questions[0].question.startswith("Pete and Billy")
    assert questions[0].answer == [{"input": "8\n", "output": "YES\n"}, {"input": "2\n", "output": "NO\n"}]
    assert "'no tests': 1" in caplog.text and "'repeated id': 1" in caplog.text


def test_livecodebench_rows_with_json_tests_and_functional_ones_skipped():
    questions = load_code_questions(
        str(FIXTURES / "livecodebench.jsonl"),
        prompt_field="question_content",
        tests_field="public_test_cases",
        id_field="question_id",
    )
    assert [q.id for q in questions] == ["abc301_a", "abc302_b"]
    assert questions[0].answer == [{"input": "5\nTTAAT\n", "output": "T\n"}, {"input": "1\nA\n", "output": "A\n"}]


def test_parquet_files_load_like_jsonl(tmp_path):
    import datasets

    path = tmp_path / "cf.parquet"
    datasets.load_dataset("json", data_files=str(FIXTURES / "codeforces_cots.jsonl"), split="train").to_parquet(path)
    assert load_code_questions(str(path)) == load_code_questions(str(FIXTURES / "codeforces_cots.jsonl"))


def test_bad_row_error_names_file_row_and_field():
    with pytest.raises(DataError) as err:
        load_code_questions(str(FIXTURES / "bad_tests.jsonl"))
    message = str(err.value)
    assert "bad_tests.jsonl" in message and "row 2" in message and "'examples'" in message and "'output'" in message


def test_missing_column_and_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="no column 'tests'"):
        load_code_questions(str(FIXTURES / "codeforces_cots.jsonl"), tests_field="tests")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_code_questions(str(tmp_path / "nope.jsonl"))


def test_parse_tests_accepts_lists_and_json_strings_only():
    assert parse_tests('[{"input": "1", "output": "2"}]', "x") == [{"input": "1", "output": "2"}]
    assert parse_tests(None, "x") == []
    assert parse_tests([{"input": "1", "output": "2", "testtype": "functional"}], "x") is None
    with pytest.raises(DataError, match="where: not valid JSON"):
        parse_tests("[{", "where")
    with pytest.raises(DataError, match="where: must be a list"):
        parse_tests({"input": "1"}, "where")


def test_data_modules_load_code_questions_through_the_code_verifier():
    from sdzero_pl.tasks import CodeReward, MathReward

    path = str(FIXTURES / "codeforces_cots.jsonl")
    named = QuestionSource(path, question_field="prompt", answer_field="examples", id_field="id")
    questions = CodeReward().load_questions(named)
    assert questions[0].id == "4/A" and questions[0].answer[0] == {"input": "8\n", "output": "YES\n"}
    assert CodeReward().load_questions(QuestionSource(path)) == questions  # the code task's own column defaults
    with pytest.raises(DataError, match="examples"):  # the math verifier wants a string reference
        MathReward().load_questions(named)


def test_phase2_data_module_takes_code_questions_from_a_code_reward():
    from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
    from sdzero_pl.tasks import CodeReward

    data = OnPolicyDataModule(QuestionSource(str(FIXTURES / "codeforces_cots.jsonl")), reward=CodeReward())
    data.setup("fit")
    assert data.questions[0].id == "4/A" and isinstance(data.questions[0].answer, list)
