"""LoRA Phase 2 with DDP and FSDP2 (ModelParallelStrategy), 2 CPU processes == 1 process in float64, through
``main.py`` as a user starts them (the same protocol as tests/phase2/test_strategies.py for the full fine-tune):
greedy rollouts, 8 rollouts per optimizer step, a teacher sync (merge + zero B, shard-local under FSDP2) after every
step, and the merged exports compared. FSDP1 (``--trainer.strategy=fsdp``) needs a GPU and is not run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main
from sdzero_pl.core.models import load_model

SYNC_EVERY_STEP = """\
trainer:
  callbacks:
    - class_path: callbacks.TeacherSync
      init_args:
        every_n_steps: 1
"""


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    override = tmp_path / f"{name}_callbacks.yaml"
    override.write_text(SYNC_EVERY_STEP)
    return [
        "fit", "--config", "configs/tiny/sdzero_lora.yaml", "--config", str(override),
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / name}",
        "--model.init_args.dtype=float64", f"--model.init_args.export_dir={tmp_path / name / 'hf'}",
        "--model.init_args.lora.rank=4", "--data.init_args.prompts_per_epoch=8", "--data.init_args.batch_size=2",
        "--data.init_args.rollout.init_args.temperature=0.0", "--data.init_args.rollout.init_args.max_new_tokens=16",
        "--data.init_args.rollout.init_args.show_progress=false", *extra,
    ]


def _exported(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def single_lora_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("lora_strategies")
    main(_args(tmp_path, "single", "--trainer.devices=1", "--trainer.accumulate_grad_batches=4"))
    return _exported(tmp_path / "single" / "hf")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ("--trainer.strategy=ddp",),
    ("--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
     "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1"),
], ids=["ddp", "fsdp2"])
def test_lora_with_two_cpu_processes_matches_one_process(single_lora_run, tmp_path, strategy):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = _args(tmp_path, "run", "--trainer.devices=2", "--trainer.accumulate_grad_batches=2", *strategy)
    done = subprocess.run([sys.executable, "main.py", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = _exported(tmp_path / "run" / "hf")
    start = dict(load_model("checkpoints/tiny-random", "float64").named_parameters())
    assert run.keys() == single_lora_run.keys() == start.keys()
    moved = [n for n, ref in single_lora_run.items() if not torch.equal(ref, start[n])]
    assert any(".self_attn." in n for n in moved) and any(".mlp." in n for n in moved)  # the merged adapters
    for name, ref in single_lora_run.items():
        torch.testing.assert_close(run[name], ref, rtol=0, atol=1e-12, msg=name)
