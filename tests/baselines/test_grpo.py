"""GRPO (DAPO variant) through a real Trainer on the tiny model: it learns a toy reward, the first step's ratio is
1, dynamic sampling drops zero-signal groups and pads ranks with masked micro-batches, the budget is counted."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero_pl.baselines.grpo import GRPOModule, build_rollout_example, plan_micro_batches
from sdzero_pl.baselines.grpo_data import GroupRolloutDataModule
from sdzero_pl.core.models import load_tokenizer
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.core.prompts import encode_prompts
from sdzero_pl.data.batching import Batching
from sdzero_pl.data.questions import QuestionSource, load_questions
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import RewardBatch, Verifier
from tests.helpers import DIGITS, CountingRollout, LongTailRollout, StartsWithDigit

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class AlwaysRight(Verifier):
    def __call__(self, completions, answers):
        return RewardBatch([1.0] * len(completions))


@torch.no_grad()
def digit_probability(model, tokenizer, questions) -> float:
    """Exact mean probability that the first completion token is a digit (no sampling noise)."""
    digits = tokenizer.convert_tokens_to_ids(list(DIGITS))
    total = 0.0
    for prompt in encode_prompts(tokenizer, [q.question for q in questions]):
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
        total += float(logits.softmax(-1)[digits].sum())
    return total / len(questions)


class RatioProbe(L.Callback):
    """The ratio before each micro-batch's update: 1 while the policy is still the one that sampled."""

    def __init__(self):
        self.deviations = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            self.deviations.append(float(pl_module.policy_loss(batch)[1]["train/ratio_max_dev"]))


def _fit(tmp_path, model_dir, questions, *, epochs, reward, rollout=None, callbacks=(), accumulate=1, module_kw=None,
         **data_kw):
    module_kw = {"dtype": "float32", **(module_kw or {})}
    module = GRPOModule(model_dir, optim=OptimArgs(lr=1e-2), export_dir=str(tmp_path / "export"), **module_kw)
    data_kw = {"prompts_per_epoch": 8, "group_size": 8, "batch_size": 16, **data_kw}
    data = GroupRolloutDataModule(QuestionSource(questions, id_field="id", shuffle=True), reward=reward, output_dir=str(tmp_path / "grpo_data"),
                                  rollout=rollout or HFRollout(max_new_tokens=2, show_progress=False), **data_kw)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=list(callbacks))
    trainer.fit(module, data)
    return module, trainer


def test_grpo_raises_the_probability_of_rewarded_answers(tmp_path, tiny_model_dir, questions_file):
    tokenizer = load_tokenizer(tiny_model_dir)
    questions = load_questions(questions_file, id_field="id")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = digit_probability(start, tokenizer, questions)
    probe = RatioProbe()
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=4, reward=StartsWithDigit(),
                           callbacks=[probe], module_kw={"kl_coef": 1e-3})
    after = digit_probability(module.policy, tokenizer, questions)
    assert after > 2 * before and after > 0.3, (before, after)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    start_params = dict(start.named_parameters())
    assert all(not torch.equal(p, start_params[n]) for n, p in module.policy.named_parameters())
    for name, param in module.ref.named_parameters():  # the KL reference is frozen
        assert torch.equal(param, start_params[name]) and not param.requires_grad
    assert float(trainer.callback_metrics["train/kl_epoch"]) > 0
    # 8 questions x 8 completions -> 4 micro-batches of 16 (fewer when groups carry no signal), 1 step each
    assert probe.deviations[0] < 1e-5, "first micro-batch: the policy is the one that sampled, ratio 1"
    assert max(probe.deviations) > 1e-3, "later steps move the policy away from the sampler"
    ledger = json.loads((tmp_path / "grpo_data" / "budget.json").read_text())
    assert ledger["phases"]["grpo/rollout"]["generations"] == 4 * 8 * 8
    assert trainer.callback_metrics["rollout/generations"] == 64
    assert 0 < trainer.callback_metrics["rollout/generated_tokens"] <= 64 * 2
    assert json.loads((tmp_path / "export" / "budget.json").read_text()) == ledger
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    policy = dict(module.policy.named_parameters())
    for name, param in exported.named_parameters():
        torch.testing.assert_close(param, policy[name])


class AskAgain(L.Callback):
    def on_train_start(self, trainer, pl_module):
        assert trainer.estimated_stepping_batches > 0

    def on_train_batch_start(self, trainer, *args):
        trainer.datamodule.train_dataloader()


