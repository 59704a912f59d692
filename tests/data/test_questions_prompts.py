"""Question loading (errors name file, row and field), Phase-1 exclusions, control phrases, chat rendering."""

import json

import pytest

from sdzero_pl.core.prompts import CONTROL_PRESETS, control_phrases, control_text, encode_prompts, render_prompt
from sdzero_pl.data.questions import DataError, load_questions, read_id_file, select_questions


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_questions_load_from_jsonl_with_column_mapping(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"q": "1+1?", "a": "2", "uid": "x"}, {"q": "2+2?", "a": "4", "uid": "y"}])
    questions = load_questions(path, question_field="q", answer_field="a", id_field="uid")
    assert [(q.id, q.question, q.answer) for q in questions] == [("x", "1+1?", "2"), ("y", "2+2?", "4")]


def test_missing_column_names_file_and_field(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"problem": "1+1?"}])
    with pytest.raises(DataError, match=r"q\.jsonl: row 1: missing field .answer."):
        load_questions(path)


@pytest.mark.parametrize(
    "row, field",
    [({"problem": "  ", "answer": "2"}, "problem"), ({"problem": "1+1?", "answer": 2}, "answer")],
)
def test_bad_row_names_file_row_and_field(tmp_path, row, field):
    good = {"problem": "ok?", "answer": "1"}
    path = _write(tmp_path / "q.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"q\.jsonl: row 3: field '{field}'"):
        load_questions(path)


def test_solutions_are_read_only_when_a_solution_field_is_given(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"problem": "1+1?", "answer": "2", "sol": "1+1 = \\boxed{2}"}])
    assert load_questions(path, solution_field="sol")[0].solution == "1+1 = \\boxed{2}"
    assert load_questions(path)[0].solution is None


@pytest.mark.parametrize("solution", [None, 3, " ", "missing"])
def test_bad_solution_names_file_row_and_field(tmp_path, solution):
    good = {"problem": "ok?", "answer": "1", "solution": "fine"}
    bad = {"problem": "ok?", "answer": "1"} if solution == "missing" else {**good, "solution": solution}
    path = _write(tmp_path / "q.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"q\.jsonl: row 2: .*field .solution."):
        load_questions(path, solution_field="solution")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_questions(str(tmp_path / "nope.jsonl"))


def test_phase1_questions_are_excluded(tmp_path, questions_file):
    questions = load_questions(questions_file, id_field="id")
    ids_file = tmp_path / "phase1_ids.json"
    ids_file.write_text(json.dumps(["q5", "q6"]))
    left = select_questions(questions, skip_first=4, exclude_ids=read_id_file(str(ids_file)))
    assert {q.id for q in left}.isdisjoint({"q0", "q1", "q2", "q3", "q5", "q6"})
    assert len(left) == len(questions) - 6


def test_control_presets_and_overrides():
    assert control_phrases()[1] == "Let me rephrase the above solution."
    assert control_phrases()[0] == "Wait, this response is not correct, let me start over."
    assert control_phrases("qwen")[0] == CONTROL_PRESETS["qwen"][0]
    assert control_phrases("olmo", wrong="Nope.")[0] == "Nope."
    assert control_text(control_phrases(), 1.0) == "\n\nLet me rephrase the above solution.\n\n"
    with pytest.raises(ValueError, match=r"control\.preset"):
        control_phrases("gpt")


def test_prompt_is_rendered_with_the_chat_template_and_opens_the_assistant_turn(tiny_model_dir):
    from sdzero_pl.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    text = render_prompt(tokenizer, "What is 1+1?", system_prompt="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompts(tokenizer, ["What is 1+1?"])[0]
    assert tokenizer.decode(ids) == render_prompt(tokenizer, "What is 1+1?")


def test_chat_template_arguments_reach_the_template(tiny_model_dir):
    """A hybrid-thinking template (Qwen3's opens an empty think block when ``enable_thinking`` is false)."""
    from sdzero_pl.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}",
        "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}")
    thinking = render_prompt(tokenizer, "1+1?")
    plain = render_prompt(tokenizer, "1+1?", template_kwargs={"enable_thinking": False})
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert tokenizer.decode(encode_prompts(tokenizer, ["1+1?"], None, {"enable_thinking": False})[0]) == plain
