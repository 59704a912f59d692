"""Argument groups: the question source (selection, names, the verifier's column defaults), the control phrases
and the optimizer arguments, with errors that name the flag."""

from dataclasses import asdict

import pytest
import torch

from sdzero_pl.core.optim import OptimArgs, build_optimizer
from sdzero_pl.core.prompts import ControlPhrases
from sdzero_pl.data.questions import Question, QuestionSource
from sdzero_pl.tasks import MathReward


def _questions(n: int) -> list[Question]:
    return [Question(f"q{i}", f"What is {i}?", str(i)) for i in range(n)]


def test_select_skips_excludes_limits_then_shuffles_with_the_seed(tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text('["q3"]')
    source = QuestionSource("data.jsonl", skip_first=2, exclude_ids_file=str(ids), num_questions=4)
    assert [q.id for q in source.select(_questions(10), seed=0, exclude_ids={"q5"})] == ["q2", "q4", "q6", "q7"]
    shuffled = QuestionSource("data.jsonl", num_questions=8, shuffle=True)
    first = [q.id for q in shuffled.select(_questions(10), seed=0)]
    assert sorted(first) == [f"q{i}" for i in range(8)] and first != sorted(first)  # the first 8, shuffled
    assert first == [q.id for q in shuffled.select(_questions(10), seed=0)]  # by the seed alone
    assert first != [q.id for q in shuffled.select(_questions(10), seed=1)]


def test_name_and_text():
    assert QuestionSource("data/q.jsonl").name == "data/q.jsonl"
    assert QuestionSource("open-r1/OpenR1-Math-220k", dataset_config="default").name == \
        "open-r1/OpenR1-Math-220k[default:train]"
    assert QuestionSource("q.jsonl", instruction=" Box it.").text(Question("a", "1+1?", "2")) == "1+1? Box it."


@pytest.mark.parametrize("kwargs, flag", [({"skip_first": -1}, "--data.questions.skip_first"),
                                           ({"num_questions": -1}, "--data.questions.num_questions")])
def test_bad_source_fields_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        QuestionSource("q.jsonl", **kwargs)


def test_the_verifier_fills_in_its_own_columns(questions_file):
    reward = MathReward()
    assert reward.columns(QuestionSource(questions_file)) == ("problem", "answer", None)
    assert reward.columns(QuestionSource(questions_file, question_field="q", id_field="id")) == ("q", "answer", "id")
    assert [q.id for q in reward.load_questions(QuestionSource(questions_file, id_field="id"))][:2] == ["q0", "q1"]


def test_control_phrases_validate_and_override():
    assert ControlPhrases().phrases[0] == "Wait, this response is not correct, let me start over."
    assert ControlPhrases("qwen", wrong="Nope.").phrases == {1: "Let me rephrase the above solution.", 0: "Nope."}
    with pytest.raises(ValueError, match=r"control\.preset"):
        ControlPhrases("gpt")


@pytest.mark.parametrize("kwargs, flag", [({"lr": 0.0}, "--model.optim.lr"), ({"schedule": "step"}, "schedule"),
                                           ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"warmup_steps": -1}, "warmup")])
def test_bad_optimizer_fields_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OptimArgs(**kwargs)


def test_optimizer_arguments_are_kept_as_plain_types_and_rebuilt_from_them():
    class Module:
        hparams: dict = {}

    module = Module()
    optim = OptimArgs.hold(module, {"lr": 1e-3, "betas": [0.9, 0.95], "warmup_steps": 2})
    assert optim == OptimArgs(lr=1e-3, betas=[0.9, 0.95], warmup_steps=2) and module.hparams["optim"] == asdict(optim)
    result = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim, [10])
    scheduler = result["lr_scheduler"]["scheduler"]
    assert result["optimizer"].param_groups[0]["betas"] == (0.9, 0.95)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5e-3)  # warm-up step 1 of 2


def test_warmup_can_start_at_a_fraction_of_the_learning_rate_like_the_reference_code():
    from sdzero_pl.core.optim import lr_factor

    reference = torch.optim.lr_scheduler.LinearLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                                  start_factor=0.1, end_factor=1.0, total_iters=20)
    expected = []
    for _ in range(25):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    ours = [lr_factor(step, 100, 20, "constant", warmup_start=0.1) for step in range(25)]
    assert ours == pytest.approx(expected) and ours[0] == pytest.approx(0.1) and ours[20:] == [1.0] * 5
    assert lr_factor(0, 100, 20, "constant") == pytest.approx(1 / 20)  # default: the first step at lr / warm-up
    with pytest.raises(ValueError, match="warmup_start"):
        OptimArgs(warmup_start=1.0)
