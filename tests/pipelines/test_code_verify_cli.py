"""`python -m sdzero_pl.verify code`: rows come back with a reward; a malformed row is named by its line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "code"
REPO = Path(__file__).resolve().parents[2]


def verify(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sdzero_pl.pipelines.verify", "code", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_code_rows_are_written_back_with_rewards():
    done = verify(str(FIXTURES / "verify_rows.jsonl"), "--time-limit", "1", "--workers", "2")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["reward"] for r in rows] == [1, 0, 0, 1, 0]  # right, wrong, no code, C++ by override, sleeps
    assert rows[4]["reward_error"] == "test 1: ran longer than 1s"
    assert rows[3]["language"] == "cpp"  # input fields are kept
    assert "5 rows, 2 correct" in done.stderr and "1 timed out" in done.stderr
    assert "sandbox protections" in done.stderr


def test_malformed_rows_are_named_by_line_number(tmp_path):
    good = {"completion": "```python\nprint(1)\n```", "tests": [{"input": "", "output": "1"}]}
    cases = [
        ({"completion": "x"}, "missing field 'tests'"),
        ({"completion": "x", "tests": [{"input": "1"}]}, "field 'tests': test 0 field 'output'"),
        ({**good, "language": "java"}, "field 'language' must be one of"),
    ]
    for n, (bad, expected) in enumerate(cases):
        path = tmp_path / f"rows{n}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        done = verify(str(path))
        assert done.returncode == 1
        assert f"{path}:2:" in done.stderr and expected in done.stderr, done.stderr
