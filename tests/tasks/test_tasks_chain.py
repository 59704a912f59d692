"""The demo task's chain variant: harder problems, a validation split, localized retry examples (issue 19 item 4)."""

from __future__ import annotations

import json
import random
import re

import pytest

from sdzero_pl.core.prompts import CONTROL_PRESETS
from sdzero_pl.tasks.arithmetic import (
    FEEDBACK_PHRASES, SPLITS, TaskSettings, first_error, generate_split, parse_steps, split_of, worked_solution,
    worked_steps_valid
)
from sdzero_pl.tasks.chain import (
    CHAIN, arithmetic_key, chain_split, first_wrong_step, is_correct, localized_retry_example, main, validation_split,
    write_demo_data
)


def test_the_default_task_is_unchanged_by_the_variant():
    """Same questions, same ids as before the prefix argument existed: the shipped demo data stays byte-identical."""
    default = generate_split("phase1", 30, seed=0)
    assert [p.id for p in default] == [f"arith-phase1-0-{i}" for i in range(30)]
    assert default == generate_split("phase1", 30, 0, TaskSettings(), prefix="arith")
    assert default[0].problem.startswith(("Tom", "Sam", "Ben", "Max", "Leo", "Ann", "Mia", "Eva", "Zoe", "Ivy"))


def test_chain_problems_are_longer_use_multiplication_and_stay_valid():
    problems = chain_split("train", 400, 0)
    assert all(p.id == f"chain-train-0-{i}" for i, p in enumerate(problems))
    lengths = [len(parse_steps(p.solution)[1]) for p in problems]
    assert min(lengths) == CHAIN.min_steps and max(lengths) == CHAIN.max_steps
    assert sum("*" in p.solution for p in problems) > 100
    assert max(int(p.answer) for p in problems) > 100  # results carry across digits
    assert all(worked_steps_valid(p.solution) and is_correct(p.solution, p) for p in problems)
    # the arithmetic task's generator at the CHAIN settings: only the ids differ
    same = generate_split("train", 400, 0, CHAIN)
    assert [(p.problem, p.solution) for p in same] == [(p.problem, p.solution) for p in problems]


