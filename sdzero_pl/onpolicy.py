"""On-policy DataModule for Phase 2 (SPEC "Phase 2", steps 1-3 and 5).

Every epoch (``reload_dataloaders_every_n_epochs=1``) it takes the next ``prompts_per_epoch`` questions, samples
ONE completion per question from the student's CURRENT weights through the rollout backend, verifies it, picks
the control phrase P_r and builds the student / teacher sequences. Each rank generates its own share of the
questions with its own seed stream; the data of one epoch is generated once, however often Lightning asks for
the dataloader (``estimated_stepping_batches``, sanity checks, reloads).

Each micro-batch carries ``global_tokens``: the number of valid y tokens in its whole optimizer step (all its
micro-batches, all ranks), so the loss is the token mean of the global batch however the batch is split.

Right before generating, :class:`~sdzero_pl.rollout.RolloutCallback` s run ``on_before_rollout`` (the vLLM weight
refresh pushes the student's weights there: Lightning builds the dataloader BEFORE ``on_train_epoch_start``).
When the backend returns the sampled tokens' log-probs, the student recomputes them for a few rollouts and
``rollout/logprob_gap`` measures how stale the engine is (``sdzero_pl/staleness.py``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sdzero_pl.prompts import control_phrases, control_text, encode_prompts, stop_token_ids
from sdzero_pl.questions import Question, epoch_questions, read_id_file, select_questions
from sdzero_pl.rewards import MathReward, Verifier
from sdzero_pl.rollout import HFRollout, RolloutBackend, before_rollout
from sdzero_pl.sequences import DistillExample, build_distill_example, collate_distill
from sdzero_pl.staleness import logprob_gap, sampled_token_logps


@dataclass
class EpochData:
    epoch: int
    batches: list[dict]
    stats: dict[str, float]
    completions: list[str]


class CollatedBatches(IterableDataset):
    """Pre-collated micro-batches. Iterable, so Lightning does not shard it again with a DistributedSampler."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rollout_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed stream per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 65_537 + rank) % (2**63)


