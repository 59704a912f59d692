"""Phase 1 of SD-Zero: Self-Revision Training (SRT), SFT on the model's own verified revisions (docs/method.md,
"Phase 1").

Each trace (x, init, P_r, revision), collected by :class:`~sdzero_pl.phase1.data.TraceDataModule` with the model
itself before any weight changes, becomes ONE token sequence ``chat(x) + init + "\\n\\n" + P_r + "\\n\\n" +
revision + EOS`` with two completion-only masks:

* revision mask: the revision and its EOS, i.e. -log p(revision | x, init, P_r)               (paper Eq. 1)
* generation mask: init, delimiter, revision and EOS, -log p(init + P_r + revision | x)          (paper Eq. 2)

:class:`SelfReviseSFTModule` minimises L_SRT = L_revision + L_generation (Eq. 3): both from one forward pass, each
the token mean over ITS tokens of the global batch (every micro-batch, every rank), so the result does not depend
on how the batch is split. Prompt and padding tokens are never targets. ``objective`` offers the paper's ablations
("generation", "revision"; Table 11) and the reference code's two sequential stages ("two_stage": stage 1 =
generation examples of wrong-init traces, stage 2 = ``stage2_size`` revision examples, correct-init first; a new
warm-up + decay and fresh AdamW moments per stage). Deviation: in "two_stage" the stage-2 context stays in the
assistant turn (as the Phase-2 teacher sees it); the reference code puts x + init + P_r in the user turn.

At the end of ``fit`` the model and tokenizer are saved as a standard HF directory (``export_dir``), the start of
Phase 2's student and teacher, with ``budget.json`` (the generations that made it) and, for Phase 1, the hand-off
record Phase 2 checks (:mod:`sdzero_pl.phase1.handoff`). RFT trains with this same module (its data module serves
``chat(x) + y + EOS`` examples whose revision mask is empty).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sdzero_pl.contracts import SFTData, connect
from sdzero_pl.core.artifacts import use_atomic_checkpoints
from sdzero_pl.core.guard import guard_callbacks
from sdzero_pl.core.losses import normalised_sum, token_logps
from sdzero_pl.core.models import (
    EXPORT_KEY, check_dtypes, export_hf, export_path, hidden_states, load_policy, load_tokenizer, output_weight
)
from sdzero_pl.core.optim import OptimArgs, build_optimizer
from sdzero_pl.core.prompts import SEPARATOR
from sdzero_pl.core.sequences import pad_sequences, select_targets
from sdzero_pl.data.questions import DataError
from sdzero_pl.phase1.handoff import write_handoff

OBJECTIVES = ("both", "generation", "revision", "two_stage")


# --------------------------------------------------------------------------------------------------- examples
@dataclasses.dataclass
class SRTExample:
    ids: list[int]  # chat(x) + init + delimiter + revision + EOS
    revision_mask: list[int]  # 1 on revision + EOS
    generation_mask: list[int]  # 1 on init + delimiter + revision + EOS
    truncated: bool = False  # cut at max_length
    init_correct: bool = False

    @property
    def num_revision_tokens(self) -> int:
        return sum(self.revision_mask)

    @property
    def num_generation_tokens(self) -> int:
        return sum(self.generation_mask)


def build_srt_example(prompt_ids: Sequence[int], init_ids: Sequence[int], control_ids: Sequence[int],
                      revision_ids: Sequence[int], max_length: int, init_correct: bool = False) -> SRTExample:
    """One sequence, both masks; ``revision_ids`` already end with EOS. Longer than ``max_length``: cut on the right."""
    assert len(prompt_ids) > 0, "the prompt must not be empty: position 0 can never be a target"
    ids = list(prompt_ids) + list(init_ids) + list(control_ids) + list(revision_ids)
    n_prompt, n_revision = len(prompt_ids), len(revision_ids)
    generation_mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
    revision_mask = [0] * (len(ids) - n_revision) + [1] * n_revision
    truncated = len(ids) > max_length
    return SRTExample(ids[:max_length], revision_mask[:max_length], generation_mask[:max_length], truncated,
                      init_correct)


def encode_trace(tokenizer, trace: dict, max_length: int) -> SRTExample:
    """Token ids of a trace; the delimiter ``"\\n\\n" + P_r + "\\n\\n"`` is tokenized on its own, as in Phase 2."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return build_srt_example(encode(trace["prompt"]), encode(trace["init"]),
                             encode(SEPARATOR + trace["control"] + SEPARATOR),
                             encode(trace["revision"]) + [tokenizer.eos_token_id], max_length,
                             (trace.get("init_reward") or 0.0) >= 0.5)


