"""Loading models and tokenizers from a hub id or a local directory, the one path users and tests share."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(name_or_path: str, dtype: str = "bfloat16", attn_implementation: str | None = None) -> PreTrainedModel:
    """A causal LM from a hub id or a local HF directory, in ``dtype``."""
    _check_local(name_or_path)
    kwargs = {"dtype": resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padded for generation; it must carry a chat template and a pad or EOS token."""
    _check_local(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no chat template; SD-Zero prompts need one")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos: masks are built from lengths, never from ids
    return tokenizer


def _check_local(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path.expanduser() / "config.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{name_or_path!r} is not a Hugging Face model directory (no config.json)")


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
