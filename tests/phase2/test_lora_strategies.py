"""LoRA Phase 2 with DDP and FSDP2 (ModelParallelStrategy), 2 CPU processes == 1 process in float64, through
``main.py`` as a user starts them (the same protocol as tests/phase2/test_strategies.py for the full fine-tune):
greedy rollouts, 8 rollouts per optimizer step, a teacher sync (merge + zero B, shard-local under FSDP2) after every
step, and the merged exports compared. FSDP1 (``--trainer.strategy=fsdp``) needs a GPU and is not run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdzero_pl.cli import main
from sdzero_pl.core.models import load_model
from tests.phase2.test_strategies import DDP_AND_FSDP2
from tests.phase2.test_strategies import _args as _full_args
from tests.phase2.test_strategies import _exported, _two_processes

LORA = dict(config="configs/tiny/sdzero_lora.yaml")


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return _full_args(tmp_path, name, "--model.init_args.lora.rank=4", *extra, **LORA)


@pytest.fixture(scope="module")
def single_lora_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("lora_strategies")
    main(_args(tmp_path, "single", "--trainer.devices=1", "--trainer.accumulate_grad_batches=4"))
    return _exported(tmp_path / "single" / "hf")


@pytest.mark.slow
@DDP_AND_FSDP2
def test_lora_with_two_cpu_processes_matches_one_process(single_lora_run, tmp_path, strategy):
    run = _two_processes(tmp_path, "run", "--model.init_args.lora.rank=4", *strategy, **LORA)
    start = dict(load_model("checkpoints/tiny-random", "float64").named_parameters())
    assert run.keys() == single_lora_run.keys() == start.keys()
    moved = [n for n, ref in single_lora_run.items() if not torch.equal(ref, start[n])]
    assert any(".self_attn." in n for n in moved) and any(".mlp." in n for n in moved)  # the merged adapters
    for name, ref in single_lora_run.items():
        torch.testing.assert_close(run[name], ref, rtol=0, atol=1e-12, msg=name)