def masked(example: SRTExample, revision: bool = False, generation: bool = False) -> SRTExample:
    """A copy with the named masks zeroed (the tokens stay as context)."""
    return dataclasses.replace(
        example,
        revision_mask=[0] * len(example.ids) if revision else list(example.revision_mask),
        generation_mask=[0] * len(example.ids) if generation else list(example.generation_mask),
    )


def objective_stages(examples: Sequence[SRTExample], objective: str, stage2_size: int, seed: int,
                     ) -> list[list[SRTExample]]:
    """The examples of each training stage: one stage, or two for "two_stage" (reference code's split)."""
    if objective == "both":
        return [list(examples)]
    if objective == "generation":
        return [[masked(e, revision=True) for e in examples]]
    if objective == "revision":
        return [[masked(e, generation=True) for e in examples]]
    rng = random.Random(seed)
    wrong = [e for e in examples if not e.init_correct]
    right = [e for e in examples if e.init_correct]
    rng.shuffle(wrong)
    rng.shuffle(right)
    n_right = min(len(right), stage2_size)  # stage 1 cannot use right-init traces: they go to stage 2 first
    n_wrong = min(len(wrong), stage2_size - n_right)
    stage2 = right[:n_right] + wrong[:n_wrong]
    rng.shuffle(stage2)
    stage1 = wrong[n_wrong:]
    if not stage1 or not stage2:
        raise DataError(f"`objective: two_stage` needs traces for both stages: stage 1 got {len(stage1)} wrong-init "
                        f"traces, stage 2 got {len(stage2)}; lower `--data.stage2_size` ({stage2_size}) or collect more")
    return [[masked(e, revision=True) for e in stage1], [masked(e, generation=True) for e in stage2]]