def test_chain_splits_are_disjoint_and_validation_is_outside_training_and_heldout():
    by_split = {s: chain_split(s, 200 if s != "train" else 1500, 0) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not {arithmetic_key(p) for p in by_split[a]} & {arithmetic_key(p) for p in by_split[b]}, (a, b)
    assert all(split_of(arithmetic_key(p)) == s for s, ps in by_split.items() for p in ps)
    validation = validation_split(150, by_split["train"])
    keys = [arithmetic_key(p) for p in validation]
    assert len(set(keys)) == 150 and [p.id for p in validation] == [f"chain-validation-{i}" for i in range(150)]
    assert not set(keys) & {arithmetic_key(p) for p in by_split["train"]}
    assert not {p.problem for p in validation} & {p.problem for ps in by_split.values() for p in ps}
    assert all(split_of(k) == "train" for k in keys)  # another hash split than heldout, phase1 and phase2
    with pytest.raises(ValueError, match="`n` must be >= 0, got -1"):
        validation_split(-1, [])


def test_first_wrong_step_names_the_first_equation_that_leaves_the_solution():
    solution = "7+5=12. 12*2=24. 24-3=21. \\boxed{21}"
    assert first_wrong_step(solution, solution) is None
    assert first_wrong_step("7+5=12. 12*2=26. 26-3=23. \\boxed{23}", solution) == 1  # a slip, carried on
    assert first_wrong_step("7+6=13. 13*2=26. 26-3=23. \\boxed{23}", solution) == 0  # a misread operand
    assert first_wrong_step("7+5=12. 12*2=24. \\boxed{24}", solution) == 2  # a step left out
    assert first_wrong_step("7+5=12. 12*2=24. 24-3=21. \\boxed{20}", solution) == 3  # only the box is wrong
    # a revising completion is judged by its last attempt
    assert first_wrong_step("1+1=3. \\boxed{3}\n\nHmm.\n\n7+5=12. 12*2=25. \\boxed{25}", solution) == 1


def _control_phrases() -> set[str]:
    return {phrase for preset in CONTROL_PRESETS.values() for phrase in preset.values()}


def test_localized_retry_example_keeps_the_right_steps_and_fixes_the_first_wrong_one():
    rng = random.Random(0)
    controls = _control_phrases()
    problems = chain_split("train", 200, 0)
    for n, p in enumerate(problems):
        start, steps = parse_steps(p.solution)
        i = n % len(steps)
        attempt = worked_solution(start, steps, slip=(i, 1 + n % 3))  # the model's kind of error at step i
        first, phrase, target = localized_retry_example(p, "earlier text\n\n" + attempt, rng)
        assert first == attempt  # the final attempt only
        assert phrase in FEEDBACK_PHRASES[0] and phrase not in controls
        assert not any(c in phrase or phrase in c for c in controls)
        assert target == p.solution and is_correct(target, p)
        assert first_wrong_step(attempt, p.solution) == i
        mine, fixed = re.findall(r"[^.]+\.", attempt)[: len(steps)], re.findall(r"[^.]+\.", target)[: len(steps)]
        assert mine[:i] == fixed[:i]  # the correct steps repeated verbatim
        assert mine[i] != fixed[i]  # the first wrong one fixed
        assert first_error(attempt, p.solution) is not None
        assert target.startswith(attempt[: first_error(attempt, p.solution)])  # same characters up to the error
        first, phrase, target = localized_retry_example(p, p.solution, rng)  # a right attempt: restated
        assert (first, target) == (p.solution, p.solution) and phrase in FEEDBACK_PHRASES[1]


def test_write_demo_data_writes_every_split_and_the_cli_one(tmp_path, capsys):
    sizes = {"phase1": 20, "phase2": 30, "heldout": 10, "validation": 8}
    paths = write_demo_data(tmp_path / "d", sizes)
    rows = {s: [json.loads(line) for line in path.read_text().splitlines()] for s, path in paths.items()}
    assert {s: len(r) for s, r in rows.items()} == {**sizes, "train": 50}
    assert {r["id"] for r in rows["train"]} == {r["id"] for r in rows["phase1"] + rows["phase2"]}
    assert rows["heldout"][0]["id"] == "chain-heldout-0-0" and set(rows["heldout"][0]) == {
        "id", "problem", "answer", "solution"}
    before = paths["heldout"].read_bytes()
    write_demo_data(tmp_path / "d", sizes)  # existing files are kept
    assert paths["heldout"].read_bytes() == before
    main(["--split", "heldout", "--n", "10", "--out", str(tmp_path / "h.jsonl")])
    assert (tmp_path / "h.jsonl").read_bytes() == before
    assert "wrote 10 heldout problems" in capsys.readouterr().out


def test_own_error_retry_examples_balance_the_model_answers(monkeypatch):
    """scripts/tiny_base_own_errors.py: the model's own answers become the attempts, balanced to the wrong share;
    restated canonical solutions make up for missing right answers; every target is the canonical solution."""
    import argparse
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    sys.modules.pop("tiny_base_own_errors", None)
    import tiny_base_own_errors as own

    problems = chain_split("train", 40, 0)
    answers = [p.solution if i % 8 == 0 else p.solution.replace("=", "=1", 1) for i, p in enumerate(problems)]

    class Model:
        def train(self):
            pass

    def measure(model, tokenizer, pool, args, reward, *, temperature, seed):
        assert temperature == 1.0 and [p.id for p in pool] == [p.id for p in problems[:20]]
        return {"samples": [(None, answers[int(p.id.rsplit("-", 1)[1])]) for p in pool]}

    monkeypatch.setattr(own, "measure", measure)
    args = argparse.Namespace(own_errors_from=5, own_errors_every=3, own_errors_pool=20, own_errors_temperature=1.0,
                              retry_slip_prob=0.5, seed=0)
    builder = own.OwnErrors(args, problems, reward=None)
    assert [s for s in range(12) if builder.due(s)] == [5, 8, 11]
    gated = own.OwnErrors(argparse.Namespace(**{**vars(args), "own_errors_min_accuracy": 0.25}), problems, None)
    accuracy = {s: (None if s < 4 else 0.1 if s < 7 else 0.3) for s in range(14)}  # the latest validation result
    assert [s for s in range(14) if gated.due(s, accuracy[s])] == [7, 10, 13]  # starts once accuracy >= 0.25
    examples = builder.examples(Model(), None, 5)
    record = builder.refreshes[0]
    assert (record["wrong"], record["right"], record["restated"]) == (10, 3, 7)  # 17 of 20 wrong, kept 10 + 10
    assert record["first_wrong_step"] == {"0": 10}
    assert len(examples) == 20
    for p, (attempt, phrase, target) in examples:
        assert target == p.solution
        assert phrase in FEEDBACK_PHRASES[int(is_correct(attempt, p))]
    assert sum(is_correct(a, p) for p, (a, _, _) in examples) == 10


def test_the_kept_base_model_has_trained_on_its_own_errors(monkeypatch):
    """scripts/train_tiny_base.py --select_after_rebuilds: an in-band evaluation before that many own-error
    rebuilds is neither kept nor a reason to stop above the band (the killed first run of attempt 2 would have kept
    a model that never saw its own errors)."""
    import sys
    from pathlib import Path

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    for name in ("train_tiny_base", "tiny_base_own_errors", "tiny_base_record"):
        sys.modules.pop(name, None)
    import train_tiny_base as script

    from sdzero_pl.core.tiny import build_char_tokenizer

    scripted = {}  # the validation accuracies of the evaluations at steps 2, 4, 6, 8, 10

    def measure(model, tokenizer, problems, args, reward, seed):
        return {"accuracy": next(scripted["it"]), "boxed_rate": 1.0, "ended_rate": 1.0, "mean_completion_len": 1.0}

    class Own:  # a rebuild at steps 3 and 5 (after the evaluations at 2 and 4); no new examples
        def __init__(self):
            self.refreshes = []

        def due(self, step, accuracy):
            return step in (3, 5)

        def examples(self, model, tokenizer, step):
            self.refreshes.append({"step": step})
            return []

    monkeypatch.setattr(script, "measure", measure)
    tokenizer = build_char_tokenizer()
    rows = script.encode(tokenizer, chain_split("train", 8, 0))

    def run(accuracies, select_after):
        scripted["it"] = iter(accuracies)
        args = script.parse_args([
            "--task", "chain", "--retry_style", "localized", "--steps", "10", "--eval_every", "2", "--batch_size", "2",
            "--warmup_steps", "1", "--select_after_rebuilds", str(select_after), "--band_low", "0.3",
            "--band_high", "0.6", "--target", "0.45", "--hidden_size", "64", "--num_attention_heads", "2",
            "--num_hidden_layers", "1", "--intermediate_size", "64"])
        torch.manual_seed(0)
        history, last, kept = script.train_loop(args, script.build_model(args, tokenizer), tokenizer, rows, rows, [],
                                                script.Clock(), reward=None, own=Own())
        return (kept or {}).get("step"), last

    # 0.45 at step 4 (one rebuild) is on target, but the kept model must have had two: step 6; 0.9 at 8 stops
    assert run([0.1, 0.45, 0.55, 0.9], select_after=2) == (6, 8)
    assert run([0.1, 0.45, 0.55, 0.9], select_after=0) == (4, 8)
    # above the band before two rebuilds does not stop training
    assert run([0.1, 0.9, 0.45, 0.9], select_after=2) == (6, 8)
    assert run([0.1, 0.9, 0.45, 0.9], select_after=0) == (None, 4)
