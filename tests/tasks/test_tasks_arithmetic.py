"""The arithmetic word-problem task of the embedded demo: verifiable, deterministic, disjoint splits, tunable."""

from __future__ import annotations

import json
import random
import re

import pytest

from sdzero_pl.pipelines.demo import SPLIT_SIZES, VALIDATION_SIZE
from sdzero_pl.tasks import MathReward, extract_last_boxed
from sdzero_pl.tasks.arithmetic import (
    BASE_TRAINING, FEEDBACK_PHRASES, RETRY_PHRASES, SPLITS, ArithmeticReward, TaskSettings, feedback_retry_example,
    generate_split, generate_validation, main, parse_steps, retry_example, split_of, worked_solution, worked_steps_valid
)


def _key(problem) -> str:
    """The arithmetic of a problem, read back from its worked solution: "7+5=12. 12-3=9." -> "7+5-3"."""
    equations = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", problem.solution)
    return equations[0][0] + "".join(op + b for _, op, b, _ in equations)


def test_worked_solution_boxes_the_answer_and_math_reward_accepts_it():
    problems = generate_split("heldout", 40, seed=3, settings=TaskSettings(ops="+-*", max_steps=4))
    reward = MathReward()
    try:
        batch = reward([p.solution for p in problems], [p.answer for p in problems])
        wrong = reward([p.solution.replace(f"{{{p.answer}}}", f"{{{int(p.answer) + 1}}}") for p in problems],
                       [p.answer for p in problems])  # fmt: skip
    finally:
        reward.close()
    assert batch.rewards == [1.0] * len(problems)
    assert wrong.rewards == [0.0] * len(problems)
    for p in problems:
        assert extract_last_boxed(p.solution) == p.answer


def test_worked_solution_arithmetic_is_correct_and_chained():
    for p in generate_split("train", 200, seed=0, settings=TaskSettings(ops="+-*", max_steps=5)):
        equations = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", p.solution)
        value = int(equations[0][0])
        for a, op, b, c in equations:
            assert int(a) == value, p.solution
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(c) >= 0, p.solution
        assert str(value) == p.answer
        assert f"has {equations[0][0]} " in p.problem


def test_splits_are_disjoint_in_text_and_arithmetic():
    by_split = {s: generate_split(s, 300 if s != "train" else 2000, seed=0) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not {p.problem for p in by_split[a]} & {p.problem for p in by_split[b]}, (a, b)
            assert not {_key(p) for p in by_split[a]} & {_key(p) for p in by_split[b]}, (a, b)
    for split, problems in by_split.items():
        assert len({p.problem for p in problems}) == len(problems), f"duplicates within {split}"
        assert len({p.id for p in problems}) == len(problems)
        assert all(split_of(_key(p)) == split for p in problems)


def test_splits_stay_disjoint_across_seeds():
    heldout = {p.problem for p in generate_split("heldout", 300, seed=0)}
    for seed in (1, 2):
        assert not heldout & {p.problem for p in generate_split("phase1", 300, seed=seed)}


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate_split("phase1", 50, seed=7) == generate_split("phase1", 50, seed=7)
    assert generate_split("phase1", 20, seed=7) == generate_split("phase1", 50, seed=7)[:20]  # a prefix
    other = {p.problem for p in generate_split("phase1", 50, seed=8)}
    assert len(other & {p.problem for p in generate_split("phase1", 50, seed=7)}) < 5


def test_difficulty_settings_change_the_problems():
    def stats(settings):
        problems = generate_split("train", 300, seed=0, settings=settings)
        n_steps = [p.solution.count("=") for p in problems]
        operands = [int(b) for p in problems for _, op, b, _ in re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", p.solution)]
        ops = {op for p in problems for op in re.findall(r"\d([+\-*])\d", p.solution)}
        return min(n_steps), max(n_steps), max(operands), ops

    assert stats(TaskSettings(min_steps=1, max_steps=1, max_operand=5, ops="+")) == (1, 1, 5, {"+"})
    assert stats(TaskSettings(min_steps=4, max_steps=5, max_operand=50, ops="+-")) == (4, 5, 50, {"+", "-"})
    _, _, _, ops = stats(TaskSettings(ops="+-*", max_factor=3))
    assert ops == {"+", "-", "*"}
    assert generate_split("train", 5, seed=0) != generate_split("train", 5, seed=0, settings=TaskSettings(max_start=99))


def test_questions_are_short_for_a_char_level_model():
    lengths = [len(p.problem) for p in generate_split("train", 500, seed=0)]
    assert 50 <= min(lengths) and max(lengths) <= 160, (min(lengths), max(lengths))


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_steps=0), dict(min_steps=3, max_steps=2), dict(ops=""), dict(ops="+/"), dict(max_operand=0)],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        TaskSettings(**kwargs)


