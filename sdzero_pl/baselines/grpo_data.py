"""The GRPO baseline's data: groups of on-policy rollouts, group-normalised advantages, DAPO's dynamic sampling
(steps 1-6 of :mod:`sdzero_pl.baselines.grpo`), served to :class:`~sdzero_pl.baselines.GRPOModule`."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdzero_pl.baselines.grpo import RolloutExample, build_rollout_example, collate_rollouts, plan_micro_batches
from sdzero_pl.contracts import GroupPolicy, require
from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
from sdzero_pl.core.rl_losses import group_advantages, zero_signal_groups
from sdzero_pl.data.batching import (
    PAD, Batching, MicroBatcher, RankShard, check_question_pool, chunks, padding_fraction, planned_epochs,
    require_reload_every_epoch, step_totals
)
from sdzero_pl.data.questions import Question, QuestionSource, epoch_questions
from sdzero_pl.rollout import HFRollout, RolloutBackend, before_rollout, rollout_seed
from sdzero_pl.tasks import MathReward, Verifier


class GroupRolloutDataModule(L.LightningDataModule):
    """Samples ``group_size`` completions per question from the current policy each epoch; GRPO micro-batches."""

    def __init__(
        self,
        questions: QuestionSource,
        prompts_per_epoch: int = 128,
        group_size: int = 4,
        batch_size: int = 8,
        batching: Batching = Batching(),
        ppo_epochs: int = 1,
        scale_by_std: bool = True,
        dynamic_sampling: bool = True,
        mask_truncated: bool = False,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        output_dir: str | None = None,
        seed: int = 0,
        reuse_questions: bool = False,
    ) -> None:
        """
        Args:
            questions: the questions (the paper's baseline budget: ``num_questions`` 15K; set ``shuffle``).
            prompts_per_epoch: questions per epoch (all ranks together), each answered ``group_size`` times.
            group_size: completions per question, the group of the advantage (paper's budget: 4).
            batch_size: sequences per micro-batch on each rank ("count" batching); an optimizer step takes the
                sequences of ``accumulate_grad_batches`` such micro-batches in either batching mode.
            batching: how a step's sequences are cut into micro-batches: fixed count, or by tokens (length-aware).
            ppo_epochs: passes over each epoch's rollouts (each pass takes its optimizer steps; > 1 makes the
                policy drift from the one that sampled, so the clip matters).
            scale_by_std: divide the centred reward by the group's std (GRPO); false: ``r - mean`` only.
            dynamic_sampling: drop groups whose rewards are all equal (DAPO); ranks are padded with masked
                micro-batches to equal counts.
            mask_truncated: exclude completions cut at ``max_new_tokens`` from the loss (DAPO's overlong
                filtering); they still count in their group's statistics.
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward. It also reads the questions.
            output_dir: ``budget.json`` goes here; default ``<default_root_dir>/grpo_data``.
            seed: seed of the question order (``questions.shuffle``) and of the rollout seed streams.
            reuse_questions: let the run cycle through its questions when it needs more (``prompts_per_epoch`` x
                epochs) than ``questions`` holds; false: an error at setup, with the numbers.
        """
        super().__init__()
        for flag, value in (("prompts_per_epoch", prompts_per_epoch), ("group_size", group_size),
                            ("batch_size", batch_size), ("ppo_epochs", ppo_epochs)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        if group_size < 2:
            raise ValueError(f"`--data.group_size` must be >= 2 (a group-relative advantage), got {group_size}")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.batcher = MicroBatcher(batching)
        self.hparams.update(questions=asdict(questions), batching=asdict(self.batcher.batching))  # plain types
        self.source = questions
        self.module: GroupPolicy | None = None
        self.last_completions: list[str] = []
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.questions: list[Question] | None = None
        self._epoch: tuple[int, list[dict]] | None = None
        self._bound = False
        self.rollout_stats: dict[str, float] = {}

    def budget_path(self) -> Path:
        root = self.hparams.output_dir or os.path.join(self.trainer.default_root_dir, "grpo_data")
        return Path(root) / "budget.json"

    def setup(self, stage: str) -> None:
        """Read and check the questions (before any model weights load)."""
        if self.trainer is not None and stage == "fit":
            require_reload_every_epoch(self.trainer, "GRPO samples new rollouts")
            self.batcher.accumulation(self.trainer)  # the user's, before any epoch's plan sets the trainer's
        if self.questions is not None:
            return
        self.questions = self.source.select(self.reward.load_questions(self.source), self.hparams.seed)
        if not self.questions:
            raise ValueError(f"{self.source.name}: no questions left after skip_first={self.source.skip_first} "
                             "and exclusions")

    def teardown(self, stage: str) -> None:
        if self.trainer is not None and stage == "fit":
            self.batcher.release(self.trainer)

    def connect(self, module: GroupPolicy) -> None:
        self.module = require(module, GroupPolicy, type(self).__name__)
        if self.trainer is None:
            return
        steps = self.optimizer_steps_per_epoch(self.trainer.world_size, self.trainer.accumulate_grad_batches)
        check_question_pool(len(self.questions), self.hparams.prompts_per_epoch, planned_epochs(self.trainer, steps),
                            self.source.name, f"num_questions={self.source.num_questions}, "
                            f"skip_first={self.source.skip_first}", self.hparams.reuse_questions)

    def epoch_questions(self, epoch: int) -> list[Question]:
        """The questions of one epoch (all ranks): the next ``prompts_per_epoch``, wrapping around the pool."""
        assert self.questions is not None, "setup() must run before epoch_questions()"
        return epoch_questions(self.questions, epoch, self.hparams.prompts_per_epoch)

    def optimizer_steps_per_epoch(self, world_size: int, accumulate: int) -> int:
        """Optimizer steps of an epoch without dynamic sampling (with it: an upper bound)."""
        hp = self.hparams
        sequences = hp.prompts_per_epoch // world_size * hp.group_size
        return math.ceil(hp.ppo_epochs * math.ceil(sequences / hp.batch_size) / accumulate)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._generate_epoch(epoch))
        return DataLoader(RankShard(self._epoch[1]), batch_size=None, num_workers=0)

    def _generate_epoch(self, epoch: int) -> list[dict]:
        """Steps 1-6 of the module docstring for this rank."""
        trainer, module, hp = self.trainer, self.module, self.hparams
        rank, world = trainer.global_rank, trainer.world_size
        if hp.prompts_per_epoch % world:
            raise ValueError(f"`--data.prompts_per_epoch` ({hp.prompts_per_epoch}) must be divisible by the number "
                             f"of ranks ({world})")
        tokenizer = module.tokenizer
        if not self._bound:
            stops = stop_token_ids(tokenizer, module.policy.generation_config.eos_token_id)
            self.rollout.setup(module.policy, tokenizer, stops)
            self._bound = True
        questions = self.epoch_questions(epoch)[rank::world]
        prompts = encode_prompts(tokenizer, [self.source.text(q) for q in questions], self.source.system_prompt,
                                 self.source.chat_template_kwargs)
        n = hp.group_size
        before_rollout(trainer, self.rollout, module.policy)  # e.g. the vLLM weight refresh
        start = time.perf_counter()
        rollouts = self.rollout.generate([p for p in prompts for _ in range(n)],  # 1. groups are contiguous
                                         seed=rollout_seed(hp.seed, epoch, rank), desc=f"rollouts epoch {epoch}")
        generate_s = time.perf_counter() - start
        completions = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        self.last_completions = completions
        verdict = self.reward(completions, [q.answer for q in questions for _ in range(n)])  # 2.
        valid = torch.tensor([r is not None for r in verdict.rewards]).view(-1, n)  # (G, n)
        rewards = torch.tensor([r or 0.0 for r in verdict.rewards], dtype=torch.float64).view(-1, n)  # (G, n)
        advantages = group_advantages(rewards, valid, hp.scale_by_std)  # 3. (G, n)
        no_signal = zero_signal_groups(rewards, valid)  # (G,)
        keep = ~no_signal if hp.dynamic_sampling else torch.ones_like(no_signal)  # 4.
        examples = []
        for j, rollout in enumerate(rollouts):
            g = j // n
            trained = bool(valid[g, j % n]) and not (hp.mask_truncated and rollout.truncated)
            examples.append(build_rollout_example(prompts[g], rollout.completion_ids, float(advantages[g, j % n]),
                                                  trained))
        kept = [e for j, e in enumerate(examples) if keep[j // n]]
        padding = dataclasses.replace(examples[0], completion_mask=[0] * len(examples[0].ids), advantage=0.0)
        batches, batch_stats = self._batches(kept, padding, tokenizer.pad_token_id)  # 5. and 6.
        tokens = sum(len(r.completion_ids) for r in rollouts)
        valid_rewards = rewards[valid]
        self.rollout_stats = {
            **self._record_budget(len(rollouts), tokens),
            "rollout/reward_mean": float(valid_rewards.mean()) if valid_rewards.numel() else 0.0,
            "rollout/len_mean": tokens / max(len(rollouts), 1),
            "rollout/truncated_frac": sum(r.truncated for r in rollouts) / max(len(rollouts), 1),
            "rollout/zero_signal_frac": float(no_signal.float().mean()),
            "rollout/groups_kept": float(keep.sum()),
            "rollout/skipped_answers": float(verdict.skipped),
            "rollout/verify_timeouts": float(verdict.timeouts),
            "time/generate_s": generate_s,
            **batch_stats,
        }
        return batches

    def _record_budget(self, generations: int, tokens: int) -> dict[str, float]:
        """All ranks' generations of this epoch, added to the ledger by rank 0; their metrics."""
        strategy = self.trainer.strategy
        counts = torch.tensor([generations, tokens], dtype=torch.long, device=strategy.root_device)
        generations, tokens = strategy.reduce(counts, reduce_op="sum").cpu().tolist()
        totals = None
        if self.trainer.is_global_zero:
            ledger = BudgetLedger(self.budget_path())
            ledger.add("grpo/rollout", int(generations), int(tokens))
            totals = ledger.totals()
        totals = strategy.broadcast(totals, src=0)  # every rank logs the same keys (sync_dist)
        return {"rollout/generations": float(generations), "rollout/generated_tokens": float(tokens),
                "budget/generations": float(totals["generations"]), "budget/generated_tokens": float(totals["tokens"])}

    def _batches(self, kept: list[RolloutExample], padding: RolloutExample, pad_id: int
                 ) -> tuple[list[dict], dict[str, float]]:
        """Equal micro-batch counts on all ranks, old / reference log-probs, ``ppo_epochs`` passes, and the
        global token count of each optimizer step; and the batching metrics."""
        trainer, module, hp = self.trainer, self.module, self.hparams
        strategy = trainer.strategy
        local = torch.tensor([math.ceil(len(kept) / hp.batch_size)], device=strategy.root_device)
        most = max(1, int(strategy.all_gather(local).max()))  # at least one (masked) micro-batch per epoch
        micro = plan_micro_batches(len(kept), hp.batch_size, most)
        steps = chunks(micro * hp.ppo_epochs, self.batcher.accumulation(trainer))  # each pass takes its own steps
        plan = self.batcher.plan(trainer, steps, [len(e.ids) for e in kept])
        totals = step_totals(strategy, [sum(kept[i].num_tokens for mb in step for i in mb if i != PAD)
                                        for step in plan.steps])
        scored: dict[tuple[int, ...], dict] = {}  # each distinct micro-batch scored once (the passes repeat them)
        batches = []
        for step, total in zip(plan.steps, totals):
            for mb in step:
                if tuple(mb) not in scored:
                    batch = collate_rollouts([kept[i] if i != PAD else padding for i in mb], pad_id)
                    batch["temperature"] = torch.tensor(float(self.rollout.temperature or 1.0))
                    batch.update(module.score_rollouts(batch))
                    scored[tuple(mb)] = batch
                batches.append({**scored[tuple(mb)], "global_tokens": torch.tensor(int(total))})
        stats = {"train/padding_frac": padding_fraction(batches, ("attention_mask",)),
                 "train/micro_batches_per_step": float(plan.micro_batches_per_step or self.batcher.accumulate),
                 "train/over_budget": float(plan.over_budget)}
        return batches, stats
