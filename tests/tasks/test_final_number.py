"""FinalNumberReward: the last box wins where there is one, else the last number; compared by math-verify."""

from __future__ import annotations

from sdzero_pl.tasks import FinalNumberReward
from sdzero_pl.tasks.final_number import final_answer


def test_final_answer_prefers_the_last_box_then_the_last_number():
    assert final_answer("7+5=12. \\boxed{12} then 13") == "12"
    assert final_answer("Ben has 17 - 8 = 9 pens.\n#### 11\nThe answer is 11.") == "11"
    assert final_answer("It costs 1,250 coins.") == "1250"
    assert final_answer("-3 is the answer") == "-3"
    assert final_answer("no digits here") is None


def test_rewards_on_unboxed_answers():
    reward = FinalNumberReward()
    try:
        batch = reward(["The answer is 12.", "7 + 5 = 13", "\\boxed{12} or 13", "twelve"], ["12"] * 4)
    finally:
        reward.close()
    assert batch.rewards == [1.0, 0.0, 1.0, 0.0]
