"""What a user sees when something is wrong: the project's own message in a few lines, naming the flag and the
value (or the config file, line and key), never a traceback through jsonargparse; data errors before any model
weights load; an empty question file says it is empty."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from sdzero_pl.cli import entry, main
from sdzero_pl.core.console import condense_parse_error, root_cause, short_error
from sdzero_pl.data.questions import DataError

SDZERO = "configs/tiny/sdzero.yaml"


def _run(capfd, args: list[str]) -> tuple[int, str]:
    try:
        code = entry(args)
    except SystemExit as exit_info:  # a parse error exits as argparse does
        code = exit_info.code
    out, err = capfd.readouterr()
    return code, out + err


@pytest.mark.parametrize("flag, expected", [
    ("--model.init_args.divergence=bogus", ["`--model.divergence` must be one of", "'bogus'"]),
    ("--model.init_args.top_k=0", ["`--model.top_k` must be >= 1, got 0"]),
    ("--data.init_args.prompts_per_epoch=0", ["`--data.prompts_per_epoch` must be >= 1, got 0"]),
    ("--model.optim.lr=-1", ["`--model.optim.lr` must be > 0, got -1.0"]),
    ("--model.init_args.model_name_or_path=/no/such/model", ["`--model.model_name_or_path`", "'/no/such/model'",
                                                             "does not exist"]),
    ("--model.init_args.model_name_or_path=nobody/no-such-model", ["`--model.model_name_or_path`",
                                                                   "'nobody/no-such-model'", "HF_HUB_OFFLINE=1"]),
    ("--model.top_k=abc", ["`--model.top_k=abc` (command line): expected int, got 'abc'"]),
    ("--model.top_kk=3", ["`--model.top_kk=3` (command line) is not an argument", "did you mean `top_k`?"]),
])
def test_a_bad_flag_is_reported_in_a_few_lines_naming_the_flag_and_the_value(capfd, tmp_path, flag, expected):
    code, text = _run(capfd, ["fit", "--config", SDZERO, f"--trainer.default_root_dir={tmp_path}", flag])
    assert code in (1, 2)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 10, text
    for piece in expected:
        assert piece in text, (piece, text)
    assert "Traceback" not in text and "Namespace(" not in text and "Given value" not in text


def test_a_yaml_typo_names_the_config_file_line_and_key(capfd, tmp_path):
    config = tmp_path / "typo.yaml"
    text = Path(SDZERO).read_text()
    config.write_text(text.replace("    top_k: 16", "    top_kk: 16"))
    line = next(i for i, row in enumerate(config.read_text().splitlines(), start=1) if "top_kk" in row)
    code, out = _run(capfd, ["fit", "--config", str(config)])
    assert code == 2 and len(out.strip().splitlines()) <= 3, out
    assert f"`model.init_args.top_kk` ({config} line {line}) is not an argument of " \
           "sdzero_pl.phase2.SelfDistillModule; did you mean `top_k`?" in out
    config.write_text(text.replace("      lr: 1.0e-3", "      lrr: 1.0e-3"))  # inside an argument group
    code, out = _run(capfd, ["fit", "--config", str(config)])
    assert "`model.init_args.optim.lrr`" in out and "did you mean `lr`?" in out
    config.write_text(text.replace("  max_epochs: 3", "  max_epochz: 3"))  # a trainer key
    code, out = _run(capfd, ["fit", "--config", str(config)])
    assert "`trainer.max_epochz`" in out and "did you mean `max_epochs`" in out


def test_the_debug_switch_shows_the_full_traceback(capfd, tmp_path, monkeypatch):
    monkeypatch.setenv("SDZERO_DEBUG", "1")
    with pytest.raises(ValueError, match="top_k"):
        entry(["fit", "--config", SDZERO, f"--trainer.default_root_dir={tmp_path}", "--model.init_args.top_k=0"])


def test_the_root_cause_is_the_projects_own_error():
    try:
        try:
            raise ValueError("`--model.top_k` must be >= 1, got 0")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nGiven value: Namespace(...)") \
                from inner
    except ValueError as outer:
        assert str(root_cause(outer)) == "`--model.top_k` must be >= 1, got 0"
        assert short_error(outer).splitlines()[0] == "error (ValueError): `--model.top_k` must be >= 1, got 0"
    message = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n'
               "  Errors:\n    - Problem with given class_path 'sdzero_pl.phase2.SelfDistillModule':\n"
               "        Option 'top_kk' is not accepted\n    - Expected a <class 'NoneType'>\n"
               "  Given value type: <class 'dict'>\n  Given value: {...}")
    assert condense_parse_error(message, []) == ("`--model.init_args.top_kk` is not an argument of "
                                                 "sdzero_pl.phase2.SelfDistillModule; did you mean `top_k`?")


# ------------------------------------------------------------------------------ data errors before weights
DATA_CONFIGS = [  # (config, flag pointing at the question file)
    ("configs/tiny/sdzero.yaml", "--data.init_args.questions.dataset"),
    ("configs/tiny/srt.yaml", "--data.init_args.questions.dataset"),
    ("configs/tiny/rft.yaml", "--data.init_args.questions.dataset"),
    ("configs/tiny/grpo.yaml", "--data.init_args.questions.dataset"),
    ("configs/tiny/sdft.yaml", "--data.init_args.questions.dataset"),
]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading model weights is an error: what these tests check happens before."""
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the data was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("config, flag", DATA_CONFIGS)
def test_data_errors_come_before_any_model_weights_load(no_weights, tmp_path, config, flag):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2", "solution": "2"}\n{"id": "b", "problem": "2+2?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: missing field 'answer'"):
        main(["fit", "--config", config, f"{flag}={bad}", f"--trainer.default_root_dir={tmp_path}"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: the dataset is empty \(no rows\)"):
        main(["fit", "--config", config, f"{flag}={empty}", f"--trainer.default_root_dir={tmp_path}"])


def test_evaluation_data_errors_come_before_the_model_loads(no_weights, tmp_path):
    empty = tmp_path / "questions.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="questions.jsonl: the dataset is empty"):
        main(["validate", "--config", "configs/eval/tiny.yaml", f"--data.init_args.benchmarks=[{empty}]",
              f"--trainer.default_root_dir={tmp_path}"])
