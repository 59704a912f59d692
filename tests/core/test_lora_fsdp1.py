"""The LoRA teacher sync and the merged export under FSDP1 (``wrap_fsdp1``: the units training uses), 2 CPU processes
(gloo), float64, against the same model unsharded. Lightning's FSDPStrategy wants a GPU, so training itself with
``--trainer.strategy=fsdp`` is left to the GPU check; torch's FSDP1 runs on CPU, which is enough for what LoRA adds:
the merge of each unit's adapters into its gathered weights, written back to the shards, and the merged tensors
that the vLLM push and the export read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "checkpoints" / "tiny-random")


def _adapted(seed: int = 0):
    from sdzero_pl.core.lora import ADAPTER, LoraArgs, attach_lora, lora_layers
    from sdzero_pl.core.models import load_model

    model = attach_lora(load_model(MODEL, "float64"), LoraArgs(rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained adapter: B != 0
        for layer in lora_layers(model):
            weight = layer.lora_B[ADAPTER].weight
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * 0.05)
    return model.eval()


def _logits(model, ids):
    return model(ids).logits.detach()


def worker(rank: int, world: int, port: int) -> None:
    from torch.distributed.fsdp import ShardingStrategy

    from sdzero_pl.core.lora import adapters_off, hf_named_tensors, merge_adapters_
    from sdzero_pl.core.sharding import wrap_fsdp1

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = _adapted()
    student_before = _logits(reference, ids)
    merge_adapters_(reference)  # unsharded: the reference result
    expected = {name: t.clone() for name, t in hf_named_tensors(reference)}

    # what wrap_fsdp1 reads from Lightning's FSDPStrategy; its device_id (a CUDA index there) is the CPU device here
    strategy = SimpleNamespace(kwargs={"use_orig_params": True}, mixed_precision_config=None, cpu_offload=None,
                               sharding_strategy=ShardingStrategy.FULL_SHARD,
                               root_device=SimpleNamespace(index=torch.device("cpu")))
    sharded = wrap_fsdp1(_adapted(), strategy)
    assert merge_adapters_(sharded) == 14, "every adapted layer of the 2-layer model is merged"
    with adapters_off(sharded):  # the new teacher is the student before the sync
        torch.testing.assert_close(sharded(_logits, ids), student_before, rtol=0, atol=1e-12)
    torch.testing.assert_close(sharded(_logits, ids), student_before, rtol=0, atol=1e-12)  # student unchanged
    merged = {name: t.clone() for name, t in hf_named_tensors(sharded)}  # what the push and the export read
    assert merged.keys() == expected.keys(), sorted(set(merged) ^ set(expected))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-12, msg=name)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp1_lora_sync_and_merged_tensors_match_the_unsharded_model_with_two_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, str(_free_port())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("rank ok") == 2, done.stdout


def _run(rank: int, world: int, port: int) -> None:
    worker(rank, world, port)
    print("rank ok", flush=True)


if __name__ == "__main__":
    torch.multiprocessing.spawn(_run, args=(2, int(sys.argv[1])), nprocs=2)