class OnPolicyDataModule(L.LightningDataModule):
    """Generates Phase-2 batches each epoch from the student being trained."""

    def __init__(
        self,
        dataset: str,
        dataset_config: str | None = None,
        split: str = "train",
        question_field: str = "problem",
        answer_field: str = "answer",
        id_field: str | None = None,
        instruction: str = "",
        system_prompt: str | None = None,
        skip_first: int = 0,
        exclude_ids_file: str | None = None,
        shuffle: bool = True,
        prompts_per_epoch: int = 128,
        batch_size: int = 8,
        max_teacher_len: int = 8192,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        control_preset: str = "paper",
        control_correct: str | None = None,
        control_wrong: str | None = None,
        seed: int = 0,
        logprob_gap_samples: int = 16,
    ) -> None:
        """
        Args:
            dataset: hub dataset name, or a local .json / .jsonl / .parquet file of questions.
            dataset_config: hub dataset configuration name.
            split: hub dataset split.
            question_field: column holding the question text x.
            answer_field: column holding the reference answer a.
            id_field: column holding a unique question id (default: the row number).
            instruction: text appended to every question (e.g. "Put your final answer within \\boxed{}.").
            system_prompt: optional system message of the chat.
            skip_first: leave out the first N questions (Phase 1 used them).
            exclude_ids_file: leave out the question ids in this file (Phase 1 writes one).
            shuffle: shuffle the question order once, with ``seed``.
            prompts_per_epoch: questions per epoch (all ranks together); one completion each.
            batch_size: rollouts per micro-batch on each rank.
            max_teacher_len: token budget of the teacher sequence x + y + P_r + y; y is truncated to fit.
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward.
            control_preset: control phrases: "paper", "qwen" or "olmo".
            control_correct: override of the r=1 control phrase.
            control_wrong: override of the r=0 control phrase.
            seed: seed of the question order and of the rollout seed streams.
            logprob_gap_samples: rollouts per rank whose sampled tokens the student re-scores for
                ``rollout/logprob_gap`` (only with a backend that returns log-probs, e.g. vLLM); 0 = off.
        """
        super().__init__()
        for flag, value, low in (("prompts_per_epoch", prompts_per_epoch, 1), ("batch_size", batch_size, 1),
                                 ("max_teacher_len", max_teacher_len, 2),
                                 ("logprob_gap_samples", logprob_gap_samples, 0)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.phrases = control_phrases(control_preset, control_correct, control_wrong)
        self.questions: list[Question] | None = None
        self._epoch_data: EpochData | None = None
        self._bound = False  # rollout backend bound to the student
        self.rollout_stats: dict[str, float] = {}  # this epoch's rollout metrics, logged by the module
        self.last_completions: list[str] = []  # this rank's completion texts of the latest epoch (for callbacks)

    # ----------------------------------------------------------------------------------------------- questions
    def setup(self, stage: str) -> None:
        if self.trainer is not None and stage == "fit" and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "on-policy training needs `--trainer.reload_dataloaders_every_n_epochs=1`, got "
                f"{self.trainer.reload_dataloaders_every_n_epochs}"
            )
        if self.questions is not None:
            return
        hp = self.hparams
        questions = self.reward.load_questions(  # the verifier knows its kind of reference (math / code)
            hp.dataset, hp.dataset_config, hp.split, hp.question_field, hp.answer_field, hp.id_field
        )
        excluded = read_id_file(hp.exclude_ids_file) if hp.exclude_ids_file else set()
        questions = select_questions(questions, hp.skip_first, excluded)
        if not questions:
            raise ValueError(f"{hp.dataset}: no questions left after skip_first={hp.skip_first} and exclusions")
        if hp.shuffle:
            random.Random(hp.seed).shuffle(questions)
        self.questions = questions

    def epoch_questions(self, epoch: int) -> list[Question]:
        """The questions of one epoch (all ranks): the next ``prompts_per_epoch``, wrapping around the pool."""
        assert self.questions is not None, "setup() must run before epoch_questions()"
        return epoch_questions(self.questions, epoch, self.hparams.prompts_per_epoch)

    def optimizer_steps_per_epoch(self, world_size: int, accumulate: int) -> int:
        local = self.hparams.prompts_per_epoch // world_size
        return math.ceil(math.ceil(local / self.hparams.batch_size) / accumulate)

    # ------------------------------------------------------------------------------------------------ rollouts
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch_data is None or self._epoch_data.epoch != epoch:
            self._epoch_data = self._generate_epoch(epoch)
            self.rollout_stats = self._epoch_data.stats
            self.last_completions = self._epoch_data.completions
        return DataLoader(CollatedBatches(self._epoch_data.batches), batch_size=None, num_workers=0)

    def _generate_epoch(self, epoch: int) -> EpochData:
        trainer, module = self.trainer, self.trainer.lightning_module
        rank, world = trainer.global_rank, trainer.world_size
        if self.hparams.prompts_per_epoch % world:
            raise ValueError(
                f"`--data.prompts_per_epoch` ({self.hparams.prompts_per_epoch}) must be divisible by the number "
                f"of ranks ({world})"
            )
        tokenizer, stops = module.tokenizer, self.bind_rollout()
        questions = self.epoch_questions(epoch)[rank::world]
        prompts = encode_prompts(tokenizer, [q.question + self.hparams.instruction for q in questions],
                                 self.hparams.system_prompt)
        before_rollout(trainer, self.rollout, module.student)  # e.g. the vLLM weight refresh
        start = time.perf_counter()
        rollouts = self.rollout.generate(prompts, seed=rollout_seed(self.hparams.seed, epoch, rank),
                                         desc=f"rollouts epoch {epoch}")
        generate_s = time.perf_counter() - start
        completions = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        verdict = self.reward(completions, [q.answer for q in questions])
        examples = []
        for prompt, rollout, reward in zip(prompts, rollouts, verdict.rewards):
            control = tokenizer.encode(control_text(self.phrases, reward or 0.0), add_special_tokens=False)
            example = build_distill_example(prompt, rollout.completion_ids, control, stops,
                                            self.hparams.max_teacher_len)
            if reward is None:  # unusable reference: keep the slot (equal batch counts on all ranks), no loss
                example.student_mask = [0] * len(example.student_mask)
                example.teacher_mask = [0] * len(example.teacher_mask)
            examples.append(example)
        batches = self._batches(examples, tokenizer.pad_token_id, trainer)
        valid = [r for r in verdict.rewards if r is not None]
        stats = {
            "rollout/reward_mean": sum(valid) / max(len(valid), 1),
            "rollout/len_mean": sum(len(r.completion_ids) for r in rollouts) / max(len(rollouts), 1),
            "rollout/truncated_frac": sum(r.truncated for r in rollouts) / max(len(rollouts), 1),
            "rollout/budget_truncated_frac": sum(e.truncated for e in examples) / max(len(examples), 1),
            "rollout/skipped_answers": float(verdict.skipped),
            "rollout/verify_timeouts": float(verdict.timeouts),
            "rollout/generations": float(len(rollouts)),
            "rollout/generated_tokens": float(sum(len(r.completion_ids) for r in rollouts)),
            "time/generate_s": generate_s,
            **self._staleness(module, prompts, rollouts, tokenizer.pad_token_id),
        }
        return EpochData(epoch, batches, stats, completions)

    def bind_rollout(self) -> list[int]:
        """Bind the rollout backend to the student (once; a vLLM engine is built here) and return the stop ids."""
        module = self.trainer.lightning_module
        stops = stop_token_ids(module.tokenizer, module.student.generation_config.eos_token_id)
        if not self._bound:
            self.rollout.setup(module.student, module.tokenizer, stops)
            self._bound = True
        return stops

    def _staleness(self, module, prompts, rollouts, pad_id: int) -> dict[str, float]:
        """``rollout/logprob_gap`` over the first ``logprob_gap_samples`` rollouts, if the engine gave log-probs."""
        n = min(self.hparams.logprob_gap_samples, len(rollouts))
        if n == 0 or any(r.logps is None for r in rollouts[:n]):
            return {}
        trainer_logps = module.score("student", sampled_token_logps, prompts[:n],
                                     [r.completion_ids for r in rollouts[:n]], pad_id, self.hparams.batch_size,
                                     module.hparams.chunk_size)
        return {"rollout/logprob_gap": logprob_gap([r.logps for r in rollouts[:n]], trainer_logps)}

    def _batches(self, examples: list[DistillExample], pad_id: int, trainer) -> list[dict]:
        size, accumulate = self.hparams.batch_size, trainer.accumulate_grad_batches
        micro = [examples[i : i + size] for i in range(0, len(examples), size)]
        steps = [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
        local = torch.tensor([sum(e.num_tokens for mb in step for e in mb) for step in steps], dtype=torch.long)
        global_tokens = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        batches = []
        for step, total in zip(steps, global_tokens.tolist()):
            for mb in step:
                batch = collate_distill(mb, pad_id)
                batch["global_tokens"] = torch.tensor(int(total))
                batches.append(batch)
        return batches
