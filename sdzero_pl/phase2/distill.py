"""Phase 2 of SD-Zero: on-policy self-distillation of the Reviser into the Generator (docs/method.md, "Phase 2").

Per optimizer step (the batch is built by :class:`~sdzero_pl.phase2.OnPolicyDataModule`):

1. the student sampled one completion y per question from its current weights;
2. y was verified, r picked the control phrase P_r;
3. the FROZEN teacher scores the second copy of y in ``chat(x) + y + P_r + y`` (no grad) -> its top-k ids;
4. the student scores y in ``chat(x) + y`` at those ids only; per-token divergence over the renormalised top-k;
5. token mean over every valid token of the global batch.

Default divergence is the reference code's "mixed" (0.5 forward + 0.5 reverse); the paper's Eq. 4 is "reverse".
Drift monitor: every ``drift_every_n_steps`` optimizer steps ``student/topk_mass`` logs the student's full-vocab
probability mass on the teacher's top-k (the renormalised loss cannot see mass the student moves outside it), next
to ``teacher/topk_mass``; ``tail=True`` adds a (k+1)-th "rest" bucket to both distributions (off: the paper).
At the end of ``fit`` the student is saved as a standard HF directory (model + tokenizer).

Strategies by flag: DDP as is; ``--trainer.strategy=fsdp`` (FSDP1) and ModelParallelStrategy (FSDP2) shard each
role in ``configure_model`` (``sdzero_pl/core/sharding.py``); every computation on a role goes through :meth:`score`.
"""

from __future__ import annotations

import copy
import os
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sdzero_pl.contracts import RolloutData, connect
from sdzero_pl.core.artifacts import use_atomic_checkpoints
from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.guard import guard_callbacks
from sdzero_pl.core.losses import (
    DIVERGENCES, full_logsumexp, gathered_logits, normalised_sum, teacher_topk, topk_divergence
)
from sdzero_pl.core.models import (
    EXPORT_KEY, check_dtypes, check_model_source, export_hf, export_path, hidden_states, load_model, load_policy,
    load_tokenizer, output_weight
)
from sdzero_pl.core.optim import OptimArgs, optimizer_for
from sdzero_pl.core.sequences import select_targets
from sdzero_pl.core.sharding import gather_state_dict, shard_fsdp2, wrap_fsdp1
from sdzero_pl.phase1.handoff import read_handoff

