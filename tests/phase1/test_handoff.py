"""The Phase-1 hand-off record: written next to the SRT model, read by Phase 2, mismatches named with both values."""

import json

import pytest

from sdzero_pl.core.prompts import ControlPhrases
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase1.handoff import HANDOFF_FILE, Handoff, check_handoff, read_handoff, write_handoff

SOURCE = QuestionSource("data/q.jsonl", instruction=" Box it.", system_prompt="Be brief.")


def test_the_record_round_trips_and_a_model_without_one_has_none(tmp_path):
    handoff = Handoff.of(SOURCE, ControlPhrases("qwen"), ["q1", "q2"], {"generations": 8, "tokens": 80})
    write_handoff(tmp_path, handoff)
    assert read_handoff(tmp_path) == handoff and json.loads((tmp_path / HANDOFF_FILE).read_text())["format"] == 1
    assert read_handoff(tmp_path / "elsewhere") is None and read_handoff("Qwen/Qwen3-4B-Instruct-2507") is None
    (tmp_path / HANDOFF_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a Phase-1 hand-off record"):
        read_handoff(tmp_path)


def test_the_same_settings_pass_and_each_difference_is_named_with_both_values():
    handoff = Handoff.of(SOURCE, ControlPhrases("qwen"), [], {})
    check_handoff(handoff, SOURCE, ControlPhrases("qwen"), "runs/srt/hf_model")
    check_handoff(handoff, SOURCE, None, "runs/srt/hf_model")  # a teacher that does not read P_r
    with pytest.raises(ValueError, match=r"runs/srt/hf_model was trained by Phase 1 with control preset 'qwen' .*"
                                         r"Wait, this response is wrong\. Let me correct it\..*"
                                         r"--data.control.preset=paper.*start over.*--data.control.preset=qwen"):
        check_handoff(handoff, SOURCE, ControlPhrases("paper"), "runs/srt/hf_model")
    with pytest.raises(ValueError, match=r"--data.questions.system_prompt='Be brief.'.*Phase 2 has None"):
        check_handoff(handoff, QuestionSource("data/q.jsonl", instruction=" Box it."), ControlPhrases("qwen"), "m")
    with pytest.raises(ValueError, match="--data.ignore_handoff=true"):
        check_handoff(handoff, QuestionSource("data/q.jsonl"), ControlPhrases("qwen"), "m")


def test_chat_template_arguments_travel_in_the_record_and_a_difference_is_named():
    thinking_off = QuestionSource("data/q.jsonl", chat_template_kwargs={"enable_thinking": False})
    handoff = Handoff.of(thinking_off, ControlPhrases(), [], {})
    assert handoff.chat_template_kwargs == {"enable_thinking": False}
    check_handoff(handoff, thinking_off, ControlPhrases(), "m")
    with pytest.raises(ValueError, match=r"--data.questions.chat_template_kwargs=\{'enable_thinking': False\}"):
        check_handoff(handoff, QuestionSource("data/q.jsonl"), ControlPhrases(), "m")
    old = {k: v for k, v in Handoff.of(SOURCE, ControlPhrases(), [], {}).__dict__.items() if k != "chat_template_kwargs"}
    assert Handoff(**old).chat_template_kwargs is None  # records written before the field still read
