"""Length-aware micro-batching (sdzero_pl/data/batching.py): the planner against brute force, equal micro-batch
counts on every rank and step, each step keeps its samples, the trainer's accumulation, errors that name the flag.
The update equality through a real Trainer is tested per module (tests/phase2, tests/phase1, tests/baselines)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sdzero_pl.data.batching import PAD, Batching, MicroBatcher, cut_micro_batches, planned_padding, split_steps


def _cost(run, lengths):
    return len(run) * max(lengths[i] for i in run)


def _partitions(items, m):
    """Every partition of ``items`` into exactly ``m`` non-empty blocks."""
    if m == 1:
        yield [items]
        return
    if len(items) < m:
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest, m - 1):
        yield [[first]] + p
    for p in _partitions(rest, m):
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1:]


def test_the_cut_is_optimal_against_brute_force_over_all_partitions():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 7)
        lengths = [rng.randint(1, 20) for _ in range(n)]
        budget, fixed = rng.randint(1, 60), rng.choice([0, 5, 30])
        fits = lambda run: len(run) == 1 or _cost(run, lengths) <= budget  # noqa: E731  (a long one alone)
        feasible = [p for m in range(1, n + 1) for p in _partitions(list(range(n)), m) if all(fits(r) for r in p)]
        total = lambda p, c: sum(_cost(r, lengths) + c for r in p)  # noqa: E731
        runs = cut_micro_batches(lengths, budget, fixed)
        assert sorted(i for r in runs for i in r) == list(range(n)) and all(fits(r) for r in runs)
        assert total(runs, fixed) == min(total(p, fixed) for p in feasible), (lengths, budget, fixed, runs)
        m = rng.randint(min(len(p) for p in feasible), n)
        runs = cut_micro_batches(lengths, budget, count=m)
        assert len(runs) == m and all(fits(r) for r in runs)
        assert total(runs, 0) == min(total(p, 0) for p in feasible if len(p) == m), (lengths, budget, m, runs)


def _trainer(accumulate: int, reduce=lambda tensor, reduce_op: tensor):
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    return SimpleNamespace(accumulate_grad_batches=accumulate, strategy=strategy)


def _plans_on_ranks(batching, counts, lengths, accumulate):
    """Each rank's plan, the max-reduce across ranks simulated: pass 1 records each rank's need, pass 2 agrees."""
    needs = []
    for steps, lens in zip(counts, lengths):
        MicroBatcher(batching).plan(_trainer(accumulate, lambda t, reduce_op: needs.append(int(t)) or t), steps, lens)
    trainers = [_trainer(accumulate, lambda t, reduce_op: torch.tensor(max(needs))) for _ in counts]
    return needs, trainers, [MicroBatcher(batching).plan(t, c, l) for t, c, l in zip(trainers, counts, lengths)]


def test_tokens_plan_keeps_each_steps_samples_and_gives_every_rank_the_same_count():
    rng = random.Random(1)
    lengths = [[int(min(2000, max(50, rng.lognormvariate(5.5, 1.0)))) for _ in range(24)] for _ in range(2)]
    counts = [split_steps(list(range(24)), 4, 3) for _ in range(2)]  # 2 steps of 12 samples on each of 2 ranks
    needs, trainers, plans = _plans_on_ranks(Batching("tokens", 4000, 300), counts, lengths, accumulate=3)
    count = max(needs)
    for trainer, plan, lens, steps in zip(trainers, plans, lengths, counts):
        assert plan.micro_batches_per_step == count and trainer.accumulate_grad_batches == count
        for planned, original in zip(plan.steps, steps):
            assert len(planned) == count
            assert sorted(i for mb in planned for i in mb if i != PAD) == sorted(i for mb in original for i in mb)
            for mb in planned:
                real = [lens[i] for i in mb if i != PAD]
                assert len(real) == 1 or len(real) * max(real) <= 4000
        assert planned_padding(plan.steps, lens, 50) < planned_padding(steps, lens, 50)


def test_a_sample_over_the_budget_is_alone_and_counted_and_short_steps_get_padding_micro_batches():
    trainer = _trainer(2)
    plan = MicroBatcher(Batching("tokens", 100, 50)).plan(trainer, [[[0, 1], [2, 3]], [[4]]], [300, 10, 10, 10, 10])
    assert plan.over_budget == 1 and plan.micro_batches_per_step == 2
    assert plan.steps[0] == [[0], [1, 2, 3]]
    assert plan.steps[1] == [[4], [PAD]]  # the last step has one sample: a masked micro-batch keeps the count


def test_count_mode_leaves_the_plan_and_the_trainer_alone():
    trainer = _trainer(4)
    batcher = MicroBatcher(Batching())
    steps = split_steps(list(range(10)), 2, 4)
    plan = batcher.plan(trainer, steps, [5] * 10)
    assert plan.steps == steps and plan.micro_batches_per_step is None and trainer.accumulate_grad_batches == 4


def test_the_users_accumulation_sizes_the_steps_until_released():
    trainer = _trainer(4)
    batcher = MicroBatcher(Batching("tokens", 10))
    assert batcher.accumulation(trainer) == 4
    batcher.plan(trainer, [[[0, 1, 2]]], [10, 10, 10])
    assert trainer.accumulate_grad_batches == 3 and batcher.accumulation(trainer) == 4
    batcher.release(trainer)
    assert trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize("kwargs, flag", [({"mode": "packed"}, "batching.mode"), ({"max_tokens": 0}, "max_tokens"),
                                           ({"micro_batch_cost": -1}, "micro_batch_cost")])
def test_bad_batching_flags_name_the_flag_and_value(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Batching(**kwargs)
