"""The dry run: every YAML in configs/ runs one optimizer step (or its validation) on the CPU with the tiny
stand-in; wrong hub names, held-out overlaps and short question pools fail naming the config key; what it replaced
is printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdzero_pl.pipelines.dryrun import Options, dry_run, main
from sdzero_pl.pipelines.standins import ScriptedRollout, synthetic_local_rows

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def options(dryrun_workdir) -> Options:
    return Options(steps=1, workdir=dryrun_workdir)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_dry_runs_on_the_cpu(config, options):
    report = dry_run(config, options)
    assert report.problem is None, report.text()
    if report.subcommand == "fit":
        assert len(report.learning_rates) == 1 and report.learning_rates[0] > 0, report.text()
        assert any(name.endswith(("hf_model/config.json", "export/config.json")) for name in report.outputs)
    else:
        assert any(name.endswith("eval_val.json") for name in report.outputs), report.text()
    if yaml.safe_load(Path(config).read_text())["trainer"].get("accelerator") == "gpu":  # a cluster config
        replaced = {key for key, _, _ in report.replaced}
        assert {"trainer.accelerator", "model.init_args.model_name_or_path"} <= replaced, report.text()


def _variant(tmp_path: Path, config: str, edit) -> str:
    raw = yaml.safe_load(Path(config).read_text())
    edit(raw)
    path = tmp_path / Path(config).name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _questions(raw: dict) -> dict:
    return raw["data"]["init_args"]["questions"]


@pytest.mark.parametrize("key, value, message", [
    ("split", "test", "has no split 'test' (splits: ['train'])"),
    ("dataset_config", "solutions", "has no config 'solutions'"),
    ("id_field", "id", "has no column 'id'"),
])
def test_a_wrong_hub_name_fails_before_running_naming_the_key(tmp_path, options, key, value, message):
    config = _variant(tmp_path, "configs/qwen_srt.yaml", lambda raw: _questions(raw).update({key: value}))
    report = dry_run(config, options)
    assert report.problem[0] == f"data.init_args.questions.{key}" and message in report.problem[1]
    assert not report.learning_rates  # the static check stopped it: nothing ran


def test_a_config_without_the_required_hub_config_name_fails(tmp_path, options):
    config = _variant(tmp_path, "configs/qwen_code_srt.yaml", lambda raw: _questions(raw).update(dataset_config=None))
    problem = dry_run(config, options).problem
    assert problem[0] == "data.init_args.questions.dataset_config" and "a config name is required" in problem[1]


def test_training_on_the_held_out_rows_is_a_problem(tmp_path, options):
    config = _variant(tmp_path, "configs/qwen.yaml", lambda raw: _questions(raw).pop("skip_last"))
    key, message = dry_run(config, options).problem
    assert key == "data.init_args.questions.skip_last"
    assert "500 of them the `openr1` benchmark's held-out rows (93,233-93,732)" in message


def test_phase2_on_code_fails_early_when_phase1_leaves_too_few_problems(tmp_path, options):
    """configs/qwen_code_srt.yaml (Phase 1) is emulated: its 5,000 problems are left out of Phase 2's pool."""
    config = _variant(tmp_path, "configs/qwen_code.yaml", lambda raw: raw["trainer"].update(max_epochs=70))
    config_dir = Path("configs")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "qwen_code_srt.yaml").write_text((config_dir / "qwen_code_srt.yaml").read_text())
    moved = tmp_path / "configs" / "qwen_code.yaml"
    Path(config).rename(moved)
    report = dry_run(str(moved), options)
    key, message = report.problem
    assert key == "data.init_args.prompts_per_epoch"
    assert "5,000 used by Phase 1" in message and "70 epochs x `--data.prompts_per_epoch` 128 = 8,960" in message
    assert any("qwen_code_srt.yaml (Phase 1)" in note for note in report.notes)


def test_a_dataset_the_schemas_do_not_know_gets_rows_from_the_config_field_names(tmp_path, options):
    def edit(raw):
        _questions(raw).update(dataset="someone/new-math", question_field="q", answer_field="a", id_field="key")
        raw["trainer"]["max_epochs"] = 1
    report = dry_run(_variant(tmp_path, "configs/tiny/sdzero.yaml", edit), options)
    assert report.problem is None, report.text()
    assert any("someone/new-math is not in sdzero_pl/data/hub_schemas.json" in note for note in report.notes)
    assert report.scripted > 0  # its synthetic rows carry answers the scripted completions give


def test_main_prints_what_it_replaced_and_the_first_problem(tmp_path, capsys, dryrun_workdir):
    config = _variant(tmp_path, "configs/qwen.yaml", lambda raw: _questions(raw).update(split="validation"))
    assert main([config, "--workdir", str(dryrun_workdir)]) == 1
    out = capsys.readouterr().out
    assert "model.init_args.model_name_or_path: runs/qwen-srt/hf_model ->" in out
    assert "trainer.precision: bf16-mixed -> 32-true" in out and "VLLMRollout (max_new_tokens 8192) ->" in out
    assert "PROBLEM at data.init_args.questions.split:" in out and "0 of 1 config(s) OK" in out


def test_scripted_answers_come_from_markers_programs_or_known_rows():
    rollout = ScriptedRollout()
    math, code = synthetic_local_rows({"question": "q", "answer": "a"}, False, 1)[0], \
        synthetic_local_rows({"question": "q", "answer": "a"}, True, 1)[0]
    assert rollout.answer("<|im_start|>user\n" + math["q"]) == "3+5=8. \\boxed{8}"
    assert "```python\na, b = map(int, input().split())" in rollout.answer(code["q"])
    rollout.solutions = {"What is 13+14?": "The answer is \\boxed{27}."}
    assert rollout.answer("user: What is 13+14? Answer in \\boxed{}.") == "The answer is \\boxed{27}."
    assert rollout.answer("an unknown question") is None


def test_any_hugging_face_directory_can_be_the_stand_in(tiny_model_dir, dryrun_workdir):
    """The seam for a pretrained stand-in: ``--stand_in DIR`` replaces every model the config cannot run here."""
    report = dry_run("configs/qwen_grpo.yaml", Options(stand_in=tiny_model_dir, steps=1, workdir=dryrun_workdir))
    assert report.problem is None, report.text()
    assert ("model.init_args.model_name_or_path", "Qwen/Qwen3-4B-Instruct-2507", tiny_model_dir) in report.replaced
    missing = dry_run("configs/qwen_grpo.yaml", Options(stand_in="nowhere", workdir=dryrun_workdir)).problem
    assert "`--stand_in`: 'nowhere' is neither 'tiny' nor a Hugging Face model directory" in missing[1]
