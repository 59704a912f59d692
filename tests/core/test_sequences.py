"""Sequence surgery: teacher = chat(x) + y' + P_r + y (or teacher_prefix + y), alignment with the student's y,
padding, length budget."""

import torch

from sdzero_pl.core.sequences import (
    build_distill_example, build_prefixed_example, collate_distill, pad_sequences, position_ids, select_targets,
    strip_stop
)

EOS = 9
PROMPT, CONTROL = [1, 2, 3], [7, 8]


def test_teacher_mask_covers_second_copy_only():
    ex = build_distill_example(PROMPT, [4, 5, 6, EOS], CONTROL, [EOS], max_teacher_len=100)
    assert ex.teacher_ids == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, EOS]
    assert ex.teacher_mask == [0] * 8 + [1] * 4
    assert ex.student_ids == [1, 2, 3, 4, 5, 6, EOS]
    assert ex.student_mask == [0, 0, 0, 1, 1, 1, 1]
    masked_t = [t for t, m in zip(ex.teacher_ids, ex.teacher_mask) if m]
    masked_s = [t for t, m in zip(ex.student_ids, ex.student_mask) if m]
    assert masked_t == masked_s == [4, 5, 6, EOS]


def test_end_of_turn_is_stripped_from_the_first_copy_only():
    ex = build_distill_example(PROMPT, [4, EOS, EOS], CONTROL, [EOS], 100)
    assert ex.teacher_ids[3:6] == [4, 7, 8]  # first copy: no EOS before the control phrase
    assert ex.teacher_ids[-3:] == [4, EOS, EOS]


def test_truncated_completion_without_stop_keeps_every_token():
    ex = build_distill_example(PROMPT, [4, 5, 6], CONTROL, [EOS], 100)
    assert ex.teacher_ids == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6]
    assert sum(ex.teacher_mask) == 3 and not ex.truncated


def test_length_budget_truncates_y_in_both_sequences():
    y = [4, 5, 6, 10, 11, 12, EOS]
    ex = build_distill_example(PROMPT, y, CONTROL, [EOS], max_teacher_len=11)  # 3 + 2 + 2L <= 11 -> L = 3
    assert ex.truncated
    assert ex.student_ids == PROMPT + [4, 5, 6]
    assert ex.teacher_ids == PROMPT + [4, 5, 6] + CONTROL + [4, 5, 6]
    assert len(ex.teacher_ids) <= 11 and ex.num_tokens == 3


def test_budget_counts_the_first_copy_without_its_end_of_turn_token():
    # |x| + 2|y| + |delimiter| = 3 + 8 + 2 = 13, but the first copy has no EOS: the teacher sequence is 12 tokens
    y = [4, 5, 6, EOS]
    whole = build_distill_example(PROMPT, y, CONTROL, [EOS], max_teacher_len=12)
    assert not whole.truncated and len(whole.teacher_ids) == 12 and whole.num_tokens == 4
    cut = build_distill_example(PROMPT, y, CONTROL, [EOS], max_teacher_len=11)  # (11 - 3 - 2) // 2 = 3 tokens
    assert cut.truncated and cut.student_ids == PROMPT + [4, 5, 6] and len(cut.teacher_ids) == 11


def test_budget_keeps_the_longest_prefix_that_fits():
    import random

    rng = random.Random(0)
    for _ in range(300):
        prompt, control = [1] * rng.randint(1, 6), [7] * rng.randint(1, 3)
        y = [rng.randint(2, 8) for _ in range(rng.randint(1, 10))] + ([EOS] if rng.random() < 0.5 else [])
        budget = rng.randint(2, 30)
        ex = build_distill_example(prompt, y, control, [EOS], budget)
        kept = ex.num_tokens
        assert ex.student_ids == prompt + y[:kept] and ex.teacher_ids[-kept or len(ex.teacher_ids):] == y[:kept]
        if kept:
            assert len(ex.teacher_ids) <= budget
        if ex.truncated and kept + 1 <= len(y):  # one more token would not fit
            longer = prompt + strip_stop(y[: kept + 1], [EOS]) + control + y[: kept + 1]
            assert len(longer) > budget
        assert ex.truncated == (len(prompt) + len(strip_stop(y, [EOS])) + len(control) + len(y) > budget)


def test_prompt_that_does_not_fit_gives_zero_loss():
    ex = build_distill_example([1] * 20, [4, 5, EOS], CONTROL, [EOS], max_teacher_len=10)
    assert ex.num_tokens == 0 and sum(ex.teacher_mask) == 0


def test_strip_stop_handles_pad_equal_to_eos():
    assert strip_stop([4, 5, EOS, EOS, EOS], [EOS]) == [4, 5]
    assert strip_stop([EOS], [EOS]) == []