PHASE2_OPTIM = OptimArgs(lr=5e-6, warmup_steps=20)


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
        chunk_size: int = 512,
        tail: bool = False,
        drift_every_n_steps: int = 10,
        optim: OptimArgs = PHASE2_OPTIM,
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
            tail: compare k + 1 buckets, the k full-vocab probabilities and a "rest" bucket (1 - mass on the top-k),
                for both distributions, so mass the student moves outside the teacher's top-k costs loss (needs
                the student's full-vocab normaliser with gradient: one more chunked LM-head pass). Off: the paper's
                renormalised top-k.
            drift_every_n_steps: log ``student/topk_mass``, the student's full-vocab mass on the teacher's top-k,
                every N optimizer steps (a no-grad chunked LM-head pass over the step's tokens); 0 = never. With
                ``tail`` it is free and logged every step.
            optim: AdamW and its schedule (paper's launch script: lr 5e-6; reference code: 20 warm-up steps from
                0.1 x lr, then constant, weight decay 0.01: ``warmup_start: 0.1, weight_decay: 0.01``).
            gradient_checkpointing: recompute the student's activations in backward to save memory.
            export_dir: where the final HF model goes; default ``<default_root_dir>/hf_model``.
        """
        super().__init__()
        if top_k < 1:
            raise ValueError(f"`--model.top_k` must be >= 1, got {top_k}")
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"`--model.divergence` must be one of {DIVERGENCES}, got {divergence!r}")
        if not 0.0 <= forward_weight <= 1.0:
            raise ValueError(f"`--model.forward_weight` must be in [0, 1], got {forward_weight}")
        if drift_every_n_steps < 0:
            raise ValueError(f"`--model.drift_every_n_steps` must be >= 0, got {drift_every_n_steps}")
        check_dtypes(dtype)
        if teacher_name_or_path:
            check_model_source(teacher_name_or_path, "--model.teacher_name_or_path")
        self.save_hyperparameters()
        self.optim = OptimArgs.hold(self, optim)
        self.chunk_size = chunk_size
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.policy: torch.nn.Module | None = None  # the student
        self.teacher: torch.nn.Module | None = None
        self.sharding: str | None = None  # None (single device / DDP), "fsdp1" or "fsdp2"
        self.budget = {"generations": 0, "tokens": 0}  # Phase-2 rollouts generated so far, all ranks
        self.data: RolloutData | None = None
        self.resumed_export: str | None = None  # where the run this one resumes exports (from its checkpoint)

    @property
    def start_model(self) -> str:
        return self.hparams.model_name_or_path

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the data module samples from this module's student and checks its hand-off record
            self.data = connect(self, self.trainer.datamodule, RolloutData)
            use_atomic_checkpoints(self.trainer)
            if self._start_budget() is None:  # reported, not skipped: the export's budget.json will lack Phase 1
                report = rank_zero_warn if read_handoff(self.start_model) is not None else rank_zero_info
                report(f"`--model.model_name_or_path` {self.start_model!r} has no budget.json: the exported "
                       "budget.json counts Phase 2's rollouts only")

    def configure_callbacks(self) -> list[L.Callback]:
        return guard_callbacks(self)  # non-finite loss / gradients / weights stop training, nothing is exported

    def _start_budget(self) -> str | None:
        """The sample ledger of the student's start model (the Phase-1 generations that made it), if it has one."""
        path = os.path.join(self.start_model, "budget.json")
        return path if os.path.isfile(path) else None

    # ------------------------------------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = load_policy(hp.model_name_or_path, hp.dtype, hp.gradient_checkpointing)
        if hp.teacher_name_or_path:
            self.teacher = load_model(hp.teacher_name_or_path, hp.dtype, flag="--model.teacher_name_or_path")
        else:
            self.teacher = copy.deepcopy(self.policy)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self._shard()

    def _shard(self) -> None:
        """Shard both roles the same way (the teacher in its own units), as the trainer's strategy asks."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self._trainer  # None when configure_model is called outside a Trainer
        if self.device_mesh is not None:  # ModelParallelStrategy
            precision = str(trainer.precision) if trainer is not None else "32-true"
            self.policy = shard_fsdp2(self.policy, self.device_mesh, precision)
            self.teacher = shard_fsdp2(self.teacher, self.device_mesh, precision)
            self.sharding = "fsdp2"
        elif trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
            self.policy = wrap_fsdp1(self.policy, trainer.strategy)
            self.teacher = wrap_fsdp1(self.teacher, trainer.strategy)
            self.sharding = "fsdp1"
        if self.sharding:
            self.teacher.eval()  # the new wrappers too

    def score(self, role: str, fn, *args):
        """``fn(hf_model, *args)`` on the "policy" (the student) or the "teacher"; when sharded, as one forward of
        the role's FSDP root, so every parameter ``fn`` touches (decoder, final norm, tied LM head) is gathered for it."""
        roles = {"policy": self.policy, "teacher": self.teacher}
        if role not in roles:
            raise ValueError(f"`role` must be one of {sorted(roles)}, got {role!r}")
        model = roles[role]
        return model(fn, *args) if self.sharding else fn(model, *args)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: never in train mode, whatever Lightning toggles
        return self

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Hard-copy the student into the teacher (teacher synchronization). Copies parameter by parameter, so
        sharded models copy their local shards only."""
        student = dict(self.policy.named_parameters())
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
            topk_ids, teacher_logits, topk_mass = self.score(
                "teacher", self._teacher_topk, batch["teacher_ids"], batch["teacher_attention_mask"],
                batch["teacher_mask"], hp.top_k, hp.chunk_size,
            )  # (N, k), (N, k), (N,)
        teacher_s = time.perf_counter() - start

        start = time.perf_counter()  # 4. the student scores y at the teacher's top-k ids
        every = hp.drift_every_n_steps
        normaliser = "grad" if hp.tail else ("metric" if every and self.global_step % every == 0 else None)
        student_logits, student_lse = self.score(
            "policy", self._student_logits, batch["student_ids"], batch["student_attention_mask"],
            batch["student_mask"], topk_ids, hp.chunk_size, normaliser,
        )  # (N, k), (N,) or None
        student_log_mass = None if student_lse is None else student_logits.logsumexp(-1) - student_lse  # (N,)
        tail = dict(student_log_mass=student_log_mass, teacher_log_mass=topk_mass.log()) if hp.tail else {}
        terms = topk_divergence(student_logits, teacher_logits, hp.divergence, hp.forward_weight, **tail)
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
        if student_log_mass is not None:  # the drift monitor
            metrics["student/topk_mass"] = student_log_mass.detach().exp().sum() / n
        return loss, metrics, {"time/teacher_s": teacher_s, "time/student_s": student_s}

    @classmethod
    def _teacher_topk(cls, model, ids, attention_mask, mask, top_k: int, chunk_size: int):
        teacher_h, _ = select_targets(hidden_states(model, ids, attention_mask), ids, mask)  # (N, H)
        return teacher_topk(teacher_h, output_weight(model), top_k, chunk_size)

    @classmethod
    def _student_logits(cls, model, ids, attention_mask, mask, topk_ids, chunk_size: int, normaliser: str | None):
        """The student's logits at the top-k ids and, if asked, its full-vocab normaliser: with gradient ("grad",
        the tail term) or without ("metric", the drift monitor only)."""
        student_h, _ = select_targets(hidden_states(model, ids, attention_mask), ids, mask)  # (N, H)
        weight = output_weight(model)
        logits = gathered_logits(student_h, weight, topk_ids, chunk_size)  # (N, k)
        if normaliser == "grad":
            return logits, full_logsumexp(student_h, weight, chunk_size)
        if normaliser == "metric":
            with torch.no_grad():
                return logits, full_logsumexp(student_h.detach(), weight.detach(), chunk_size)
        return logits, None

    def on_train_epoch_start(self) -> None:
        stats = self.data.rollout_stats  # this epoch's rollouts, generated just before this hook
        if stats:
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
            counts = torch.tensor([stats["rollout/generations"], stats["rollout/generated_tokens"]],
                                  dtype=torch.float64, device=self.device)
            generations, tokens = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # all ranks
            self.budget["generations"] += int(generations)
            self.budget["tokens"] += int(tokens)
            self.log_dict({"budget/phase2_generations": float(self.budget["generations"]),
                           "budget/phase2_tokens": float(self.budget["tokens"])}, on_step=False, on_epoch=True,
                          batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sdzero_budget"] = dict(self.budget)  # a resumed run keeps counting from here
        checkpoint[EXPORT_KEY] = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.budget = dict(checkpoint.get("sdzero_budget", {"generations": 0, "tokens": 0}))
        self.resumed_export = checkpoint.get(EXPORT_KEY)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.sharding == "fsdp1" and gradient_clip_val:  # Lightning's FSDP1 plugin cannot clip by norm itself
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("`--trainer.gradient_clip_algorithm` must be 'norm' with FSDP, got "
                                 f"{gradient_clip_algorithm!r}")
            self.policy.clip_grad_norm_(gradient_clip_val)  # the root's norm over all shards
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        steps = self.data.optimizer_steps_per_epoch(self.trainer.world_size, self.trainer.accumulate_grad_batches)
        return optimizer_for(self.policy.parameters(), self.optim, self.trainer, steps)

    # ----------------------------------------------------------------------------------------------- export
    def on_train_end(self) -> None:
        path = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)
        # sharded: full tensors gathered one at a time, kept on rank 0 only (no second full copy on other ranks)
        state = gather_state_dict(self.policy) if self.sharding else None
        if self.trainer.is_global_zero:
            summary = []

            def write_budget(directory) -> None:  # inside the export, before it is published
                ledger = BudgetLedger(os.path.join(directory, "budget.json"))
                if self._start_budget() is not None:  # the Phase-1 generations that made the student's start
                    ledger.merge(self._start_budget())
                ledger.set("phase2/rollout", self.budget["generations"], self.budget["tokens"])
                summary.append(ledger.summary())

            export_hf(self.policy, self.tokenizer, path, state_dict=state, extra=write_budget)
            rank_zero_info(f"student saved as a Hugging Face model in {path}; sample budget: {summary[0]}")
        self.trainer.strategy.barrier("export")
