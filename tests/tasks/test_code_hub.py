"""Code data against the hub schemas: codeforces-cots questions built from the statement fields (not R1's prompt),
repeated ids, LiveCodeBench's required config and its encoded private tests."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import pytest

from sdzero_pl.data.hub import MirrorHub, load_schemas
from sdzero_pl.data.questions import DataError, QuestionSource, hub_mirrors
from sdzero_pl.tasks import CodeReward
from sdzero_pl.tasks.code.data import codeforces_statement, decode_tests, load_code_questions

CF = QuestionSource("open-r1/codeforces-cots", "solutions")
LCB = "livecodebench/code_generation_lite"


@pytest.fixture(scope="module")
def hub(dryrun_workdir):
    return MirrorHub(dryrun_workdir / "hub")


def test_codeforces_question_is_the_bare_statement_and_ids_repeat(hub):
    with hub_mirrors(hub):
        column = CodeReward().load_questions(CF)
        statement = CodeReward(statement="codeforces").load_questions(CF)
    assert column[0].question.startswith("You will be given a competitive programming problem")  # R1's prompt
    x = statement[0].question
    assert x.startswith("# Sum 0\n\nTime limit per test: 1 seconds\nMemory limit per test: 256 megabytes")
    for part in ("## Input Format\n", "## Output Format\n", "## Examples\n```input\n3 5\n```\n```output\n8\n```"):
        assert part in x
    assert "You will be given" not in x and "<your code here>" not in x
    distinct = load_schemas()["open-r1/codeforces-cots"].distinct_ids("solutions", "train")
    assert len(statement) < distinct  # one row per generation (~5 per problem); problems without tests skipped
    assert [q.answer for q in statement] == [q.answer for q in column]


def test_codeforces_statement_skips_empty_sections_and_names_a_bad_row():
    row = {"title": "A", "time_limit": 2.0, "memory_limit": 256, "description": "Do it.", "input_format": "n",
           "output_format": "m", "note": None, "examples": []}
    assert codeforces_statement(row, "here") == ("# A\n\nTime limit per test: 2 seconds\nMemory limit per test: "
                                                 "256 megabytes\n\nDo it.\n\n## Input Format\nn\n\n## Output Format\nm")
    with pytest.raises(DataError, match="here: field 'description'"):
        codeforces_statement({**row, "description": ""}, "here")


def test_livecodebench_needs_a_config_and_its_private_tests_are_decoded(hub):
    source = dict(question_field="question_content", answer_field="public_test_cases", id_field="question_id")
    reward = CodeReward(private_tests_field="private_test_cases")
    with hub_mirrors(hub):
        with pytest.raises(DataError, match="Config name is missing"):
            reward.load_questions(QuestionSource(LCB, split="test", **source))
        questions = reward.load_questions(QuestionSource(LCB, "release_v5", split="test", **source))
        public = CodeReward().load_questions(QuestionSource(LCB, "release_v5", split="test", **source))
    assert len(questions) == len(public) == 660  # 880 rows, every 4th LeetCode-style (functional): skipped
    assert all(len(q.answer) == 2 for q in questions) and all(len(q.answer) == 1 for q in public)


def test_private_tests_decode_json_and_base64_zlib_pickle_and_refuse_objects():
    tests = json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}])
    assert decode_tests(tests, "x") == tests
    assert decode_tests(base64.b64encode(zlib.compress(pickle.dumps(tests))).decode(), "x") == tests

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="x: neither JSON nor base64"):
        decode_tests(base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode(), "x")
    with pytest.raises(DataError, match="neither JSON"):
        decode_tests("not base64 at all!", "x")


def test_statement_mode_is_checked():
    with pytest.raises(ValueError, match="statement"):
        CodeReward(statement="prompt")
    with pytest.raises(ValueError, match="statement"):
        load_code_questions("x.jsonl", statement="nope")