def _batch(side, pad):
    examples = [
        build_distill_example(PROMPT, [4, 5, EOS], CONTROL, [EOS], 100),
        build_distill_example([1, 2, 3, 3, 3], [6, EOS], CONTROL, [EOS], 100),
        build_distill_example(PROMPT, [4, 5, 6, 6, 6], CONTROL, [EOS], 100),  # truncated by max_new_tokens
    ]
    return collate_distill(examples, pad_id=pad, side=side)


def test_second_copy_aligns_with_student_tokens_under_left_and_right_padding_with_pad_equal_eos():
    for side in ("left", "right"):
        batch = _batch(side, pad=EOS)
        hidden_s = batch["student_ids"].unsqueeze(-1).float()  # stand-in hidden state: the token id itself
        hidden_t = batch["teacher_ids"].unsqueeze(-1).float()
        s_h, s_targets = select_targets(hidden_s, batch["student_ids"], batch["student_mask"])
        t_h, t_targets = select_targets(hidden_t, batch["teacher_ids"], batch["teacher_mask"])
        assert s_targets.tolist() == t_targets.tolist() == [4, 5, EOS, 6, EOS, 4, 5, 6, 6, 6]
        # the hidden state that predicts y_t is the token before it: last prompt/control token, then y_<t
        assert s_h.squeeze(-1).tolist() == [3, 4, 5, 3, 6, 3, 4, 5, 6, 6]
        assert t_h.squeeze(-1).tolist() == [8, 4, 5, 8, 6, 8, 4, 5, 6, 6]
        # attention masks come from lengths, so pad == eos does not hide a real EOS
        assert batch["student_attention_mask"].sum().item() == 6 + 7 + 8


def test_position_ids_count_real_tokens_only():
    left = pad_sequences([[5, 6, 7], [8]], 0, "left")
    mask = pad_sequences([[1, 1, 1], [1]], 0, "left")
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    right_mask = pad_sequences([[1, 1, 1], [1]], 0, "right")
    assert position_ids(right_mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert left.tolist() == [[5, 6, 7], [0, 0, 8]]


def test_masks_exclude_prompt_and_padding():
    batch = _batch("right", pad=0)
    for role in ("student", "teacher"):
        mask, attn = batch[f"{role}_mask"], batch[f"{role}_attention_mask"]
        assert not torch.any(mask.bool() & ~attn.bool())  # no padding in the loss
    assert batch["student_mask"][:, :3].sum() == 0  # no prompt token in the loss


TEACHER_PREFIX = [20, 21, 22, 23]  # e.g. chat(x with a demonstration): longer than the student's prompt


def test_prefixed_teacher_scores_its_only_copy_of_y_aligned_with_the_student():
    ex = build_prefixed_example(PROMPT, TEACHER_PREFIX, [4, 5, EOS], max_teacher_len=100)
    assert ex.student_ids == PROMPT + [4, 5, EOS] and ex.student_mask == [0, 0, 0, 1, 1, 1]
    assert ex.teacher_ids == TEACHER_PREFIX + [4, 5, EOS] and ex.teacher_mask == [0, 0, 0, 0, 1, 1, 1]
    assert not ex.truncated and ex.num_tokens == 3
    for side in ("left", "right"):
        examples = [ex, build_prefixed_example([1, 2], [30], [6, 7, 8, EOS], 100)]
        batch = collate_distill(examples, pad_id=EOS, side=side)  # pad == eos
        s_h, s_targets = select_targets(batch["student_ids"].unsqueeze(-1).float(), batch["student_ids"],
                                        batch["student_mask"])
        t_h, t_targets = select_targets(batch["teacher_ids"].unsqueeze(-1).float(), batch["teacher_ids"],
                                        batch["teacher_mask"])
        assert s_targets.tolist() == t_targets.tolist() == [4, 5, EOS, 6, 7, 8, EOS]
        # y_0 is predicted from the last context token (the student's prompt / the teacher's prefix), then y_<t
        assert s_h.squeeze(-1).tolist() == [3, 4, 5, 2, 6, 7, 8]
        assert t_h.squeeze(-1).tolist() == [23, 4, 5, 30, 6, 7, 8]


def test_prefixed_length_budget_truncates_y_in_both_sequences():
    ex = build_prefixed_example(PROMPT, TEACHER_PREFIX, [4, 5, 6, 10, 11, EOS], max_teacher_len=7)  # 4 + L <= 7
    assert ex.truncated and ex.num_tokens == 3
    assert ex.student_ids == PROMPT + [4, 5, 6] and ex.teacher_ids == TEACHER_PREFIX + [4, 5, 6]
    assert sum(ex.teacher_mask) == sum(ex.student_mask) == 3


def test_prefixed_teacher_prefix_that_fills_the_budget_gives_zero_loss():
    ex = build_prefixed_example(PROMPT, [20] * 10, [4, 5, EOS], max_teacher_len=10)
    assert ex.truncated and ex.num_tokens == 0 and sum(ex.teacher_mask) == 0
    assert ex.student_ids == PROMPT and ex.teacher_ids == [20] * 10
