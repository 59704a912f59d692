"""CodeReward: the MathReward interface, all tests must pass, C++ compiled in the sandbox, parallel and picklable."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest

from sdzero_pl.tasks import RewardBatch
from sdzero_pl.tasks.code.reward import CodeReward, Program

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "code"
ADD = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]
CPP_ADD = '```cpp\n#include <iostream>\nint main(){long long a,b;std::cin>>a>>b;std::cout<<a+b<<"\\n";}\n```'


@pytest.fixture(scope="module")
def reward():
    verifier = CodeReward(time_limit_s=1.0, memory_mb=256, num_workers=2)
    yield verifier
    verifier.close()


def test_reward_is_one_only_when_every_test_passes(reward):
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    first_only = "```python\na, b = map(int, input().split())\nprint(3)\n```"
    crashes = "```python\nprint(3)\nraise SystemExit(1)\n```"
    result = reward([right, first_only, crashes, "no code"], [ADD] * 4)
    assert isinstance(result, RewardBatch)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0]
    assert result.errors[0] is None
    assert result.errors[1] == "test 2: wrong answer"
    assert result.errors[2] == "test 1: exit status 1"  # right output, but a runtime error
    assert "no fenced code block" in result.errors[3]
    assert (result.skipped, result.timeouts) == (0, 0)


def test_cpp_is_compiled_and_compile_errors_score_zero(reward):
    result = reward([CPP_ADD, "```c++\nint main( {\n```"], [ADD, ADD])
    assert result.rewards == [1.0, 0.0]
    assert result.errors[1].startswith("compile error") and "main.cpp" in result.errors[1]


def test_language_override_wins_over_the_fence(reward):
    untagged_cpp = CPP_ADD.replace("```cpp", "```")
    assert reward([untagged_cpp], [ADD]).rewards == [0.0]  # untagged means Python
    assert reward([untagged_cpp], [ADD], languages=["cpp"]).rewards == [1.0]
    with pytest.raises(ValueError, match="row 0: language 'java'"):
        reward([untagged_cpp], [ADD], languages=["java"])


def test_rows_without_tests_are_skipped_and_malformed_tests_raise(reward):
    result = reward(["```python\nprint(1)\n```"], [[]])
    assert result.rewards == [None] and result.skipped == 1
    with pytest.raises(TypeError, match="row 1: test 0 field 'output'"):
        reward(["a", "b"], [ADD, [{"input": "1"}]])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["a", "b"], [ADD])


def test_timeouts_are_counted(reward):
    result = reward(["```python\nimport time\ntime.sleep(5)\n```"], [ADD])
    assert result.rewards == [0.0] and result.timeouts == 1
    assert "longer than 1s" in result.errors[0]


def test_codeforces_fixture_generations_are_graded(reward):
    rows = [json.loads(line) for line in (FIXTURES / "codeforces_cots.jsonl").read_text().splitlines()][:3]
    result = reward([r["generation"] for r in rows], [r["examples"] for r in rows])
    assert result.rewards == [1.0, 1.0, 0.0]  # python right, C++ right, always-YES wrong on the second example


def test_programs_run_in_parallel(monkeypatch):
    """``num_workers`` programs are in their sandboxes at the same time (counted, not timed)."""
    verifier = CodeReward(time_limit_s=10.0, num_workers=4)
    program = Program("python", "import time\ntime.sleep(1.0)\nprint(1)\n", (("", "1\n"),))
    lock, running, most = threading.Lock(), [0], [0]
    verify = CodeReward.verify_program

    def counted(self, rt, prog):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return verify(self, rt, prog)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(CodeReward, "verify_program", counted)
    outcomes = verifier.verify_programs([program] * 4)  # in this process, no worker
    assert [o.reward for o in outcomes] == [1.0] * 4
    assert most[0] >= 2, "the programs ran one after another"


def test_reward_is_picklable_and_a_copy_starts_its_own_worker(reward):
    reward(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]])
    assert reward._worker is not None
    copy = pickle.loads(pickle.dumps(reward))
    assert copy._worker is None and copy.limits == reward.limits
    try:
        assert copy(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]]).rewards == [1.0]
    finally:
        copy.close()


def test_a_dead_verifier_process_is_replaced(reward):
    reward(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]])
    old = reward._worker.process
    old.kill()
    old.join()
    result = reward(["```python\nprint(1)\n```", "```python\nprint(2)\n```"], [[{"input": "", "output": "1"}]] * 2)
    assert result.rewards == [1.0, 0.0]
    assert reward._worker.process.pid != old.pid


def test_constructor_rejects_bad_limits():
    with pytest.raises(ValueError, match="`time_limit_s` must be > 0, got 0"):
        CodeReward(time_limit_s=0)
    with pytest.raises(ValueError, match="`num_workers` must be >= 1, got 0"):
        CodeReward(num_workers=0)
    with pytest.raises(ValueError, match="`memory_mb` must be > 0, got -1"):
        CodeReward(memory_mb=-1)


def broken_compiler(tmp_path: Path) -> str:
    """A "compiler" that fails the way a broken toolchain does (as the EOVERFLOW one did, issue #18)."""
    path = tmp_path / "toolchain" / "bin" / "g++"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\necho 'Cannot create temporary file in /tmp/: broken toolchain' >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def test_start_up_check_refuses_to_verify_when_correct_cpp_fails(tmp_path):
    verifier = CodeReward(time_limit_s=1.0, memory_mb=256, num_workers=2, cpp_compiler=broken_compiler(tmp_path))
    try:
        with pytest.raises(RuntimeError, match=r"C\+\+: compile error \(exit\): Cannot create temporary file") as err:
            verifier(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]])
        assert "Python" not in str(err.value) and "on_probe_failure: warn" in str(err.value)
        with pytest.raises(RuntimeError, match="broken toolchain"):  # every later call too, protections included
            verifier.protections
    finally:
        verifier.close()


def test_start_up_check_warns_once_and_verifies_with_on_probe_failure_warn(tmp_path, caplog):
    verifier = CodeReward(time_limit_s=1.0, memory_mb=256, num_workers=2, cpp_compiler=broken_compiler(tmp_path),
                          on_probe_failure="warn")
    try:
        with caplog.at_level("WARNING", logger="sdzero_pl.tasks.code.reward"):
            result = verifier([CPP_ADD, "```python\na, b = map(int, input().split())\nprint(a + b)\n```"], [ADD] * 2)
            verifier(["```python\nprint(1)\n```"], [[{"input": "", "output": "1"}]])
        assert result.rewards == [0.0, 1.0]
        warnings = [r.getMessage() for r in caplog.records if "start-up check" in r.getMessage()]
        assert len(warnings) == 1 and "C++: compile error" in warnings[0] and "broken toolchain" in warnings[0]
    finally:
        verifier.close()


def test_start_up_check_passes_here(reward):
    assert reward.probe_failures() == []  # a correct C++ and Python program pass on this host


def test_constructor_rejects_bad_probe_and_hide_settings():
    with pytest.raises(ValueError, match="`on_probe_failure` must be 'error' or 'warn', got 'ignore'"):
        CodeReward(on_probe_failure="ignore")
    with pytest.raises(ValueError, match="`hide_paths` entries must be absolute paths, got 'runs'"):
        CodeReward(hide_paths=["runs"])
    with pytest.raises(ValueError, match="cannot hide the root directory"):
        CodeReward(hide_paths=["/"])