def test_dynamic_sampling_drops_all_right_groups_and_nothing_moves(tmp_path, tiny_model_dir, questions_file):
    CountingRollout.calls = 0
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=2, reward=AlwaysRight(),
                           rollout=CountingRollout(max_new_tokens=2, show_progress=False), callbacks=[AskAgain()],
                           prompts_per_epoch=4, group_size=4, batch_size=4)
    assert CountingRollout.calls == 2, "each epoch generates exactly once"
    assert trainer.global_step == 2, "one masked micro-batch per epoch keeps the step count"
    batches = trainer.datamodule._epoch[1]
    assert len(batches) == 1 and int(batches[0]["completion_mask"].sum()) == 0 and int(batches[0]["global_tokens"]) == 0
    assert trainer.callback_metrics["rollout/zero_signal_frac"] == 1.0
    assert trainer.callback_metrics["rollout/groups_kept"] == 0.0
    start_params = dict(start.named_parameters())
    for name, param in module.policy.named_parameters():  # zero gradient, no weight decay: AdamW does nothing
        assert torch.equal(param, start_params[name]), name
    ledger = json.loads((tmp_path / "grpo_data" / "budget.json").read_text())
    assert ledger["phases"]["grpo/rollout"]["generations"] == 2 * 4 * 4  # dropped groups were still generated


def test_ppo_epochs_repeat_the_rollouts_with_one_token_count_per_step(tmp_path, tiny_model_dir, questions_file):
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=1, reward=StartsWithDigit(),
                           prompts_per_epoch=4, group_size=4, batch_size=4, ppo_epochs=2, accumulate=3,
                           dynamic_sampling=False)
    batches = trainer.datamodule._epoch[1]
    assert len(batches) == 8  # 16 sequences / 4, twice
    tokens = [int(b["completion_mask"][:, 1:].sum()) for b in batches]
    steps = [range(0, 3), range(3, 6), range(6, 8)]  # accumulate 3 over 8 micro-batches: 3 + 3 + 2
    for step in steps:
        assert all(int(batches[i]["global_tokens"]) == sum(tokens[j] for j in step) for i in step)
    assert trainer.global_step == 3
    assert torch.equal(batches[0]["old_logps"], batches[4]["old_logps"]), "the second pass reuses the old log-probs"


def test_length_aware_batching_gives_the_fixed_count_update_float64(tmp_path, tiny_model_dir, questions_file):
    kwargs = dict(epochs=2, reward=StartsWithDigit(), prompts_per_epoch=4, group_size=4, batch_size=2, ppo_epochs=2,
                  accumulate=3, module_kw={"dtype": "float64"},
                  rollout=LongTailRollout(max_new_tokens=24, temperature=1.0, show_progress=False))
    fixed, fixed_trainer = _fit(tmp_path / "a", tiny_model_dir, questions_file, **kwargs)
    aware, trainer = _fit(tmp_path / "b", tiny_model_dir, questions_file, batching=Batching("tokens", 120), **kwargs)
    assert trainer.global_step == fixed_trainer.global_step > 0
    assert (trainer.datamodule.rollout_stats["train/padding_frac"]
            < fixed_trainer.datamodule.rollout_stats["train/padding_frac"])
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).named_parameters())
    for (name, a), (_, b) in zip(fixed.policy.named_parameters(), aware.policy.named_parameters()):
        assert not torch.equal(a, start[name])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def test_micro_batch_plan_pads_ranks_to_equal_counts():
    assert plan_micro_batches(5, 2, 3) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches(5, 2, 5) == [[0, 1], [2, 3], [4], [-1], [-1]]  # a rank that kept fewer groups
    assert plan_micro_batches(0, 2, 1) == [[-1]]
    with pytest.raises(AssertionError):
        plan_micro_batches(5, 2, 2)


def test_masked_rollouts_are_context_only():
    example = build_rollout_example([5, 6], [7, 8, 2], advantage=1.5)
    assert example.completion_mask == [0, 0, 1, 1, 1] and example.advantage == 1.5
    masked = build_rollout_example([5, 6], [7, 8, 2], advantage=1.5, trained=False)
    assert masked.num_tokens == 0 and masked.advantage == 0.0 and masked.ids == example.ids


@pytest.mark.parametrize("kwargs, flag", [({"clip_low": 1.0}, "clip_low"), ({"clip_high": -1.0}, "clip_high"),
                                           ({"kl_coef": -0.1}, "kl_coef"),
                                           ({"optim": {"schedule": "step"}}, "optim.schedule")])
def test_bad_module_flags_name_the_flag(tiny_model_dir, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        GRPOModule(tiny_model_dir, **{k: OptimArgs(**v) if k == "optim" else v for k, v in kwargs.items()})


@pytest.mark.parametrize("kwargs, flag", [({"group_size": 1}, "group_size"), ({"ppo_epochs": 0}, "ppo_epochs"),
                                           ({"prompts_per_epoch": 0}, "prompts_per_epoch")])
def test_bad_data_flags_name_the_flag(questions_file, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        GroupRolloutDataModule(QuestionSource(questions_file), **kwargs)


def test_group_rollouts_need_reloading_every_epoch(tmp_path, tiny_model_dir, questions_file):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(GRPOModule(tiny_model_dir, dtype="float32"), GroupRolloutDataModule(QuestionSource(questions_file)))
