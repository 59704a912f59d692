"""Phase 2 of SD-Zero: on-policy self-distillation of the Reviser into the Generator (SPEC "Phase 2").

Per optimizer step (the batch is built by :class:`~sdzero_pl.onpolicy.OnPolicyDataModule`):

1. the student sampled one completion y per question from its current weights;
2. y was verified, r picked the control phrase P_r;
3. the FROZEN teacher scores the second copy of y in ``chat(x) + y + P_r + y`` (no grad) -> its top-k ids;
4. the student scores y in ``chat(x) + y`` at those ids only; per-token divergence over the renormalised top-k;
5. token mean over every valid token of the global batch.

Default divergence is the reference code's "mixed" (0.5 forward + 0.5 reverse); the paper's Eq. 4 is "reverse".
At the end of ``fit`` the student is saved as a standard HF directory (model + tokenizer).
"""

from __future__ import annotations

import copy
import os
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from sdzero_pl.losses import check_divergence, gathered_logits, normalised_sum, teacher_topk, topk_divergence
from sdzero_pl.models import backbone, load_model, load_tokenizer, output_weight
from sdzero_pl.optim import build_optimizer, check_schedule, total_optimizer_steps
from sdzero_pl.sequences import position_ids, select_targets


class SelfDistillModule(L.LightningModule):
    """Student p_theta(. | x) distilled from a frozen reviser p(. | x, y, P_r) over the teacher's top-k."""

    def __init__(
        self,
        model_name_or_path: str,
        teacher_name_or_path: str | None = None,
        dtype: str = "bfloat16",
        top_k: int = 64,
        divergence: str = "mixed",
        forward_weight: float = 0.5,
        chunk_size: int = 1024,
        lr: float = 5e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 20,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: the student's start (hub id or HF directory), normally the Phase-1 (SRT) output.
            teacher_name_or_path: the frozen teacher; default: a copy of the student at the start of training.
            dtype: weights dtype of both models: float32, bfloat16, float16 or float64.
            top_k: teacher top-k ids the divergence is computed over (paper: 64).
            divergence: "reverse" (paper Eq. 4), "forward" or "mixed" (reference code default).
            forward_weight: weight w of the forward KL in "mixed": w * forward + (1 - w) * reverse.
            chunk_size: tokens per chunk when computing teacher top-k and student logits (memory bound).
            lr: AdamW learning rate (paper's launch script: 5e-6).
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: linear warm-up optimizer steps (reference code: 20).
            lr_schedule: after warm-up: "constant", "cosine" or "linear" decay.
            min_lr_ratio: floor of the decayed learning rate, as a fraction of ``lr``.
            gradient_checkpointing: recompute the student's activations in backward to save memory.
            export_dir: where the final HF model goes; default ``<log_dir>/hf_model``.
        """
        super().__init__()
        if top_k < 1:
            raise ValueError(f"`--model.top_k` must be >= 1, got {top_k}")
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        check_divergence(divergence, forward_weight)
        check_schedule(lr_schedule, warmup_steps, 0.0)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.student: torch.nn.Module | None = None
        self.teacher: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.student is not None:
            return
        hp = self.hparams
        self.student = load_model(hp.model_name_or_path, hp.dtype)
        self.student.train()
        if hp.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
            self.student.config.use_cache = False
        if hp.teacher_name_or_path:
            self.teacher = load_model(hp.teacher_name_or_path, hp.dtype)
        else:
            self.teacher = copy.deepcopy(self.student)
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: never in train mode, whatever Lightning toggles
        return self

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Hard-copy the student into the teacher (teacher synchronization). Copies parameter by parameter, so
        sharded models copy their local shards only."""
        student = dict(self.student.named_parameters())
        for name, param in self.teacher.named_parameters():
            param.copy_(student[name].detach())

    # --------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics, timings = self.distill_loss(batch)
        n = max(int(metrics.pop("tokens")), 1)
        self.log_dict(metrics, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({**timings, "train/tokens": float(n)}, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def distill_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Steps 3-5 on one micro-batch: (loss to backpropagate, per-token-mean metrics, timings)."""
        hp = self.hparams
        start = time.perf_counter()
        with torch.no_grad():  # 3. the teacher scores the second copy of y
            teacher_hidden = self._hidden(self.teacher, batch["teacher_ids"], batch["teacher_attention_mask"])
            teacher_h, _ = select_targets(teacher_hidden, batch["teacher_ids"], batch["teacher_mask"])  # (N, H)
            topk_ids, teacher_logits, topk_mass = teacher_topk(
                teacher_h, output_weight(self.teacher), hp.top_k, hp.chunk_size
            )  # (N, k), (N, k), (N,)
        teacher_s = time.perf_counter() - start

        start = time.perf_counter()  # 4. the student scores y at the teacher's top-k ids
        student_hidden = self._hidden(self.student, batch["student_ids"], batch["student_attention_mask"])
        student_h, _ = select_targets(student_hidden, batch["student_ids"], batch["student_mask"])  # (N, H)
        student_logits = gathered_logits(student_h, output_weight(self.student), topk_ids, hp.chunk_size)  # (N, k)
        terms = topk_divergence(student_logits, teacher_logits, hp.divergence, hp.forward_weight)
        loss = normalised_sum(  # 5. token mean over the global batch
            terms["loss"], int(batch["global_tokens"]), self.trainer.accumulate_grad_batches, self.trainer.world_size
        )
        student_s = time.perf_counter() - start

        n = max(int(topk_ids.shape[0]), 1)
        metrics = {
            "train/loss": terms["loss"].detach().sum() / n,
            "train/kl_forward": terms["kl_forward"].detach().sum() / n,
            "train/kl_reverse": terms["kl_reverse"].detach().sum() / n,
            "teacher/topk_mass": topk_mass.sum() / n,
            "tokens": torch.tensor(float(topk_ids.shape[0])),
        }
        return loss, metrics, {"time/teacher_s": teacher_s, "time/student_s": student_s}

    @staticmethod
    def _hidden(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) of the decoder, positions counted over real tokens."""
        out = backbone(model)(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
        return out.last_hidden_state

    def on_train_epoch_start(self) -> None:
        stats = self.trainer.datamodule.rollout_stats  # this epoch's rollouts, generated just before this hook
        if stats:
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        steps = self.trainer.datamodule.optimizer_steps_per_epoch(
            self.trainer.world_size, self.trainer.accumulate_grad_batches
        )
        return build_optimizer(
            self.student.parameters(), hp.lr, hp.weight_decay, hp.betas, total_optimizer_steps(self.trainer, steps),
            hp.warmup_steps, 0.0, hp.lr_schedule, hp.min_lr_ratio,
        )

    # ----------------------------------------------------------------------------------------------- export
    def export_path(self) -> str:
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return self.hparams.export_dir or os.path.join(root, "hf_model")

    def on_train_end(self) -> None:
        path = self.export_path()
        if self.trainer.is_global_zero:
            self.student.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            rank_zero_info(f"student saved as a Hugging Face model in {path}")
        self.trainer.strategy.barrier("export")
