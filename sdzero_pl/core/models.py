"""Models and tokenizers: loading (hub id or local directory, the one path users and tests share), the decoder
forward every loss uses, and the Hugging Face export every training module ends with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_dtypes(*dtypes: str | None) -> None:
    """Every given dtype name must be known (None: not set)."""
    for dtype in dtypes:
        if dtype is not None:
            resolve_dtype(dtype)


def load_model(name_or_path: str, dtype: str = "bfloat16", attn_implementation: str | None = None,
               flag: str = "--model.model_name_or_path") -> PreTrainedModel:
    """A causal LM from a hub id or a local HF directory, in ``dtype``; ``flag`` names the argument in errors."""
    check_model_source(name_or_path, flag)
    kwargs = {"dtype": resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_policy(name_or_path: str, dtype: str, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """The model a training module trains, in train mode; with ``gradient_checkpointing``, activations are recomputed
    in backward (non-reentrant) and the KV cache is off (the export switches it back on)."""
    model = load_model(name_or_path, dtype)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_tokenizer(name_or_path: str, flag: str = "--model.model_name_or_path") -> PreTrainedTokenizerBase:
    """The tokenizer, left-padded for generation; it must carry a chat template and a pad or EOS token. Called in
    the modules' constructors, so a wrong model path fails before any weights load."""
    check_model_source(name_or_path, flag)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    if tokenizer.chat_template is None:
        raise ValueError(f"`{flag}`: the tokenizer of {name_or_path!r} has no chat template; SD-Zero prompts need one")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"`{flag}`: the tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos: masks are built from lengths, never from ids
    return tokenizer


def check_model_source(name_or_path: str, flag: str) -> None:
    """Fail now, naming the flag and the value, when ``name_or_path`` cannot be a model: a local path that is not an
    HF model directory, or a hub id that cannot be found (offline: not in the local cache). Reads the config only
    (a few KB), never weights."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"`{flag}`: {name_or_path!r} does not exist (a local model directory was meant: "
                                    "it starts with '.', '/' or '~')")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"`{flag}`: {name_or_path!r} is not a Hugging Face model directory (no "
                                    "config.json; an unfinished export has no manifest and no config either)")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        where = ("no model of that name is in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                 "downloading it" if offline else
                 f"the Hugging Face Hub has no model of that name, or it is gated ({type(error).__name__})")
        raise FileNotFoundError(f"`{flag}`: {name_or_path!r} is not a local directory, and {where}") from None


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack that returns final (normed) hidden states, i.e. the model without its LM head."""
    return model.get_decoder()


def output_weight(model: PreTrainedModel) -> torch.Tensor:
    """The LM head's (V, H) weight. Only plain, bias-free linear heads are supported (Qwen3, Olmo-3, Llama)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise NotImplementedError(f"{type(model).__name__}: the LM head must be a bias-free nn.Linear")
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attribute, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__}: `{attribute}` heads are not supported")
    return head.weight


def hidden_states(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) of the decoder for right- or left-padded ``ids`` (B, T).

    Positions are counted over real tokens (:func:`~sdzero_pl.core.sequences.position_ids`), so padding on either
    side gives the same states; no KV cache is built (every caller scores whole sequences). Every loss and score in
    the project goes through here, then multiplies with :func:`output_weight` itself."""
    from sdzero_pl.core.sequences import position_ids

    out = backbone(model)(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          use_cache=False)
    return out.last_hidden_state


EXPORT_KEY = "sdzero_export_dir"  # where a run exports, recorded in its checkpoints (a resumed run exports there too)


def export_path(trainer, export_dir: str | None, resumed: str | None = None) -> str:
    """Where a training module's final HF model goes: ``export_dir`` if set; else the place recorded in the checkpoint
    this run resumed from (``resumed``, :data:`EXPORT_KEY`), so a resumed run exports where the run it resumes would
    have, whatever its ``default_root_dir``; else ``<default_root_dir>/hf_model``."""
    from lightning.pytorch.utilities import rank_zero_info

    default = os.path.join(trainer.default_root_dir, "hf_model")
    if export_dir:
        return export_dir
    if resumed and os.path.abspath(resumed) != os.path.abspath(default):
        rank_zero_info(f"exporting to {resumed}, where the resumed run exports (recorded in its checkpoint); "
                       f"`--model.export_dir` chooses another place")
    return resumed or default


def export_hf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path,
              state_dict: dict[str, torch.Tensor] | None = None, dtype: str | None = None,
              budget: Path | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Save a trained model and its tokenizer as a standard Hugging Face directory (``from_pretrained`` and vLLM
    load it), atomically: everything is written into a temporary sibling that is renamed to ``path`` only once
    complete, with a manifest (:func:`~sdzero_pl.core.artifacts.staged_dir`); a kill at any point leaves ``path``
    as it was, and :func:`~sdzero_pl.core.artifacts.is_complete` tells a finished export from anything else.

    ``model`` may be a sharding wrapper (its HF model is saved); ``state_dict``: the full weights gathered from
    shards (:func:`~sdzero_pl.core.sharding.gather_state_dict`); ``dtype``: convert the saved weights (e.g.
    "bfloat16"; the live model is converted in place, training is over); ``budget``: a sample-budget ledger copied
    next to the weights as ``budget.json`` (it must exist); ``extra(directory)``: writes more files into the
    export before it is published (Phase 1's hand-off record, a merged ledger). The saved config re-enables the KV
    cache that gradient checkpointing switched off. Other kinds of export (an adapter only) use ``staged_dir``
    the same way."""
    from sdzero_pl.core.artifacts import staged_dir
    from sdzero_pl.core.sharding import hf_model

    if budget is not None and not Path(budget).is_file():
        raise FileNotFoundError(f"the sample-budget ledger {budget} to export with the model does not exist")
    hf = hf_model(model)
    hf.config.use_cache = True  # the saved model generates with its KV cache
    if dtype is not None:
        target = resolve_dtype(dtype)
        if state_dict is not None:
            state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
        else:
            hf.to(target)
    with staged_dir(path, kind="hf_model") as directory:
        hf.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(directory)
        if budget is not None:
            shutil.copy(budget, directory / "budget.json")
        if extra is not None:
            extra(directory)
    return Path(path)
