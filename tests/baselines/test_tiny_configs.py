"""The baselines' tiny configs run end to end through the command line and record their sample budget."""

import json
import sys

import pytest
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("config, flag", [("configs/tiny/rft.yaml", "--data.questions.num_questions=4"),
                                          ("configs/tiny/grpo.yaml", "--data.prompts_per_epoch=4"),
                                          ("configs/tiny/grpo_lora.yaml", "--data.prompts_per_epoch=4")])
def test_tiny_baseline_config_runs_through_main(tmp_path, monkeypatch, config, flag):
    monkeypatch.setattr(sys, "argv", ["main.py"])  # LightningCLI reads `args` only
    main(["fit", "--config", config, "--trainer.max_epochs=1", flag, f"--trainer.default_root_dir={tmp_path}",
          f"--model.init_args.export_dir={tmp_path / 'hf_model'}", f"--data.init_args.output_dir={tmp_path / 'data'}"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model") is not None
    assert json.loads((tmp_path / "data" / "budget.json").read_text())["total"]["generations"] == 4 * 4
