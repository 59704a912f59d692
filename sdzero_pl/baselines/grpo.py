"""GRPO baseline, DAPO variant (SPEC "Results": the paper's GRPO row; DAPO: Yu et al. 2025, arXiv 2503.14476).

Per epoch (``reload_dataloaders_every_n_epochs=1``), :class:`GroupRolloutDataModule`:

1. takes the next ``prompts_per_epoch`` questions and samples a GROUP of ``group_size`` completions per question
   from the policy's CURRENT weights (each rank its own questions, its own seed stream, as Phase 2 does);
2. verifies them: binary reward r;
3. group-normalised advantages ``(r - mean_group) / (std_group + eps)`` (``scale_by_std=False``: ``r - mean``);
4. dynamic sampling (DAPO, on by default): groups whose rewards are all equal carry no signal and are dropped.
   Deviation: DAPO samples more questions until the batch is full again; here the batch shrinks instead (the
   sample budget stays fixed, which is what the paper's comparison holds equal). Ranks may keep different
   numbers of groups, so the rank with fewer micro-batches is padded with fully MASKED micro-batches (zero
   loss, no tokens counted): every rank runs the same number of forward/backward passes;
5. scores every kept completion with the generating policy (no grad): the "old" log-probs of the PPO ratio, and
   with the frozen reference when ``kl_coef > 0``;
6. serves ``ppo_epochs`` passes over the micro-batches; each carries ``global_tokens``, the completion tokens of
   its whole optimizer step (all micro-batches, all ranks), for the token mean over the global batch (DAPO's
   token-level loss).

:class:`GRPOModule` minimises, per completion token, the clipped surrogate with DAPO's asymmetric range
``[1 - 0.2, 1 + 0.28]`` plus ``kl_coef * k3`` (default 0: DAPO drops the KL term), token-mean over the global
batch. With one optimizer step per epoch the ratio is 1 and the clip never fires; ``ppo_epochs > 1`` or several
optimizer steps per epoch (``accumulate_grad_batches`` smaller than the epoch's micro-batches) make it matter.
Log-probs use the rollout temperature (logits / T), the distribution the completions were sampled from.
Generations and generated tokens go to ``budget.json`` (:class:`~sdzero_pl.core.budget.BudgetLedger`, phase
``"grpo/rollout"``) and to the logs (``rollout/generations``, ``rollout/generated_tokens``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.losses import normalised_sum
from sdzero_pl.core.models import backbone, load_model, load_tokenizer, output_weight, resolve_dtype
from sdzero_pl.phase2.onpolicy import CollatedBatches, rollout_seed
from sdzero_pl.core.optim import build_optimizer, check_schedule, total_optimizer_steps
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
from sdzero_pl.data.questions import Question, epoch_questions, read_id_file, select_questions
from sdzero_pl.tasks import MathReward, Verifier
from sdzero_pl.core.rl_losses import check_clip, clipped_pg_loss, group_advantages, k3_kl, zero_signal_groups
from sdzero_pl.rollout import HFRollout, RolloutBackend, before_rollout
from sdzero_pl.core.sequences import pad_sequences, position_ids, select_targets, target_positions
from sdzero_pl.phase1.srt import chunked_nll


# --------------------------------------------------------------------------------------------------- examples
@dataclasses.dataclass
class RolloutExample:
    ids: list[int]  # chat(x) + y, y up to and including its stop token
    completion_mask: list[int]  # 1 on y's tokens (the loss targets)
    advantage: float

    @property
    def num_tokens(self) -> int:
        return sum(self.completion_mask)


def build_rollout_example(prompt_ids: list[int], completion_ids: list[int], advantage: float,
                          trained: bool = True) -> RolloutExample:
    """One sequence; ``trained=False`` keeps it as context only (unusable reward, masked truncation, padding)."""
    assert len(prompt_ids) > 0, "the prompt must not be empty: position 0 can never be a target"
    mask = [0] * len(prompt_ids) + [int(trained)] * len(completion_ids)
    return RolloutExample(list(prompt_ids) + list(completion_ids), mask, advantage if trained else 0.0)


def collate_rollouts(examples: list[RolloutExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; attention and loss masks are built from lengths (pad == eos safe)."""
    return {
        "input_ids": pad_sequences([e.ids for e in examples], pad_id),  # (B, T)
        "attention_mask": pad_sequences([[1] * len(e.ids) for e in examples], 0),  # (B, T)
        "completion_mask": pad_sequences([e.completion_mask for e in examples], 0),  # (B, T)
        "advantages": torch.tensor([e.advantage for e in examples], dtype=torch.float32),  # (B,)
    }


