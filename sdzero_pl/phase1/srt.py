"""Phase 1 of SD-Zero: Self-Revision Training (SRT), SFT on the model's own verified revisions (SPEC "Phase 1").

:class:`TraceDataModule` collects (or reuses) the traces (x, init, P_r, revision) with the model being trained,
before any weight changes (:mod:`sdzero_pl.phase1.collect`), and turns each trace into ONE token sequence
``chat(x) + init + "\\n\\n" + P_r + "\\n\\n" + revision + EOS`` with two completion-only masks:

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
Phase 2's student and teacher; ``budget.json`` (Phase 1 generations) is copied next to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.phase1.collect import (TraceCollector, clean_traces, load_traces, phase1_question_ids, read_trace_file,
                               trace_stats)
from sdzero_pl.core.losses import normalised_sum
from sdzero_pl.core.models import backbone, load_model, load_tokenizer, output_weight, resolve_dtype
from sdzero_pl.core.optim import build_optimizer, check_schedule, lr_factor, total_optimizer_steps
from sdzero_pl.core.prompts import SEPARATOR, control_phrases, stop_token_ids
from sdzero_pl.data.questions import LOCAL_FORMATS, DataError
from sdzero_pl.tasks import MathReward, Verifier
from sdzero_pl.rollout import HFRollout, RolloutBackend
from sdzero_pl.core.sequences import pad_sequences, position_ids, select_targets

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
def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (n, V), one chunk only
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """-log p(target) per token without ever holding [N, V] logits: each chunk's logits are recomputed in
    backward (activation checkpointing). hidden (N, H), weight (V, H), targets (N,) -> (N,), at least float32."""
    parts = []
    track = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
        parts.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if track else _chunk_nll(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def srt_loss(model: torch.nn.Module, batch: dict, accumulate: int = 1, world_size: int = 1,
             chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """L_revision + L_generation of one micro-batch, each normalised by its global token count (Eq. 3)."""
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    hidden = backbone(model)(input_ids=ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask)).last_hidden_state  # (B, T, H)
    targets_mask = batch["revision_mask"].bool() | batch["generation_mask"].bool()  # (B, T)
    h, targets = select_targets(hidden, ids, targets_mask)  # (N, H), (N,)
    where = targets_mask[:, 1:]
    revision = batch["revision_mask"][:, 1:][where].float()  # (N,)
    generation = batch["generation_mask"][:, 1:][where].float()  # (N,)
    nll = chunked_nll(h, output_weight(model), targets, chunk_size)  # (N,)
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
class SelfReviseSFTModule(L.LightningModule):
    """Completion-only SFT of p(init + P_r + revision | x) and p(revision | x, init, P_r) on verified traces."""

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "bfloat16",
        lr: float = 5e-6,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.05,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
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
            lr: AdamW learning rate (paper: 5e-6).
            weight_decay: AdamW weight decay (paper: 1e-4).
            betas: AdamW betas (paper: 0.9, 0.95).
            warmup_ratio: linear warm-up as a fraction of each stage's optimizer steps (paper: 0.05).
            warmup_steps: linear warm-up in optimizer steps; overrides ``warmup_ratio`` when > 0.
            lr_schedule: after warm-up: "cosine" (paper), "linear" or "constant".
            min_lr_ratio: floor of the decayed learning rate, as a fraction of ``lr``.
            chunk_size: tokens per chunk of the output-layer + cross-entropy computation (memory bound).
            gradient_checkpointing: recompute activations in backward to save memory (paper: on).
            export_dir: where the final HF model goes; default ``<log_dir>/hf_model``.
            export_dtype: dtype of the exported weights (e.g. bfloat16); default: as trained.
        """
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"`--model.chunk_size` must be >= 1, got {chunk_size}")
        check_schedule(lr_schedule, warmup_steps, warmup_ratio)
        resolve_dtype(dtype)
        if export_dtype is not None:
            resolve_dtype(export_dtype)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model: torch.nn.Module | None = None
        self._stage: int | None = None

    def configure_model(self) -> None:
        """Load the model once (the data module calls this early: the traces are sampled before training)."""
        if self.model is not None:
            return
        self.model = load_model(self.hparams.model_name_or_path, self.hparams.dtype)
        self.model.train()
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        out = srt_loss(self.model, batch, self.trainer.accumulate_grad_batches, self.trainer.world_size,
                       self.hparams.chunk_size)
        n = max(int(out["tokens_generation"] + out["tokens_revision"]), 1)
        self.log_dict({"train/loss": out["loss"].detach(), "train/nll_revision": out["nll_revision"],
                       "train/nll_generation": out["nll_generation"]},
                      on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({"train/tokens_revision": out["tokens_revision"], "train/tokens_generation": out["tokens_generation"],
                       "time/step_s": time.perf_counter() - start}, on_step=True, on_epoch=False, batch_size=1)
        return out["loss"]

    def on_train_epoch_start(self) -> None:
        data = self.trainer.datamodule
        stage = data.stage_of_epoch(self.current_epoch)
        if self._stage is not None and stage != self._stage:
            for optimizer in self.trainer.optimizers:  # a new stage starts from fresh AdamW moments (reference code)
                optimizer.state.clear()
            rank_zero_info(f"SRT stage {stage + 1} starts at epoch {self.current_epoch}")
        self._stage = stage
        self.log_dict({"train/stage": float(stage), **data.stats}, on_step=False, on_epoch=True, batch_size=1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        stage_steps = self.trainer.datamodule.stage_steps(self.trainer)
        result = build_optimizer(self.model.parameters(), hp.lr, hp.weight_decay, hp.betas, sum(stage_steps),
                                 hp.warmup_steps, hp.warmup_ratio, hp.lr_schedule, hp.min_lr_ratio)
        if len(stage_steps) > 1:  # each stage warms up and decays on its own, as two separate runs would
            result["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                result["optimizer"], lambda step: staged_lr_factor(step, stage_steps, hp.warmup_steps,
                                                                   hp.warmup_ratio, hp.lr_schedule, hp.min_lr_ratio))
        return result

    def export_path(self) -> str:
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return self.hparams.export_dir or os.path.join(root, "hf_model")

    def on_fit_end(self) -> None:
        """Save the SRT model as a standard HF directory (also when there was nothing to train on)."""
        path = self.export_path()
        if self.trainer.is_global_zero:
            if self.hparams.gradient_checkpointing:
                self.model.config.use_cache = True  # the saved model generates with its KV cache
            if self.hparams.export_dtype is not None:
                self.model.to(resolve_dtype(self.hparams.export_dtype))
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            budget = self.trainer.datamodule.budget_path()
            if budget.exists():
                shutil.copy(budget, os.path.join(path, "budget.json"))
            rank_zero_info(f"SRT model saved as a Hugging Face model in {path}")
        self.trainer.strategy.barrier("export")


def staged_lr_factor(step: int, stage_steps: Sequence[int], warmup_steps: int, warmup_ratio: float, schedule: str,
                     min_ratio: float) -> float:
    """LR multiplier when each stage has its own warm-up and decay (``lr_factor`` within the stage)."""
    for index, total in enumerate(stage_steps):
        if step < total or index == len(stage_steps) - 1:
            warmup = warmup_steps or int(round(warmup_ratio * total))
            return lr_factor(step, total, warmup, schedule, min_ratio)
        step -= total
    return 1.0


# --------------------------------------------------------------------------------------------- the data module
class MicroBatches(IterableDataset):
    """One epoch's micro-batches of this rank, collated lazily. Iterable, so Lightning does not re-shard it."""

    def __init__(self, plan: list[tuple[list[int], int, int]], examples: list[SRTExample], pad_id: int) -> None:
        self.plan, self.examples, self.pad_id = plan, examples, pad_id

    def __iter__(self) -> Iterator[dict]:
        for indices, revision_tokens, generation_tokens in self.plan:
            # index -1: a padding slot (every rank gets as many micro-batches): context only, no target
            rows = [self.examples[i] if i >= 0 else masked(self.examples[0], True, True) for i in indices]
            batch = collate_srt(rows, self.pad_id)
            batch["global_revision_tokens"] = torch.tensor(revision_tokens)
            batch["global_generation_tokens"] = torch.tensor(generation_tokens)
            yield batch

    def __len__(self) -> int:
        return len(self.plan)


class TraceDataModule(L.LightningDataModule):
    """Collects (or reuses) Phase-1 traces with the model being trained, then serves SRT micro-batches."""

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
        num_questions: int = 10_000,
        inits_per_question: int = 1,
        revisions_per_init: int = 3,
        revise_correct: bool = True,
        revise_wrong: bool = True,
        target_traces: int | None = None,
        keep_incorrect: bool = False,
        questions_per_chunk: int = 64,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        control_preset: str = "paper",
        control_correct: str | None = None,
        control_wrong: str | None = None,
        output_dir: str | None = None,
        recollect: bool = False,
        extra_traces_file: str | None = None,
        min_traces: int = 1,
        trim_repeats: bool = True,
        strip_openers: bool = True,
        dedupe: bool = True,
        objective: str = "both",
        stage2_size: int = 1000,
        stage1_epochs: int = 3,
        batch_size: int = 1,
        max_length: int = 32768,
        shuffle: bool = True,
        show_progress: bool = True,
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
            num_questions: N1, Phase 1 uses the first N1 questions (paper: 10K); 0 = no collection (train on
                ``extra_traces_file`` only). Phase 2 must skip them (``skip_first`` or ``exclude_ids_file``).
            inits_per_question: initial answers sampled per question (paper: 1; reference code: 3).
            revisions_per_init: revisions sampled per initial answer (paper: 3).
            revise_correct: sample revisions of correct inits ("rephrase" branch, r=1; reference code: off).
            revise_wrong: sample revisions of wrong inits ("start over" branch, r=0).
            target_traces: stop collecting once this many traces are kept (reference code: 6000); null = all N1.
            keep_incorrect: also write revisions that failed verification (flagged; never trained on).
            questions_per_chunk: questions per generation round; the unit of resumption (a chunk is written whole).
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward.
            control_preset: control phrases: "paper", "qwen" or "olmo" (Phase 2 must use the same).
            control_correct: override of the r=1 control phrase.
            control_wrong: override of the r=0 control phrase.
            output_dir: traces.jsonl, budget.json and phase1_question_ids.json go here; default
                ``<default_root_dir>/srt_data``. A finished collection there is reused, a partial one resumed.
            recollect: discard an existing collection in ``output_dir`` and start over.
            extra_traces_file: a trace JSONL (handcrafted or collected elsewhere) trained on in addition.
            min_traces: fewer traces than this after cleaning is an error; 0 allows a run with none (the
                exported model is then the base model: smoke tests with a random model).
            trim_repeats: cut degenerate repeating tails of inits and revisions (reference code).
            strip_openers: strip sycophantic openers ("You're absolutely right...") from revisions (reference code).
            dedupe: drop repeated (question, init, revision) traces (reference code).
            objective: "both" (paper: L_revision + L_generation), "generation", "revision" (ablations, paper
                Table 11) or "two_stage" (reference code: generation stage, then revision stage).
            stage2_size: traces of the revision stage in "two_stage" (reference code: 1000).
            stage1_epochs: epochs of the generation stage in "two_stage"; the other ``max_epochs`` are stage 2.
            batch_size: sequences per micro-batch on each rank.
            max_length: longest training sequence in tokens; longer ones are cut on the right (and counted).
            shuffle: reshuffle the examples every epoch (seeded by ``seed`` and the epoch).
            show_progress: progress bar over the collected questions (kept traces, acceptance rate).
            seed: seed of the collection's sampling and of the example order.
        """
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"`--data.objective` must be one of {OBJECTIVES}, got {objective!r}")
        for flag, value, low in (("num_questions", num_questions, 0), ("min_traces", min_traces, 0),
                                 ("stage2_size", stage2_size, 1), ("stage1_epochs", stage1_epochs, 1),
                                 ("batch_size", batch_size, 1), ("max_length", max_length, 2)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        if num_questions == 0 and extra_traces_file is None:
            raise ValueError("`--data.num_questions` is 0 and no `--data.extra_traces_file` is given: no traces")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.phrases = control_phrases(control_preset, control_correct, control_wrong)
        self.stages: list[list[SRTExample]] | None = None
        self.stats: dict[str, float] = {}
        self._epoch_plan: tuple[int, DataLoader] | None = None

    # ---------------------------------------------------------------------------------------------- paths
    def output_dir(self) -> Path:
        return Path(self.hparams.output_dir or os.path.join(self.trainer.default_root_dir, "srt_data"))

    def traces_path(self) -> Path:
        return self.output_dir() / "traces.jsonl"

    def budget_path(self) -> Path:
        return self.output_dir() / "budget.json"

    def question_ids_path(self) -> Path:
        return self.output_dir() / "phase1_question_ids.json"

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.stages is not None:
            return
        trainer, hp = self.trainer, self.hparams
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("SRT reshuffles (and in two_stage switches) data every epoch: set "
                             "`--trainer.reload_dataloaders_every_n_epochs=1`, got "
                             f"{trainer.reload_dataloaders_every_n_epochs}")
        if hp.objective == "two_stage" and (trainer.max_epochs is None or trainer.max_epochs <= hp.stage1_epochs):
            raise ValueError(f"`two_stage` trains stage 2 after `--data.stage1_epochs` ({hp.stage1_epochs}): "
                             f"`--trainer.max_epochs` must be larger, got {trainer.max_epochs}")
        traces, sources, ids = [], [], []
        if hp.num_questions > 0:
            self._collect()
            traces += load_traces(self.traces_path())
            sources.append(str(self.traces_path()))
            ids += phase1_question_ids(read_trace_file(self.traces_path()))
        if hp.extra_traces_file:
            extra = load_traces(hp.extra_traces_file)
            traces += extra
            sources.append(hp.extra_traces_file)
            ids += [str(t["question_id"]) for t in extra if t.get("question_id") is not None]
        if trainer.is_global_zero:
            _write_json(self.question_ids_path(), list(dict.fromkeys(ids)))
        cleaned, cleaning = clean_traces(traces, hp.trim_repeats, hp.strip_openers, hp.dedupe)
        if len(cleaned) < hp.min_traces:
            raise DataError(f"{' + '.join(sources)}: {len(cleaned)} usable traces after cleaning ({len(traces)} "
                            f"before), `--data.min_traces` is {hp.min_traces}; collect more questions, "
                            "raise the sampling budget, or lower `--data.min_traces`")
        if not cleaned:
            rank_zero_warn(f"{' + '.join(sources)}: no usable traces; nothing to train on, the exported model will "
                           "be the base model")
        tokenizer = trainer.lightning_module.tokenizer
        examples = [encode_trace(tokenizer, t, hp.max_length) for t in cleaned]
        self.stages = objective_stages(examples, hp.objective, hp.stage2_size, hp.seed) if examples else [[]]
        budget = BudgetLedger(self.budget_path()).totals() if self.budget_path().exists() else {}
        self.stats = {f"data/{k}": float(v) for k, v in {**trace_stats(cleaned), **cleaning}.items()}
        self.stats["data/truncated"] = float(sum(e.truncated for e in examples))
        self.stats.update({f"budget/phase1_{k}": float(v) for k, v in budget.items()})
        rank_zero_info(f"SRT data: {len(cleaned)} traces from {' + '.join(sources)}; stages: "
                       f"{[len(s) for s in self.stages]} examples; cleaning: {cleaning}; "
                       f"{self.stats['data/truncated']:.0f} cut at max_length {hp.max_length}")

    def _collect(self) -> None:
        """Rank 0 samples the traces with the (not yet trained) model; other ranks wait for the file."""
        trainer, hp = self.trainer, self.hparams
        if trainer.is_global_zero:
            local = Path(hp.dataset).suffix.lower() in LOCAL_FORMATS
            source = hp.dataset if local else f"{hp.dataset}[{hp.dataset_config or 'default'}:{hp.split}]"
            questions = self.reward.load_questions(
                hp.dataset, hp.dataset_config, hp.split, hp.question_field, hp.answer_field, hp.id_field
            )[: hp.num_questions]  # validated before any model is loaded
            if len(questions) < hp.num_questions:
                rank_zero_warn(f"{source}: only {len(questions)} questions, `--data.num_questions` is {hp.num_questions}")
            module = trainer.lightning_module
            module.configure_model()  # idempotent; Lightning calls it again after setup
            model = module.model.to(trainer.strategy.root_device)
            stops = stop_token_ids(module.tokenizer, model.generation_config.eos_token_id)
            collector = TraceCollector(
                self.rollout, self.reward, module.tokenizer, stops, self.phrases, hp.instruction, hp.system_prompt,
                hp.inits_per_question, hp.revisions_per_init, hp.revise_correct, hp.revise_wrong, hp.keep_incorrect,
                hp.questions_per_chunk, hp.seed,
            )
            ledger = BudgetLedger(self.budget_path())
            collector.run(self.traces_path(), questions, hp.target_traces, source,
                          {"model": module.hparams.model_name_or_path, "dtype": module.hparams.dtype,
                           "dataset": source}, ledger, hp.recollect, hp.show_progress,
                          prepare=lambda: self.rollout.setup(model, module.tokenizer, stops))
            rank_zero_info(f"Phase 1 sample budget ({self.budget_path()}): {ledger.summary()}")
        else:
            while not (self.traces_path().exists() and read_trace_file(self.traces_path()).finished):
                time.sleep(10)  # polling, not a collective: a collection takes longer than a barrier timeout
        trainer.strategy.barrier("srt-collection")

    # ------------------------------------------------------------------------------------------- stages
    def stage_of_epoch(self, epoch: int) -> int:
        return 0 if len(self.stages) == 1 or epoch < self.hparams.stage1_epochs else 1

    def _steps_per_epoch(self, n: int, world: int, accumulate: int) -> int:
        micro_batches = math.ceil(math.ceil(n / world) / self.hparams.batch_size)
        return math.ceil(micro_batches / accumulate)

    def stage_steps(self, trainer) -> list[int]:
        """Optimizer steps of each stage over the whole fit (the LR schedule's lengths)."""
        per_epoch = [self._steps_per_epoch(len(s), trainer.world_size, trainer.accumulate_grad_batches)
                     for s in self.stages]
        if len(per_epoch) == 1:
            return [total_optimizer_steps(trainer, per_epoch[0])]
        if trainer.max_steps and trainer.max_steps > 0:
            raise ValueError("`two_stage` is scheduled by epochs: leave `--trainer.max_steps` unset (-1)")
        epochs = [self.hparams.stage1_epochs, trainer.max_epochs - self.hparams.stage1_epochs]
        return [e * s for e, s in zip(epochs, per_epoch)]

    # ---------------------------------------------------------------------------------------------- batches
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            examples = self.stages[self.stage_of_epoch(epoch)]
            plan = self._plan(examples, epoch)
            pad_id = self.trainer.lightning_module.tokenizer.pad_token_id
            self._epoch_plan = (epoch, DataLoader(MicroBatches(plan, examples, pad_id), batch_size=None, num_workers=0))
        return self._epoch_plan[1]

    def _plan(self, examples: list[SRTExample], epoch: int) -> list[tuple[list[int], int, int]]:
        """This rank's micro-batches (example indices) with the token counts of their optimizer step, summed
        over all micro-batches and ranks of that step (the token-mean normalisers)."""
        trainer, hp = self.trainer, self.hparams
        rank, world, accumulate = trainer.global_rank, trainer.world_size, trainer.accumulate_grad_batches
        order = list(range(len(examples)))
        if hp.shuffle:
            random.Random(hp.seed * 1_000_003 + epoch).shuffle(order)
        order += [-1] * (-len(order) % world)  # equal shares: padding slots carry no target
        local = order[rank::world]
        micro = [local[i : i + hp.batch_size] for i in range(0, len(local), hp.batch_size)]
        steps = [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
        counts = torch.tensor([[sum(examples[i].num_revision_tokens for mb in step for i in mb if i >= 0),
                                sum(examples[i].num_generation_tokens for mb in step for i in mb if i >= 0)]
                               for step in steps], dtype=torch.long).reshape(-1, 2)  # (steps, 2)
        totals = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu().tolist()
        return [(mb, rev, gen) for step, (rev, gen) in zip(steps, totals) for mb in step]


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=0) + "\n")
    os.replace(tmp, path)