def collate_srt(examples: Sequence[SRTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is never a target and never attended (masks built from lengths)."""
    return {
        "input_ids": pad_sequences([e.ids for e in examples], pad_id),  # (B, T)
        "attention_mask": pad_sequences([[1] * len(e.ids) for e in examples], 0),  # (B, T)
        "revision_mask": pad_sequences([e.revision_mask for e in examples], 0),  # (B, T)
        "generation_mask": pad_sequences([e.generation_mask for e in examples], 0),  # (B, T)
    }


# ------------------------------------------------------------------------------------------------------- loss
def srt_loss(model: torch.nn.Module, batch: dict, accumulate: int = 1, world_size: int = 1,
             chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """L_revision + L_generation of one micro-batch, each normalised by its global token count (Eq. 3)."""
    ids = batch["input_ids"]
    hidden = hidden_states(model, ids, batch["attention_mask"])  # (B, T, H)
    targets_mask = batch["revision_mask"].bool() | batch["generation_mask"].bool()  # (B, T)
    h, targets = select_targets(hidden, ids, targets_mask)  # (N, H), (N,)
    where = targets_mask[:, 1:]
    revision = batch["revision_mask"][:, 1:][where].float()  # (N,)
    generation = batch["generation_mask"][:, 1:][where].float()  # (N,)
    nll = -token_logps(h, output_weight(model), targets, chunk_size)  # (N,)
    loss_revision = normalised_sum(nll * revision, int(batch["global_revision_tokens"]), accumulate, world_size)
    loss_generation = normalised_sum(nll * generation, int(batch["global_generation_tokens"]), accumulate, world_size)
    loss = loss_revision + loss_generation
    if nll.numel() == 0:
        loss = hidden.sum() * 0.0  # a padding-only micro-batch: keep the graph, contribute nothing
    return {
        "loss": loss,
        "nll_revision": (nll.detach() * revision).sum() / revision.sum().clamp(min=1),
        "nll_generation": (nll.detach() * generation).sum() / generation.sum().clamp(min=1),
        "tokens_revision": revision.sum(),
        "tokens_generation": generation.sum(),
    }


# ------------------------------------------------------------------------------------------------- the module
SRT_OPTIM = OptimArgs(lr=5e-6, weight_decay=1e-4, betas=(0.9, 0.95), warmup_ratio=0.05, schedule="cosine")


class SelfReviseSFTModule(L.LightningModule):
    """Completion-only SFT of p(init + P_r + revision | x) and p(revision | x, init, P_r) on verified traces."""

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "bfloat16",
        optim: OptimArgs = SRT_OPTIM,
        chunk_size: int = 1024,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        export_dtype: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: the base model (hub id or HF directory); it also samples the traces.
            dtype: weights dtype: float32, bfloat16, float16 or float64 (float32 + ``trainer.precision:
                bf16-mixed`` keeps fp32 master weights, which a 5e-6 learning rate needs).
            optim: AdamW and its schedule (paper: lr 5e-6, cosine, 5% warm-up, weight decay 1e-4, betas 0.9 / 0.95).
            chunk_size: tokens per chunk of the output-layer + cross-entropy computation (memory bound).
            gradient_checkpointing: recompute activations in backward to save memory (paper: on).
            export_dir: where the final HF model goes; default ``<default_root_dir>/hf_model``.
            export_dtype: dtype of the exported weights (e.g. bfloat16); default: as trained.
        """
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        check_dtypes(dtype, export_dtype)
        self.save_hyperparameters()
        self.optim = OptimArgs.hold(self, optim)
        self.chunk_size = chunk_size
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.policy: torch.nn.Module | None = None
        self.data: SFTData | None = None
        self._stage: int | None = None
        self.resumed_export: str | None = None  # where the run this one resumes exports (from its checkpoint)

    @property
    def start_model(self) -> str:
        return self.hparams.model_name_or_path

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the data module prepares its examples (collecting them first) with this module
            self.data = connect(self, self.trainer.datamodule, SFTData)
            use_atomic_checkpoints(self.trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        return guard_callbacks(self)  # non-finite loss / gradients / weights stop training, nothing is exported

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[EXPORT_KEY] = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed_export = checkpoint.get(EXPORT_KEY)

    def configure_model(self) -> None:
        """Load the model once (the data module calls this early: the traces are sampled before training)."""
        if self.policy is not None:
            return
        self.policy = load_policy(self.hparams.model_name_or_path, self.hparams.dtype, self.hparams.gradient_checkpointing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        out = srt_loss(self.policy, batch, self.trainer.accumulate_grad_batches, self.trainer.world_size,
                       self.chunk_size)
        n = max(int(out["tokens_generation"] + out["tokens_revision"]), 1)
        self.log_dict({"train/loss": out["loss"].detach(), "train/nll_revision": out["nll_revision"],
                       "train/nll_generation": out["nll_generation"]},
                      on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({"train/tokens_revision": out["tokens_revision"], "train/tokens_generation": out["tokens_generation"],
                       "time/step_s": time.perf_counter() - start}, on_step=True, on_epoch=False, batch_size=1)
        return out["loss"]

    def on_train_epoch_start(self) -> None:
        stage = self.data.stage_of_epoch(self.current_epoch)
        if self._stage is not None and stage != self._stage:
            for optimizer in self.trainer.optimizers:  # a new stage starts from fresh AdamW moments (reference code)
                optimizer.state.clear()
            rank_zero_info(f"SRT stage {stage + 1} starts at epoch {self.current_epoch}")
        self._stage = stage
        self.log_dict({"train/stage": float(stage), **self.data.stats}, on_step=False, on_epoch=True, batch_size=1)

    def configure_optimizers(self) -> dict:
        # each stage warms up and decays on its own, as two separate runs would
        return build_optimizer(self.policy.parameters(), self.optim, self.data.stage_steps(self.trainer))

    def on_fit_end(self) -> None:
        """Save the SRT model as a standard HF directory (also when there was nothing to train on), with its sample
        budget and the hand-off record Phase 2 checks."""
        path = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)
        if self.trainer.is_global_zero:
            budget = self.data.paths().budget
            if not budget.is_file():  # e.g. trained on --data.extra_traces_file only: nothing was sampled here
                rank_zero_warn(f"{budget} does not exist: the export carries no budget.json")
            handoff = self.data.handoff()
            export_hf(self.policy, self.tokenizer, path, dtype=self.hparams.export_dtype,
                      budget=budget if budget.is_file() else None,
                      extra=None if handoff is None else lambda directory: write_handoff(directory, handoff))
            rank_zero_info(f"SFT model saved as a Hugging Face model in {path}")
        self.trainer.strategy.barrier("export")
