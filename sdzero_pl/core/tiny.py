"""Tiny Qwen3-style models and a character-level chat tokenizer, built locally with no download.

Used by the tests (a random model saved to a temp dir and loaded back through ``from_pretrained``), by the GPU
check script and by the embedded demo. ``head_dim`` defaults to 32 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen-style ChatML; the generation prompt opens the assistant turn that the model continues.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CHARS = string.printable  # digits, letters, punctuation, whitespace


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """One token per character plus ChatML specials; ``<|im_end|>`` is EOS, ``<|endoftext|>`` is padding."""
    specials = [PAD, IM_START, IM_END]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    unk = "\x00"
    vocab.setdefault(unk, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=unk,
        additional_special_tokens=[IM_START],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """A tiny Qwen3 config: :data:`TINY_QWEN3` with ``overrides`` of its fields."""
    unknown = sorted(set(overrides) - set(TINY_QWEN3))
    if unknown:  # Qwen3Config would keep an unknown keyword as an attribute without a word
        raise TypeError(f"tiny_qwen3_config: unknown fields {unknown} (known: {sorted(TINY_QWEN3)})")
    return Qwen3Config(vocab_size=vocab_size, **{**TINY_QWEN3, **overrides}, bos_token_id=None)


TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
                  eos_token_id=None, pad_token_id=None)
"""The tiny model's shapes (hidden 64, 2 layers, head_dim 32): what the tests and the demo's random base use."""


def save_tiny_model(
    directory: str | Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, **config_kwargs
) -> Path:
    """Build a random tiny Qwen3 plus tokenizer and save both as a standard HF directory."""
    directory = Path(directory)
    tokenizer = tokenizer or build_char_tokenizer()
    config = tiny_qwen3_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