def plan_micro_batches(num_examples: int, batch_size: int, num_micro_batches: int) -> list[list[int]]:
    """Example indices of each micro-batch, padded to ``num_micro_batches`` with masked rows (index -1), so every
    rank runs as many micro-batches as the rank with the most (dynamic sampling keeps different counts)."""
    micro = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    assert len(micro) <= num_micro_batches, f"{len(micro)} micro-batches, more than the {num_micro_batches} planned"
    return micro + [[-1]] * (num_micro_batches - len(micro))


def completion_logps(model: torch.nn.Module, batch: dict, temperature: float = 1.0,
                     chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x, y_<t) at temperature T of every completion token, flattened in (row, position) order, and
    the hidden states (to keep an empty micro-batch in the graph). -> (N,), (B, T, H)"""
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    hidden = backbone(model)(input_ids=ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask)).last_hidden_state  # (B, T, H)
    h, targets = select_targets(hidden, ids, batch["completion_mask"])  # (N, H), (N,)
    if temperature > 0 and temperature != 1.0:
        h = h / temperature  # logits / T: the head is linear and bias-free
    return -chunked_nll(h, output_weight(model), targets, chunk_size), hidden


def token_advantages(batch: dict) -> torch.Tensor:
    """Each completion token's advantage (its completion's), in the order of :func:`completion_logps`. -> (N,)"""
    where = target_positions(batch["completion_mask"])  # (B, T-1)
    return batch["advantages"][:, None].expand(-1, where.shape[1])[where]


# ------------------------------------------------------------------------------------------------- the module
class GRPOModule(L.LightningModule):
    """Clipped, token-mean policy gradient on group-normalised binary rewards (GRPO with DAPO's changes)."""

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "bfloat16",
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        kl_coef: float = 0.0,
        ref_name_or_path: str | None = None,
        chunk_size: int = 1024,
        lr: float = 1e-6,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        export_dtype: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: the policy's start (hub id or HF directory): the base model, as for SD-Zero.
            dtype: weights dtype: float32, bfloat16, float16 or float64 (float32 + ``trainer.precision:
                bf16-mixed`` keeps fp32 master weights).
            clip_low: lower clip range, ratio >= 1 - clip_low (DAPO: 0.2).
            clip_high: upper clip range, ratio <= 1 + clip_high (DAPO "Clip-Higher": 0.28).
            kl_coef: weight of the k3 KL to a frozen reference (DAPO: 0, no reference is loaded then).
            ref_name_or_path: the frozen reference when ``kl_coef > 0``; default a copy of the policy's start.
            chunk_size: tokens per chunk of the output layer + log-softmax (memory bound).
            lr: AdamW learning rate (DAPO: 1e-6).
            weight_decay: AdamW weight decay (DAPO: 0.1).
            betas: AdamW betas.
            warmup_steps: linear warm-up optimizer steps (DAPO: 10).
            lr_schedule: after warm-up: "constant" (DAPO), "cosine" or "linear".
            min_lr_ratio: floor of the decayed learning rate, as a fraction of ``lr``.
            gradient_checkpointing: recompute activations in backward to save memory.
            export_dir: where the final HF model goes; default ``<log_dir>/hf_model``.
            export_dtype: dtype of the exported weights (e.g. bfloat16); default: as trained.
        """
        super().__init__()
        check_clip(clip_low, clip_high)
        if kl_coef < 0:
            raise ValueError(f"`--model.kl_coef` must be >= 0, got {kl_coef}")
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        check_schedule(lr_schedule, warmup_steps, 0.0)
        resolve_dtype(dtype)
        if export_dtype is not None:
            resolve_dtype(export_dtype)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.policy: torch.nn.Module | None = None
        self.ref: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = load_model(hp.model_name_or_path, hp.dtype)
        self.policy.train()
        if hp.kl_coef > 0:
            self.ref = load_model(hp.ref_name_or_path, hp.dtype) if hp.ref_name_or_path else copy.deepcopy(self.policy)
            self.ref.eval()
            self.ref.requires_grad_(False)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.policy.config.use_cache = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()  # frozen: never in train mode, whatever Lightning toggles
        return self

    @torch.no_grad()
    def score_rollouts(self, batch: dict) -> dict[str, torch.Tensor]:
        """Old (generating policy) and reference log-probs of a micro-batch's completion tokens, on the CPU, under
        the trainer's precision context so the first step's ratio is 1. -> {"old_logps": (N,), ["ref_logps": (N,)]}"""
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        temperature, chunk = float(batch["temperature"]), self.hparams.chunk_size
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                out = {"old_logps": completion_logps(self.policy, batch, temperature, chunk)[0].float().cpu()}
                if self.ref is not None:
                    out["ref_logps"] = completion_logps(self.ref, batch, temperature, chunk)[0].float().cpu()
        finally:
            self.policy.train(was_training)
        return out

    def policy_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped PG (+ k3 KL) of one micro-batch, token-mean normalised over its global optimizer step."""
        hp = self.hparams
        logps, hidden = completion_logps(self.policy, batch, float(batch["temperature"]), hp.chunk_size)  # (N,)
        pg = clipped_pg_loss(logps, batch["old_logps"], token_advantages(batch), hp.clip_low, hp.clip_high)
        per_token = pg["loss"]  # (N,)
        kl = k3_kl(logps, batch["ref_logps"]) if self.ref is not None else torch.zeros_like(per_token)
        if self.ref is not None:
            per_token = per_token + hp.kl_coef * kl
        loss = normalised_sum(per_token, int(batch["global_tokens"]), self.trainer.accumulate_grad_batches,
                              self.trainer.world_size)
        if logps.numel() == 0:
            loss = hidden.sum() * 0.0  # a masked padding micro-batch: keep the graph, contribute nothing
        n = max(logps.numel(), 1)
        ratio = pg["ratio"]
        metrics = {
            "train/loss": per_token.detach().sum() / n,
            "train/pg_loss": pg["loss"].detach().sum() / n,
            "train/kl": kl.detach().sum() / n,
            "train/clip_frac_low": pg["clipped_low"].float().sum() / n,
            "train/clip_frac_high": pg["clipped_high"].float().sum() / n,
            "train/ratio_mean": ratio.sum() / n,
            "train/ratio_max_dev": (ratio - 1).abs().max() if ratio.numel() else ratio.new_zeros(()),
            "tokens": torch.tensor(float(logps.numel())),
        }
        return loss, metrics

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        loss, metrics = self.policy_loss(batch)
        n = max(int(metrics.pop("tokens")), 1)
        deviation = metrics.pop("train/ratio_max_dev")
        self.log_dict(metrics, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({"train/ratio_max_dev": deviation, "train/tokens": float(n),
                       "time/step_s": time.perf_counter() - start}, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_train_epoch_start(self) -> None:
        stats = self.trainer.datamodule.rollout_stats  # this epoch's rollouts, generated just before this hook
        if stats:
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        steps = self.trainer.datamodule.optimizer_steps_per_epoch(self.trainer.world_size,
                                                                  self.trainer.accumulate_grad_batches)
        return build_optimizer(self.policy.parameters(), hp.lr, hp.weight_decay, hp.betas,
                               total_optimizer_steps(self.trainer, steps), hp.warmup_steps, 0.0, hp.lr_schedule,
                               hp.min_lr_ratio)

    def export_path(self) -> str:
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return self.hparams.export_dir or os.path.join(root, "hf_model")

    def on_train_end(self) -> None:
        path = self.export_path()
        if self.trainer.is_global_zero:
            if self.hparams.gradient_checkpointing:
                self.policy.config.use_cache = True  # the saved model generates with its KV cache
            policy = self.policy
            if self.hparams.export_dtype is not None:
                policy = copy.deepcopy(policy).to(resolve_dtype(self.hparams.export_dtype))
            policy.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            budget = self.trainer.datamodule.budget_path()
            if budget.exists():
                shutil.copy(budget, os.path.join(path, "budget.json"))
            rank_zero_info(f"GRPO policy saved as a Hugging Face model in {path}")
        self.trainer.strategy.barrier("export")


# --------------------------------------------------------------------------------------------- the data module
class GroupRolloutDataModule(L.LightningDataModule):
    """Samples ``group_size`` completions per question from the current policy each epoch; GRPO micro-batches."""

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
        num_questions: int | None = None,
        shuffle: bool = True,
        prompts_per_epoch: int = 128,
        group_size: int = 4,
        batch_size: int = 8,
        ppo_epochs: int = 1,
        scale_by_std: bool = True,
        dynamic_sampling: bool = True,
        mask_truncated: bool = False,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        output_dir: str | None = None,
        seed: int = 0,
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
            skip_first: leave out the first N questions.
            exclude_ids_file: leave out the question ids in this file.
            num_questions: use only the first N questions left (the paper's baseline budget: 15K); null = all.
            shuffle: shuffle the question order once, with ``seed`` (after taking the first ``num_questions``).
            prompts_per_epoch: questions per epoch (all ranks together), each answered ``group_size`` times.
            group_size: completions per question, the group of the advantage (paper's budget: 4).
            batch_size: sequences per micro-batch on each rank.
            ppo_epochs: passes over each epoch's rollouts (each pass takes its optimizer steps; > 1 makes the
                policy drift from the one that sampled, so the clip matters).
            scale_by_std: divide the centred reward by the group's std (GRPO); false: ``r - mean`` only.
            dynamic_sampling: drop groups whose rewards are all equal (DAPO); ranks are padded with masked
                micro-batches to equal counts.
            mask_truncated: exclude completions cut at ``max_new_tokens`` from the loss (DAPO's overlong
                filtering); they still count in their group's statistics.
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward.
            output_dir: ``budget.json`` goes here; default ``<default_root_dir>/grpo_data``.
            seed: seed of the question order and of the rollout seed streams.
        """
        super().__init__()
        for flag, value in (("prompts_per_epoch", prompts_per_epoch), ("group_size", group_size),
                            ("batch_size", batch_size), ("ppo_epochs", ppo_epochs)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        if num_questions is not None and num_questions < 1:
            raise ValueError(f"`--data.num_questions` must be >= 1 or null, got {num_questions}")
        if group_size < 2:
            raise ValueError(f"`--data.group_size` must be >= 2 (a group-relative advantage), got {group_size}")
        self.save_hyperparameters(ignore=["rollout", "reward"])
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
        if self.trainer is not None and stage == "fit" and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("GRPO samples new rollouts every epoch: set "
                             "`--trainer.reload_dataloaders_every_n_epochs=1`, got "
                             f"{self.trainer.reload_dataloaders_every_n_epochs}")
        if self.questions is not None:
            return
        hp = self.hparams
        questions = self.reward.load_questions(
            hp.dataset, hp.dataset_config, hp.split, hp.question_field, hp.answer_field, hp.id_field
        )
        excluded = read_id_file(hp.exclude_ids_file) if hp.exclude_ids_file else set()
        questions = select_questions(questions, hp.skip_first, excluded)[: hp.num_questions]
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
        """Optimizer steps of an epoch without dynamic sampling (with it: an upper bound)."""
        hp = self.hparams
        sequences = hp.prompts_per_epoch // world_size * hp.group_size
        return math.ceil(hp.ppo_epochs * math.ceil(sequences / hp.batch_size) / accumulate)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._generate_epoch(epoch))
        return DataLoader(CollatedBatches(self._epoch[1]), batch_size=None, num_workers=0)

    def _generate_epoch(self, epoch: int) -> list[dict]:
        """Steps 1-6 of the module docstring for this rank."""
        trainer, module, hp = self.trainer, self.trainer.lightning_module, self.hparams
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
        prompts = encode_prompts(tokenizer, [q.question + hp.instruction for q in questions], hp.system_prompt)
        n = hp.group_size
        before_rollout(trainer, self.rollout, module.policy)  # e.g. the vLLM weight refresh
        start = time.perf_counter()
        rollouts = self.rollout.generate([p for p in prompts for _ in range(n)],  # 1. groups are contiguous
                                         seed=rollout_seed(hp.seed, epoch, rank), desc=f"rollouts epoch {epoch}")
        generate_s = time.perf_counter() - start
        completions = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
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
        batches = self._batches(kept, padding, tokenizer.pad_token_id)  # 5. and 6.
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

    def _batches(self, kept: list[RolloutExample], padding: RolloutExample, pad_id: int) -> list[dict]:
        """Equal micro-batch counts on all ranks, old / reference log-probs, ``ppo_epochs`` passes, and the
        global token count of each optimizer step."""
        trainer, module, hp = self.trainer, self.trainer.lightning_module, self.hparams
        strategy, accumulate = trainer.strategy, trainer.accumulate_grad_batches
        local = torch.tensor([math.ceil(len(kept) / hp.batch_size)], device=strategy.root_device)
        most = max(1, int(strategy.all_gather(local).max()))  # at least one (masked) micro-batch per epoch
        micro = []
        for indices in plan_micro_batches(len(kept), hp.batch_size, most):
            rows = [kept[i] if i >= 0 else padding for i in indices]
            batch = collate_rollouts(rows, pad_id)
            batch["temperature"] = torch.tensor(float(self.rollout.temperature or 1.0))
            batch.update(module.score_rollouts(batch))
            micro.append((batch, sum(e.num_tokens for e in rows)))
        passes = micro * hp.ppo_epochs
        steps = [passes[i : i + accumulate] for i in range(0, len(passes), accumulate)]
        counts = torch.tensor([sum(t for _, t in step) for step in steps], dtype=torch.long)
        totals = strategy.reduce(counts.to(strategy.root_device), reduce_op="sum").cpu().tolist()
        return [{**batch, "global_tokens": torch.tensor(int(total))} for step, total in zip(steps, totals)
                for batch, _ in step]
