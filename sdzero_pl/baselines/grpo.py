"""GRPO baseline, DAPO variant (docs/method.md, "Results": the paper's GRPO row; DAPO: Yu et al. 2025, arXiv 2503.14476).

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
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from sdzero_pl.contracts import GroupRollouts, connect
from sdzero_pl.core.artifacts import use_atomic_checkpoints
from sdzero_pl.core.guard import guard_callbacks
from sdzero_pl.core.losses import normalised_sum, token_logps
from sdzero_pl.core.models import (
    EXPORT_KEY, check_dtypes, check_model_source, export_hf, export_path, hidden_states, load_model, load_policy,
    load_tokenizer, output_weight
)
from sdzero_pl.core.optim import OptimArgs, optimizer_for
from sdzero_pl.core.rl_losses import check_clip, clipped_pg_loss, k3_kl
from sdzero_pl.core.sequences import pad_sequences, select_targets, target_positions


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
    ids = batch["input_ids"]
    hidden = hidden_states(model, ids, batch["attention_mask"])  # (B, T, H)
    h, targets = select_targets(hidden, ids, batch["completion_mask"])  # (N, H), (N,)
    if temperature > 0 and temperature != 1.0:
        h = h / temperature  # logits / T: the head is linear and bias-free
    return token_logps(h, output_weight(model), targets, chunk_size), hidden


def token_advantages(batch: dict) -> torch.Tensor:
    """Each completion token's advantage (its completion's), in the order of :func:`completion_logps`. -> (N,)"""
    where = target_positions(batch["completion_mask"])  # (B, T-1)
    return batch["advantages"][:, None].expand(-1, where.shape[1])[where]


# ------------------------------------------------------------------------------------------------- the module
GRPO_OPTIM = OptimArgs(lr=1e-6, weight_decay=0.1, warmup_steps=10)


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
        optim: OptimArgs = GRPO_OPTIM,
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
            optim: AdamW and its schedule (DAPO: lr 1e-6, weight decay 0.1, 10 warm-up steps, then constant).
            gradient_checkpointing: recompute activations in backward to save memory.
            export_dir: where the final HF model goes; default ``<default_root_dir>/hf_model``.
            export_dtype: dtype of the exported weights (e.g. bfloat16); default: as trained.
        """
        super().__init__()
        check_clip(clip_low, clip_high)
        if kl_coef < 0:
            raise ValueError(f"`--model.kl_coef` must be >= 0, got {kl_coef}")
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        check_dtypes(dtype, export_dtype)
        if kl_coef > 0 and ref_name_or_path:
            check_model_source(ref_name_or_path, "--model.ref_name_or_path")
        self.save_hyperparameters()
        self.optim = OptimArgs.hold(self, optim)
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.chunk_size = chunk_size
        self.policy: torch.nn.Module | None = None
        self.ref: torch.nn.Module | None = None
        self.data: GroupRollouts | None = None
        self.resumed_export: str | None = None  # where the run this one resumes exports (from its checkpoint)

    @property
    def start_model(self) -> str:
        return self.hparams.model_name_or_path

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the data module samples from this module's policy and scores with it
            self.data = connect(self, self.trainer.datamodule, GroupRollouts)
            use_atomic_checkpoints(self.trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        return guard_callbacks(self)  # non-finite loss / gradients / weights stop training, nothing is exported

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[EXPORT_KEY] = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed_export = checkpoint.get(EXPORT_KEY)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = load_policy(hp.model_name_or_path, hp.dtype, hp.gradient_checkpointing)
        if hp.kl_coef > 0:
            self.ref = (load_model(hp.ref_name_or_path, hp.dtype, flag="--model.ref_name_or_path")
                        if hp.ref_name_or_path else copy.deepcopy(self.policy))
            self.ref.eval()
            self.ref.requires_grad_(False)

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
        stats = self.data.rollout_stats  # this epoch's rollouts, generated just before this hook
        if stats:
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def configure_optimizers(self) -> dict:
        steps = self.data.optimizer_steps_per_epoch(self.trainer.world_size, self.trainer.accumulate_grad_batches)
        return optimizer_for(self.policy.parameters(), self.optim, self.trainer, steps)

    def on_train_end(self) -> None:
        path = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)
        if self.trainer.is_global_zero:
            export_hf(self.policy, self.tokenizer, path, dtype=self.hparams.export_dtype,
                      budget=self.data.budget_path())
            rank_zero_info(f"GRPO policy saved as a Hugging Face model in {path}")
        self.trainer.strategy.barrier("export")
