"""Prompts and control phrases (docs/method.md, "Notation").

``prompt`` is the question x rendered with the tokenizer's chat template, generation prompt appended, so the model
answers in the assistant turn. The control phrase P_r is chosen by the reward r and always sits between two
``"\\n\\n"`` separators inside the SAME assistant turn: ``chat(x) + y + "\\n\\n" + P_r + "\\n\\n"``. Both phases
must use the same strings, so every caller goes through :class:`ControlPhrases` / :func:`control_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

SEPARATOR = "\n\n"

# r -> P_r. "paper" is the default (arXiv 2604.12002); "qwen"/"olmo" are the reference code's presets.
CONTROL_PRESETS: dict[str, dict[int, str]] = {
    "paper": {
        1: "Let me rephrase the above solution.",
        0: "Wait, this response is not correct, let me start over.",
    },
    "qwen": {
        1: "Let me rephrase the above solution.",
        0: "Wait, this response is wrong. Let me correct it.",
    },
    "olmo": {
        1: "Let me rephrase the above solution.",
        0: "Wrong. I need to redo all.",
    },
}


def control_phrases(preset: str = "paper", correct: str | None = None, wrong: str | None = None) -> dict[int, str]:
    """The two control phrases ``{1: P_1, 0: P_0}``: a preset, optionally with either phrase overridden."""
    if preset not in CONTROL_PRESETS:
        raise ValueError(f"`control.preset` must be one of {sorted(CONTROL_PRESETS)}, got {preset!r}")
    phrases = dict(CONTROL_PRESETS[preset])
    for reward, override in ((1, correct), (0, wrong)):
        if override is not None:
            if not override.strip():
                raise ValueError(f"the control phrase for reward {reward} must not be empty")
            phrases[reward] = override
    return phrases


@dataclass(frozen=True)
class ControlPhrases:
    """The control phrases P_r (``--data.control.*``, ``--model.control.*``); Phase 1, Phase 2 and the evaluation's
    generate-then-revise must use the same ones (the Phase-1 export records them and Phase 2 checks)."""

    preset: str = "paper"
    """"paper" (default, arXiv 2604.12002), or the reference code's "qwen" / "olmo" presets."""
    correct: str | None = None
    """override of the r=1 phrase P_1 (default: the preset's, "Let me rephrase the above solution.")."""
    wrong: str | None = None
    """override of the r=0 phrase P_0 (default: the preset's)."""

    def __post_init__(self) -> None:
        self.phrases  # validates the preset and the overrides

    @property
    def phrases(self) -> dict[int, str]:
        """``{1: P_1, 0: P_0}``."""
        return control_phrases(self.preset, self.correct, self.wrong)


def control_text(phrases: dict[int, str], reward: float) -> str:
    """``"\\n\\n" + P_r + "\\n\\n"``: the delimiter inserted between y and what follows it."""
    return SEPARATOR + phrases[1 if reward >= 0.5 else 0] + SEPARATOR


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str | None = None,
                  template_kwargs: dict[str, Any] | None = None) -> str:
    """chat(x): the question as a user turn, the assistant turn opened (generation prompt appended).
    ``template_kwargs`` go to the chat template (``{"enable_thinking": False}``: a hybrid-thinking model's
    non-thinking mode, the paper's)."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(template_kwargs or {}))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], system_prompt: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of chat(x) for each question (the template already holds any special tokens)."""
    return [
        tokenizer.encode(render_prompt(tokenizer, q, system_prompt, template_kwargs), add_special_tokens=False)
        for q in questions
    ]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | Sequence[int] | None = None) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if generation_eos is not None:
        ids.extend(int(i) for i in ([generation_eos] if isinstance(generation_eos, int) else generation_eos))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation config names no eos_token_id")
    return sorted(set(ids))
