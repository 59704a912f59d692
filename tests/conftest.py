"""Shared fixtures: a tiny random Qwen3-style model + ChatML tokenizer saved once per run, loaded through the real
``from_pretrained`` path; a small question file. No test touches the network."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdzero_pl.core.tiny import save_tiny_model  # noqa: E402


def _is_vllm(item) -> bool:
    return item.path.name.endswith("vllm.py")  # test_vllm.py, test_smollm2_vllm.py


def pytest_collection_modifyitems(config, items):
    """The in-process vLLM engine pins the process to one torch thread: its tests run after all the others, and
    under pytest-xdist (``scripts/test.sh`` runs ``-n N --dist loadgroup``) all on one worker, one engine at a time."""
    items.sort(key=_is_vllm)
    for item in items:
        if _is_vllm(item):
            item.add_marker(pytest.mark.xdist_group("vllm"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core machine more threads only thrash (10-50x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random tiny Qwen3 (hidden 64, 2 layers, head_dim 32) and its tokenizer, as an HF directory."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), seed=0))


@pytest.fixture(scope="session")
def questions_file(tmp_path_factory) -> str:
    """32 one-step sums as JSONL rows {"id", "problem", "answer"}."""
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    with open(path, "w") as handle:
        for i in range(32):
            handle.write(json.dumps({"id": f"q{i}", "problem": f"What is {i}+{i + 1}?", "answer": str(2 * i + 1)}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def dryrun_workdir(tmp_path_factory):
    """One dry-run work directory per test run: the stand-in model and the schema-shaped hub mirrors (``hub/``)
    are written once and shared by every test that reads them."""
    return tmp_path_factory.mktemp("dryrun")
