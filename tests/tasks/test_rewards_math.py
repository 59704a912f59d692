"""Math reward: last box wins, no box is 0, unusable gold is counted (never a crash), time limits from any thread."""

import json
import subprocess
import sys
import threading
import time

import pytest

from sdzero_pl.tasks import MathReward, extract_last_boxed
from sdzero_pl.tasks import math as math_reward


@pytest.fixture(scope="module")
def reward():
    verifier = MathReward(timeout_s=10.0)
    yield verifier
    verifier.close()


def test_extract_last_boxed_matches_nested_braces_and_takes_the_last():
    assert extract_last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_last_boxed(r"\boxed{a} and \fbox{b}") == "b"
    assert extract_last_boxed("no box here") is None
    assert extract_last_boxed(r"\boxed{unclosed") is None


def test_last_box_wins_after_a_revision(reward):
    completion = r"I think \boxed{5}. Wait, this response is not correct, let me start over. So \boxed{6}"
    assert reward([completion], ["6"]).rewards == [1.0]
    assert reward([completion], ["5"]).rewards == [0.0]


def test_equivalent_forms_and_missing_box(reward):
    result = reward([r"\boxed{0.5}", r"so \boxed{\dfrac{1}{2}}", "the answer is 1/2"], ["1/2", r"\frac{1}{2}", "1/2"])
    assert result.rewards == [1.0, 1.0, 0.0]
    assert result.errors[2] == "no \\boxed{} answer"


def test_unparseable_gold_is_counted_and_skipped_not_a_crash(reward):
    result = reward([r"\boxed{3}", r"\boxed{3}"], ["", "3"])
    assert result.rewards == [None, 1.0]
    assert result.skipped == 1 and "could not be parsed" in result.errors[0]


def test_non_string_answer_is_an_error(reward):
    with pytest.raises(TypeError, match="row 0"):
        reward([r"\boxed{3}"], [3])


def test_reward_works_from_a_non_main_thread(reward):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", reward([r"\boxed{42}"], ["42"])))
    thread.start()
    thread.join(60)
    assert out["r"].rewards == [1.0]


def _sleepy_check(gold, predicted):
    if predicted == r"\boxed{slow}":
        time.sleep(30)
    return 1.0


def test_a_check_that_hangs_counts_as_wrong_within_the_time_limit(monkeypatch):
    verifier = MathReward(timeout_s=1.0)
    monkeypatch.setattr(math_reward, "_check_row", _sleepy_check)  # pickled by reference into the workers
    try:
        start = time.monotonic()
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", verifier([r"\boxed{slow}", r"\boxed{1}"], ["1", "1"])))
        thread.start()
        thread.join(60)
        assert time.monotonic() - start < 20
        assert result["r"].rewards == [0.0, 1.0]
        assert result["r"].timeouts == 1
    finally:
        verifier.close()


def test_verify_command_scores_rows_and_names_a_bad_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"completion": r"so \boxed{4}", "answer": "4", "extra": 1}) + "\n"
        + json.dumps({"completion": "no box", "answer": "4"}) + "\n"
    )
    done = subprocess.run([sys.executable, "-m", "sdzero_pl.pipelines.verify", "math", str(rows)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scored = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["reward"] for r in scored] == [1, 0] and scored[0]["extra"] == 1
    rows.write_text(json.dumps({"completion": "x", "answer": "1"}) + "\n" + json.dumps({"completion": "x"}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "sdzero_pl.pipelines.verify", "math", str(rows)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{rows}:2: missing field 'answer'" in bad.stderr
