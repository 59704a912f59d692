"""The command line: every YAML in configs/ parses, --help documents the arguments, the tiny config runs."""

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main
from sdzero_pl.core.artifacts import is_complete

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert "configs/qwen.yaml" in CONFIGS and "configs/tiny/sdzero.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, capsys):
    subcommand = "validate" if "/eval/" in config else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", config, "--print_config"])  # parses and type-checks, instantiates nothing
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_help_documents_module_and_data_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "sdzero_pl.phase2.SelfDistillModule"])
    text = capsys.readouterr().out
    assert "--model.top_k" in text and "teacher top-k ids the divergence is computed over" in text
    assert "--model.optim.lr" in text and "AdamW learning rate (paper: 5e-6)" in text  # a group's field docs
    assert "default: 20" in text.split("--model.optim.warmup_steps")[-1][:300]  # Phase 2's own default
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", "sdzero_pl.phase2.OnPolicyDataModule"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "questions per epoch (all ranks together)" in text
    assert "--data.questions.dataset" in text and "hub dataset name, or a local .json" in text
    assert "--data.control.preset" in text and "reference code's" in text


@pytest.mark.parametrize("module, defaults", [
    ("sdzero_pl.phase1.SelfReviseSFTModule", {"lr": "5e-06", "weight_decay": "0.0001", "schedule": "cosine"}),
    ("sdzero_pl.baselines.GRPOModule", {"lr": "1e-06", "weight_decay": "0.1", "warmup_steps": "10"}),
])
def test_each_training_module_documents_its_own_optimizer_defaults(capsys, module, defaults):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", module])
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    for field, value in defaults.items():
        assert f"default: {value}" in text.split(f"--model.optim.{field} ")[-1][:300], (module, field)


def test_bad_flag_value_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        main(["fit", "--config", "configs/tiny/sdzero.yaml", "--model.init_args.top_k=0",
              f"--trainer.default_root_dir={tmp_path}"])


def test_tiny_config_runs_end_to_end_through_main(tmp_path, caplog, recwarn):
    export = tmp_path / "hf_model"
    main([
        "fit", "--config", "configs/tiny/sdzero.yaml",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.export_dir={export}",
    ])
    assert AutoModelForCausalLM.from_pretrained(export) is not None and is_complete(export)
    assert list(tmp_path.rglob("events.out.tfevents.*")), "TensorBoard events were written"
    # harmless noise is silenced: Lightning's tips, the frozen teacher's eval-mode notice
    assert "Tip:" not in caplog.text and "GPU available" in caplog.text  # other info still shows
    assert not [w for w in recwarn if "eval mode" in str(w.message) or "`__len__` defined" in str(w.message)]