def test_cli_writes_jsonl_rows(tmp_path):
    out = tmp_path / "heldout.jsonl"
    main(["--split", "heldout", "--n", "25", "--seed", "0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25
    assert set(rows[0]) == {"id", "problem", "answer", "solution"}
    assert [r["problem"] for r in rows] == [p.problem for p in generate_split("heldout", 25, seed=0)]


def test_parse_steps_inverts_worked_solution():
    for p in generate_split("train", 100, seed=0, settings=TaskSettings(ops="+-*", max_steps=4)):
        assert worked_solution(*parse_steps(p.solution)) == p.solution


def test_retry_example_slips_change_the_answer_and_the_second_attempt_is_right():
    rng = random.Random(0)
    problems = generate_split("train", 200, seed=0)
    examples = [retry_example(p, rng, slip_prob=0.5) for p in problems]
    slipped = 0
    for p, (first, phrase, second) in zip(problems, examples):
        assert second == p.solution
        assert phrase in RETRY_PHRASES
        if first != p.solution:
            slipped += 1
            assert extract_last_boxed(first) != p.answer
            assert all(int(v) >= 0 for v in re.findall(r"=(-?\d+)", first)), first
            assert parse_steps(first) == parse_steps(p.solution)  # same problem, only a result is off
    assert 70 <= slipped <= 130
    assert all(retry_example(p, rng, slip_prob=0.0)[0] == p.solution for p in problems)


def test_retry_phrases_share_no_wording_with_the_control_phrases():
    """The base model must not learn SD-Zero's control phrases (or a correctness cue) before Phase 1."""
    controls = [
        "Let me rephrase the above solution.",
        "Wait, this response is not correct, let me start over.",
        "Wait, this response is wrong. Let me correct it.",
        "Wrong. I need to redo all.",
    ]
    cue_words = {"rephrase", "start over", "not correct", "wrong", "correct it", "redo all", "right", "mistake"}
    for phrase in RETRY_PHRASES:
        assert phrase not in controls
        assert not any(word in phrase.lower() for word in cue_words), phrase


@pytest.mark.parametrize("text, valid", [
    ("12-5=7. 7-7=0. 0+2=2. \\boxed{2}", True),
    ("16-3=13. 13-8=5. 5-3=2. \\boxed{2}", True),  # another valid order of the same steps
    ("4*3=12. \\boxed{12}", True),
    ("first try\n\nWait, this response is not correct, let me start over.\n\n3+4=7. \\boxed{7}", True),
    ("10-9=1. 1-8=2. \\boxed{2}", False),  # right number through wrong arithmetic (a lucky answer)
    ("3+4=7. 8-1=7. \\boxed{7}", False),  # the chain breaks
    ("5+2=7=19. 19-3=16. \\boxed{16}", False),  # not an equation
    ("3+4=7. \\boxed{8}", False),  # box differs from the last result
    ("\\boxed{7}", False),  # no worked steps
    ("3+4=7.", False),  # no box
    ("3+4=7. \\boxed{7} and more", False),
])
def test_worked_steps_valid(text, valid):
    assert worked_steps_valid(text) is valid


def test_arithmetic_reward_refuses_lucky_answers_and_keeps_the_rest():
    reward = ArithmeticReward()
    try:
        batch = reward(["12-5=7. 7-7=0. 0+2=2. \\boxed{2}", "10-9=1. 1-8=2. \\boxed{2}", "12-5=7. \\boxed{7}"],
                       ["2", "2", "2"])
    finally:
        reward.close()
    assert batch.rewards == [1.0, 0.0, 0.0]
    assert batch.errors[1] == "the worked steps do not add up"


def test_feedback_retry_examples_say_whether_the_attempt_was_right():
    rng = random.Random(0)
    problems = generate_split("train", 300, seed=0)
    wrong = 0
    kinds = set()
    for p in problems:
        first, phrase, second = feedback_retry_example(p, rng, error_prob=0.5)
        assert second == p.solution
        assert worked_steps_valid(second)
        if first == p.solution:
            assert phrase in FEEDBACK_PHRASES[1]
            continue
        wrong += 1
        assert phrase in FEEDBACK_PHRASES[0]
        assert extract_last_boxed(first) != p.answer
        assert all(int(v) >= 0 for v in re.findall(r"=(-?\d+)", first)), first
        if worked_steps_valid(first):  # a misread operand or a flipped operation: valid arithmetic, wrong problem
            kinds.add("misread or flip" if parse_steps(first) != parse_steps(p.solution) else "?")
        else:
            kinds.add("slip")
    assert 110 <= wrong <= 190
    assert kinds == {"slip", "misread or flip"}


def test_feedback_phrases_are_not_the_control_phrases():
    from sdzero_pl.core.prompts import CONTROL_PRESETS

    controls = {phrase for preset in CONTROL_PRESETS.values() for phrase in preset.values()}
    for phrases in FEEDBACK_PHRASES.values():
        for phrase in phrases:
            assert phrase not in controls
            assert not any(c in phrase or phrase in c for c in controls)


def test_validation_split_is_disjoint_from_every_question_set_and_the_base_models_training():
    validation = generate_validation(VALIDATION_SIZE)
    assert len(validation) == VALIDATION_SIZE and len({p.solution for p in validation}) == VALIDATION_SIZE
    assert [p.id for p in validation[:2]] == ["arith-validation-0-0", "arith-validation-0-1"]
    others = {split: generate_split(split, n, seed=0) for split, n in SPLIT_SIZES.items()}  # the demo's sets
    others["base training"] = generate_split(*BASE_TRAINING)  # what checkpoints/tiny-arith trained on
    for name, problems in others.items():
        assert not {p.problem for p in validation} & {p.problem for p in problems}, name
        assert not {p.solution for p in validation} & {p.solution for p in problems}, name  # no re-worded copy
    assert all(split_of(_key(p)) == "train" for p in validation)  # never a phase1 / phase2 / held-out bucket
    assert generate_validation(5) == validation[:5] and generate_validation(5, seed=1) != validation[:5]
    # the other question sets are what they were before the validation split existed
    assert others["heldout"][0].id == "arith-heldout-0-0" and len(others["phase1"]) == SPLIT_SIZES["phase1"]
