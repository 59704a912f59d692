"""Sequence surgery for Phase 2 (docs/method.md, "Phase 2", steps 3 and 5): pure functions on token ids.

Student sequence: ``chat(x) + y``.  Teacher sequence: ``chat(x) + y' + "\\n\\n" + P_r + "\\n\\n" + y`` where y' is y
with any end-of-turn token stripped (the reviser continues the SAME assistant turn). The teacher scores the SECOND
copy of y: token t of the student's y lines up with token t of that copy. The delimiter is tokenized on its own
and concatenated as ids, so y's tokens are identical in both copies (re-tokenizing the joined text could merge
tokens across the boundary and break the alignment).

Baselines and controls (``OnPolicyDataModule.teacher_context``) use another teacher context in front of the SAME
y: ``teacher_prefix + y`` (SDFT: chat(x with a demonstration); the "question" control: chat(x) itself), built by
:func:`build_prefixed_example`; the teacher then scores its only copy of y.

Masks mark the y tokens themselves (targets), not the positions that predict them: the logits that score
``ids[t]`` sit at ``t - 1``; :func:`target_positions` does that shift once, for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class DistillExample:
    student_ids: list[int]  # chat(x) + y
    student_mask: list[int]  # 1 on y's tokens
    teacher_ids: list[int]  # chat(x) + strip(y) + delimiter + y (or teacher_prefix + y)
    teacher_mask: list[int]  # 1 on the second (last) copy of y
    truncated: bool  # y was cut to fit the teacher's length budget

    @property
    def num_tokens(self) -> int:
        return sum(self.student_mask)


def strip_stop(completion_ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """y without trailing end-of-turn / EOS tokens (pad == eos tokenizers included)."""
    ids = list(completion_ids)
    stops = set(stop_ids)
    while ids and ids[-1] in stops:
        ids.pop()
    return ids


def build_distill_example(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    control_ids: Sequence[int],
    stop_ids: Sequence[int],
    max_teacher_len: int,
) -> DistillExample:
    """Student and teacher sequences for one rollout, with the length budget applied.

    If ``|x| + |y'| + |delimiter| + |y|`` exceeds ``max_teacher_len``, y is truncated (in BOTH sequences) to the
    longest prefix that fits; if nothing of y fits (x alone, or x plus the delimiter, is too long), the example
    has empty masks and contributes zero loss.
    """
    prompt, completion, control = list(prompt_ids), list(completion_ids), list(control_ids)
    first_copy = strip_stop(completion, stop_ids)
    truncated = False
    if len(prompt) + len(first_copy) + len(control) + len(completion) > max_teacher_len:
        keep = max(0, (max_teacher_len - len(prompt) - len(control)) // 2)
        completion = completion[:keep]
        first_copy = strip_stop(completion, stop_ids)
        truncated = True
    student_ids = prompt + completion
    teacher_ids = prompt + first_copy + control + completion
    n = len(completion)
    return DistillExample(
        student_ids=student_ids,
        student_mask=[0] * len(prompt) + [1] * n,
        teacher_ids=teacher_ids,
        teacher_mask=[0] * (len(teacher_ids) - n) + [1] * n,
        truncated=truncated,
    )


def build_prefixed_example(
    prompt_ids: Sequence[int],
    teacher_prefix_ids: Sequence[int],
    completion_ids: Sequence[int],
    max_teacher_len: int,
) -> DistillExample:
    """Student ``chat(x) + y`` and teacher ``teacher_prefix + y`` for one rollout, with the length budget applied.

    If ``|teacher_prefix| + |y|`` exceeds ``max_teacher_len``, y is truncated (in BOTH sequences) to the longest
    prefix that fits; if the teacher prefix alone fills the budget, the example has empty masks (zero loss).
    """
    prompt, prefix, completion = list(prompt_ids), list(teacher_prefix_ids), list(completion_ids)
    truncated = len(prefix) + len(completion) > max_teacher_len
    if truncated:
        completion = completion[: max(0, max_teacher_len - len(prefix))]
    n = len(completion)
    return DistillExample(
        student_ids=prompt + completion,
        student_mask=[0] * len(prompt) + [1] * n,
        teacher_ids=prefix + completion,
        teacher_mask=[0] * len(prefix) + [1] * n,
        truncated=truncated,
    )


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> torch.Tensor:
    """Stack ragged lists into a (B, T) long tensor, padding on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            if side == "right":
                out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            else:
                out[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


def collate_distill(examples: Sequence[DistillExample], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into tensors; attention masks mark real tokens (pad == eos safe: by length)."""
    batch = {}
    for role in ("student", "teacher"):
        ids = [getattr(e, f"{role}_ids") for e in examples]
        batch[f"{role}_ids"] = pad_sequences(ids, pad_id, side)  # (B, T)
        batch[f"{role}_attention_mask"] = pad_sequences([[1] * len(s) for s in ids], 0, side)  # (B, T)
        batch[f"{role}_mask"] = pad_sequences([getattr(e, f"{role}_mask") for e in examples], 0, side)  # (B, T)
    return batch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def target_positions(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T-1) selector of the positions whose logits score a masked token (logits at t-1 score t)."""
    return mask[:, 1:].bool()


def select_targets(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict the masked tokens, and those tokens, flattened in (row, position) order.

    hidden (B, T, H), ids (B, T), mask (B, T) -> (N, H), (N,). Student and teacher rows hold the same number of
    masked tokens, so the two flattened lists line up token for token.
    """
    where = target_positions(mask)  # (B, T-1)
    return hidden[:, :-1][where], ids[:, 1:][where]
