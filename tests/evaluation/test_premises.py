"""Premise checks of the comparison table: the rules on toy measurements, the seed means, the table's marking, and
SDFT's teacher-vs-student measurement on the shipped tiny model."""

import math
from pathlib import Path

from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.data.questions import Question
from sdzero_pl.evaluation import premises
from sdzero_pl.evaluation.tables import comparison_table
from sdzero_pl.phase2.onpolicy import DEMONSTRATION_TEMPLATE
from sdzero_pl.pipelines.compare_premises import premise_methods, premise_verdicts
from sdzero_pl.tasks import ArithmeticReward
from sdzero_pl.tasks.arithmetic import generate_validation

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-arith"


def _probe(p0, p1, kl_wrong=0.2, kl_right=0.1):
    return {"wrong": 10, "right": 10, "wrong_acc_P0": p0, "wrong_acc_P1": p1, "right_acc_P1": 0.9,
            "right_acc_P0": 0.5, "kl_wrong": kl_wrong, "kl_right": kl_right}


def test_sdft_premise_fails_when_the_teacher_is_no_better_than_the_student():
    fails = premises.judge("sdft", {"teacher_acc": 0.03, "student_acc": 0.41, "questions": 200, "context": "x"})
    assert fails["holds"] is False and "teacher with the demonstration 3.0% vs student 41.0% (200 questions)" \
        in fails["check"]
    assert premises.judge("sdft", {"teacher_acc": 0.41, "student_acc": 0.41, "questions": 9})["holds"] is False
    holds = premises.judge("sdft_answer", {"teacher_acc": 0.6, "student_acc": 0.4, "questions": 9})
    assert holds["holds"] is True and "final answer" in holds["check"]


def test_sdzero_premise_reads_the_reviser_after_wrong_answers_and_the_control_has_none():
    assert premises.judge("sdzero", _probe(0.24, 0.34))["holds"] is False  # "start over" no better than "rephrase"
    assert premises.judge("sdzero", _probe(0.34, 0.34))["holds"] is False
    ok = premises.judge("sdzero", _probe(0.40, 0.30))
    assert ok["holds"] is True and "P_0 40.0% vs P_1 30.0% (10 answers)" in ok["check"] and "wrong 0.2 vs right 0.1" \
        in ok["check"]
    control = premises.judge("control", _probe(0.2, 0.3))
    assert control["holds"] is None and control["check"].startswith("none (a control)")
    assert premises.judge("rft", None)["rule"] == "stated" and premises.judge("sdzero", None)["holds"] is None


def test_probe_check_and_seed_means():
    report = {"r0": {"responses": 3, "revised_acc_after_P0": 0.5, "revised_acc_after_P1": 0.25, "control_kl_mean": 0.3},
              "r1": {"responses": 5, "revised_acc_after_P0": 0.2, "revised_acc_after_P1": 0.8, "control_kl_mean": 0.1}}
    check = premises.probe_check(report)
    assert check == {"wrong": 3, "right": 5, "wrong_acc_P0": 0.5, "wrong_acc_P1": 0.25, "right_acc_P1": 0.8,
                     "right_acc_P0": 0.2, "kl_wrong": 0.3, "kl_right": 0.1}
    other = {**check, "wrong": 1, "wrong_acc_P0": None, "wrong_acc_P1": 0.75}
    mean = premises.mean_over_seeds([check, other])
    assert mean["wrong"] == 4 and mean["wrong_acc_P0"] == 0.5 and mean["wrong_acc_P1"] == 0.5
    verdicts = premise_verdicts(["base", "srt", "sdzero", "control", "sdft"], {"srt": [check, other]})
    assert verdicts["sdzero"]["holds"] is False and verdicts["control"]["holds"] is None
    assert verdicts["sdft"]["check"].startswith("not measured") and len(verdicts["sdzero"]["per_seed"]) == 2
    assert premise_methods(["base", "sdzero", "control", "sdft_answer"]) == ["srt", "sdft_answer"]


def _row(label, mean, premise=None, setting=None):
    stat = {"mean": mean, "std": 0.01, "per_seed": {}}
    row = {"label": label, "avg@4": stat, "pass@4": stat, "len_mean": {"mean": 30.0}, "generations": {"mean": 10},
           "tokens": {"mean": 100}, "benchmarks": {"heldout": stat}, "setting": setting}
    if premise is not None:
        row["premise"] = premise
    return row


def test_table_marks_a_row_whose_premise_fails_and_shows_every_check():
    test = {"mean_diff_points": -5.0, "ci_low": -7.0, "ci_high": -3.0, "bootstrap_p_value": 0.0, "seed_p_value": 0.01,
            "p_value": 1 / 10_001, "questions": 200}
    fails = premises.judge("sdft", {"teacher_acc": 0.03, "student_acc": 0.41, "questions": 200})
    holds = premises.judge("sdzero", _probe(0.4, 0.3))
    rows = {"sdft": {**_row("SDFT", 0.4, fails, "lr=3e-05, steps=192"), "vs_sdzero": test},
            "sdzero": _row("SD-Zero", 0.45, holds, "lr=3e-05, steps=64")}
    summary = {"settings": {"k": 4, "reference": "sdzero", "reference_label": "SD-Zero", "seeds": [0, 1, 2, 3, 4],
                            "permutations": 10_000, "premise_questions": 200}, "rows": rows}
    table = comparison_table(summary)
    sdft_line = next(line for line in table.splitlines() if line.startswith("| SDFT"))
    assert sdft_line.startswith("| SDFT (premise fails) |") and "**premise fails** (fails when the teacher" in sdft_line
    assert "< 1/10,000" in sdft_line and "lr=3e-05, steps=192" in sdft_line  # p at the floor: "< 1/N", not 0.0001
    assert "| SD-Zero | " in table and "holds: reviser after wrong answers: P_0 40.0%" in table
    assert "Seeds 0, 1, 2, 3, 4" in table and "premise check |" in table.splitlines()[0]


def test_sdft_teacher_and_student_accuracy_on_the_tiny_model(one_thread):
    questions = [Question(id=p.id, question=p.problem, answer=p.answer, solution=p.solution)
                 for p in generate_validation(6)]
    measured = premises.teacher_accuracy(load_model(str(SHIPPED), "float32"), load_tokenizer(str(SHIPPED)), questions,
                                         reward=ArithmeticReward(), context="demonstration",
                                         template=DEMONSTRATION_TEMPLATE, max_new_tokens=96)
    assert measured["questions"] == 6 and measured["context"] == "demonstration"
    for key in ("teacher_acc", "student_acc"):
        assert 0.0 <= measured[key] <= 1.0 and not math.isnan(measured[key])


def test_wrong_answer_differences_are_pooled_over_seeds_into_one_paired_test():
    seeds = [{**_probe(0.5, 0.0), "wrong_diffs": [1.0] * 5}, {**_probe(0.5, 0.0), "wrong_diffs": [1.0] * 5 + [0.0]}]
    mean = premises.mean_over_seeds(seeds)
    assert mean["paired_p"] == 2 / 2**10 and "wrong_diffs" not in mean  # 10 nonzero: exact, 2 of 1,024 flips
    assert "paired sign-flip p = 0.00195" in premises.judge("sdzero", mean)["check"]
    assert premises.judge("sdzero", mean)["holds"] is True
    # a higher point estimate that the paired test cannot tell from chance is not a premise shown
    assert premises.judge("sdzero", {**_probe(0.161, 0.160), "paired_p": 0.789})["holds"] is False
    assert "paired_p" not in premises.mean_over_seeds([_probe(0.5, 0.0)])
