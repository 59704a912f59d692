"""The reviser probe: the arithmetic task's step verifier, token positions, and a run on the shipped demo model."""

import json
from pathlib import Path

import pytest

from sdzero_pl.core.models import load_tokenizer
from sdzero_pl.evaluation.probe import main, rank_of, summarize, token_of_char
from sdzero_pl.tasks.arithmetic import first_error, generate_split, write_jsonl

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-arith"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_first_error_points_at_the_first_wrong_character():
    solution = "7+5=12. 12-3=9. \\boxed{9}"
    assert first_error(solution, solution) is None
    assert first_error("7+5=13. 13-3=10. \\boxed{10}", solution) == 5  # a slip in the result
    assert first_error("7+6=13. 13-3=10. \\boxed{10}", solution) == 2  # a misread operand
    assert first_error("first try\n\n7+5=12. 12-3=9.", solution) == len("first try\n\n7+5=12. 12-3=9.")  # stops


def test_token_positions_and_ranks():
    tokenizer = load_tokenizer(str(SHIPPED))  # one token per character
    ids = tokenizer.encode("7+5=13.", add_special_tokens=False)
    assert token_of_char(tokenizer, ids, 5) == 5 and token_of_char(tokenizer, ids, 100) == len(ids) - 1
    assert rank_of([0.1, 0.9, 0.5], 1) == 1 and rank_of([0.1, 0.9, 0.5], 0) == 3


def test_probe_runs_on_the_shipped_model_and_reports_both_rewards(tmp_path):
    questions = write_jsonl(generate_split("heldout", 12, seed=0), tmp_path / "heldout.jsonl")
    assert main([str(SHIPPED), str(questions), "--n", "12", "--reward", "arithmetic", "--id-field", "id",
                 "--solution-field", "solution", "--max-new-tokens", "96", "--out", str(tmp_path / "probe")]) == 0
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    report, responses = saved["report"], saved["responses"]
    assert len(responses) == 12 and report["r0"]["responses"] + report["r1"]["responses"] == 12
    for row in responses:
        assert len(row["divergence"]) == len(row["control_kl"]) == len(row["surprise"]) == len(row["token_ids"])
        assert all(v >= 0 for v in row["control_kl"]) and set(row["revision_rewards"]) == {"1", "0"}
        if row["reward"] < 0.5:
            assert row["first_error"] is not None and 0 <= row["first_error"] < len(row["token_ids"])
    located = report["localization"]["wrong_with_located_error"]
    assert located == report["r0"]["responses"] and summarize([])["responses"] == 0
    assert "Error localization" in (tmp_path / "probe" / "probe.md").read_text()
