"""Phase 1 data (docs/method.md, "Phase 1"): the traces SRT trains on, collected by the model itself, and the plan
that cuts them into micro-batches.

:class:`TraceDataModule`, step by step:

1. ``setup``: read and check the questions (the task's verifier reads them: errors name the file, row and field,
   before any model weights load) and any handcrafted ``extra_traces_file``;
2. ``connect(module)`` (the SFT module calls it from its own ``setup``): global rank 0 loads the model and
   collects the traces of the first N1 questions before any weight changes (:mod:`sdzero_pl.phase1.collect`,
   resumable), the other ranks wait for the file; all ranks then clean them (:mod:`sdzero_pl.phase1.clean`), encode
   them (:func:`~sdzero_pl.phase1.srt.encode_trace`) and split them into the objective's stages;
3. every epoch, :class:`SFTPlan` serves this rank's micro-batches, each carrying the token counts of its whole
   optimizer step (the token-mean normalisers).

The collection's directory (``output_dir``) holds ``traces.jsonl``, ``budget.json`` and
``phase1_question_ids.json``; the exported model gets the hand-off record (:mod:`sdzero_pl.phase1.handoff`).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from sdzero_pl.contracts import PolicyModule
from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.optim import total_optimizer_steps
from sdzero_pl.core.prompts import ControlPhrases
from sdzero_pl.data.batching import (
    PAD, Batching, MicroBatcher, planned_padding, require_reload_every_epoch, split_steps, step_totals
)
from sdzero_pl.data.questions import DataError, Question, QuestionSource
from sdzero_pl.data.records import CollectionPaths, collect_with_policy, read_trace_file
from sdzero_pl.phase1.clean import clean_traces
from sdzero_pl.phase1.collect import TraceCollector, load_traces, phase1_question_ids, trace_stats
from sdzero_pl.phase1.handoff import Handoff
from sdzero_pl.phase1.srt import OBJECTIVES, SRTExample, collate_srt, encode_trace, masked, objective_stages
from sdzero_pl.rollout import HFRollout, RolloutBackend
from sdzero_pl.tasks import MathReward, Verifier


# ------------------------------------------------------------------------------------------------- the plan
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


class SFTPlan:
    """The SFT examples of a fit by stage (one, or two for "two_stage"), cut into this rank's micro-batches each
    epoch: the one step planner of every SFT-style data module (Phase 1 and RFT)."""

    def __init__(self, stages: list[list[SRTExample]], batch_size: int, shuffle: bool, seed: int,
                 stage1_epochs: int = 0, batching: Batching = Batching()) -> None:
        self.stages, self.batch_size, self.shuffle, self.seed = stages, batch_size, shuffle, seed
        self.stage1_epochs = stage1_epochs
        self.batcher = MicroBatcher(batching)
        self.epoch_stats: dict[str, float] = {}  # the latest epoch's batching metrics
        self._epoch: tuple[int, DataLoader] | None = None

    def stage_of_epoch(self, epoch: int) -> int:
        return 0 if len(self.stages) == 1 or epoch < self.stage1_epochs else 1

    def stage_steps(self, trainer) -> list[int]:
        """Optimizer steps of each stage over the whole fit (the LR schedule's lengths)."""
        world, accumulate = trainer.world_size, self.batcher.accumulation(trainer)
        per_epoch = [math.ceil(math.ceil(math.ceil(len(s) / world) / self.batch_size) / accumulate)
                     for s in self.stages]
        if len(per_epoch) == 1:
            return [total_optimizer_steps(trainer, per_epoch[0])]
        if trainer.max_steps and trainer.max_steps > 0:
            raise ValueError("`two_stage` is scheduled by epochs: leave `--trainer.max_steps` unset (-1)")
        epochs = [self.stage1_epochs, trainer.max_epochs - self.stage1_epochs]
        return [e * s for e, s in zip(epochs, per_epoch)]

    def dataloader(self, trainer, pad_id: int) -> DataLoader:
        """This rank's micro-batches of the trainer's current epoch (built once per epoch)."""
        epoch = trainer.current_epoch
        if self._epoch is None or self._epoch[0] != epoch:
            examples = self.stages[self.stage_of_epoch(epoch)]
            batches = MicroBatches(self.micro_batches(trainer, examples, epoch), examples, pad_id)
            self._epoch = (epoch, DataLoader(batches, batch_size=None, num_workers=0))
        return self._epoch[1]

    def micro_batches(self, trainer, examples: list[SRTExample], epoch: int) -> list[tuple[list[int], int, int]]:
        """This rank's micro-batches (example indices, -1 = a masked padding row) with the (revision, generation)
        token counts of their optimizer step, summed over all its micro-batches and all ranks."""
        rank, world = trainer.global_rank, trainer.world_size
        order = list(range(len(examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        order += [PAD] * (-len(order) % world)  # equal shares: padding slots carry no target
        steps = split_steps(order[rank::world], self.batch_size, self.batcher.accumulation(trainer))
        lengths = [len(e.ids) for e in examples]
        plan = self.batcher.plan(trainer, steps, lengths)
        counts = [(sum(examples[i].num_revision_tokens for mb in step for i in mb if i != PAD),
                   sum(examples[i].num_generation_tokens for mb in step for i in mb if i != PAD)) for step in plan.steps]
        totals = step_totals(trainer.strategy, counts)
        self.epoch_stats = {
            "train/padding_frac": planned_padding(plan.steps, lengths, lengths[0] if lengths else 0),
            "train/micro_batches_per_step": float(plan.micro_batches_per_step or self.batcher.accumulate),
            "train/over_budget": float(plan.over_budget)}
        return [(mb, rev, gen) for step, (rev, gen) in zip(plan.steps, totals) for mb in step]

    def release(self, trainer) -> None:
        """The end of the fit: the trainer gets its own accumulation back."""
        self.batcher.release(trainer)


# ------------------------------------------------------------------------------------------ the data module
class TraceDataModule(L.LightningDataModule):
    """Collects (or reuses) Phase-1 traces with the model being trained, then serves SRT micro-batches."""

    def __init__(
        self,
        questions: QuestionSource,
        control: ControlPhrases = ControlPhrases(),
        inits_per_question: int = 1,
        revisions_per_init: int = 3,
        revise_correct: bool = True,
        revise_wrong: bool = True,
        target_traces: int | None = None,
        keep_incorrect: bool = False,
        questions_per_chunk: int = 64,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
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
        batching: Batching = Batching(),
        max_length: int = 32768,
        shuffle_examples: bool = True,
        show_progress: bool = True,
        seed: int = 0,
    ) -> None:
        """
        Args:
            questions: the questions (N1 = ``questions.num_questions``, paper: the first 10K; 0 = no collection,
                train on ``extra_traces_file`` only). Phase 2 must not use them: the exported model records them.
            control: the control phrases P_r (Phase 2 must use the same; the export records them).
            inits_per_question: initial answers sampled per question (paper: 1; reference code: 3).
            revisions_per_init: revisions sampled per initial answer (paper: 3).
            revise_correct: sample revisions of correct inits ("rephrase" branch, r=1; reference code: off).
            revise_wrong: sample revisions of wrong inits ("start over" branch, r=0).
            target_traces: stop collecting once this many traces are kept (reference code: 6000); null = all N1.
            keep_incorrect: also write revisions that failed verification (flagged; never trained on).
            questions_per_chunk: questions per generation round; the unit of resumption (a chunk is written whole).
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward. It also reads the questions.
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
            batch_size: sequences per micro-batch on each rank ("count" batching); an optimizer step takes
                ``batch_size x accumulate_grad_batches`` sequences per rank in either batching mode.
            batching: how a step's sequences are cut into micro-batches: fixed count, or by tokens (length-aware).
            max_length: longest training sequence in tokens; longer ones are cut on the right (and counted).
            shuffle_examples: reshuffle the training examples every epoch (seeded by ``seed`` and the epoch).
            show_progress: progress bar over the collected questions (kept traces, acceptance rate).
            seed: seed of the collection's sampling, of the question order (``questions.shuffle``) and of the
                example order.
        """
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"`--data.objective` must be one of {OBJECTIVES}, got {objective!r}")
        for flag, value, low in (("min_traces", min_traces, 0), ("stage2_size", stage2_size, 1),
                                 ("stage1_epochs", stage1_epochs, 1), ("batch_size", batch_size, 1),
                                 ("max_length", max_length, 2)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        if questions.num_questions == 0 and extra_traces_file is None:
            raise ValueError("`--data.questions.num_questions` is 0 and no `--data.extra_traces_file` is given: "
                             "no traces")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.batching = Batching.of(batching)
        self.hparams.update(questions=asdict(questions), control=asdict(control),  # plain types in checkpoints
                            batching=asdict(self.batching))
        self.source, self.control = questions, control
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.collector = TraceCollector(  # checks its settings now; bound to the model's tokenizer at connect()
            self.rollout, self.reward, phrases=control.phrases, instruction=questions.instruction,
            system_prompt=questions.system_prompt, template_kwargs=questions.chat_template_kwargs,
            inits_per_question=inits_per_question,
            revisions_per_init=revisions_per_init, revise_correct=revise_correct, revise_wrong=revise_wrong,
            keep_incorrect=keep_incorrect, target_traces=target_traces, questions_per_chunk=questions_per_chunk,
            seed=seed)
        self.questions: list[Question] | None = None
        self.extra_traces: list[dict] = []
        self.plan: SFTPlan | None = None
        self.pad_id: int | None = None
        self.stats: dict[str, float] = {}
        self._question_ids: list[str] = []

    # ---------------------------------------------------------------------------------------------- paths
    def paths(self) -> CollectionPaths:
        return CollectionPaths.of(self.trainer, self.hparams.output_dir, "srt_data", "traces.jsonl")

    # ------------------------------------------------------------------------ 1. questions, before any model
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.questions is not None:
            return
        trainer, hp = self.trainer, self.hparams
        require_reload_every_epoch(trainer, "SRT reshuffles (and in two_stage switches) data")
        if hp.objective == "two_stage" and (trainer.max_epochs is None or trainer.max_epochs <= hp.stage1_epochs):
            raise ValueError(f"`two_stage` trains stage 2 after `--data.stage1_epochs` ({hp.stage1_epochs}): "
                             f"`--trainer.max_epochs` must be larger, got {trainer.max_epochs}")
        self.questions = []
        if self.source.num_questions != 0:
            self.questions = self.source.select(self.reward.load_questions(self.source), hp.seed)
            if self.source.num_questions is not None and len(self.questions) < self.source.num_questions:
                rank_zero_warn(f"{self.source.name}: only {len(self.questions)} questions, "
                               f"`--data.questions.num_questions` is {self.source.num_questions}")
        if hp.extra_traces_file:
            self.extra_traces = load_traces(hp.extra_traces_file)

    # --------------------------------------------------------------- 2. traces, with the module's own model
    def connect(self, module: PolicyModule) -> None:
        if self.plan is not None:
            return
        hp = self.hparams
        self.pad_id = module.tokenizer.pad_token_id
        traces, sources, ids = [], [], []
        if self.questions:
            collect_with_policy(self.trainer, module, self.collector, rollout=self.rollout, paths=self.paths(),
                                questions=self.questions, source=self.source, recollect=hp.recollect,
                                show_progress=hp.show_progress)
            traces += load_traces(self.paths().records)
            sources.append(str(self.paths().records))
            ids += phase1_question_ids(read_trace_file(self.paths().records))
        if hp.extra_traces_file:
            traces += self.extra_traces
            sources.append(hp.extra_traces_file)
            ids += [str(t["question_id"]) for t in self.extra_traces if t.get("question_id") is not None]
        self._question_ids = list(dict.fromkeys(ids))
        if self.trainer.is_global_zero:
            _write_json(self.paths().directory / "phase1_question_ids.json", self._question_ids)
        cleaned, cleaning = clean_traces(traces, hp.trim_repeats, hp.strip_openers, hp.dedupe)
        if len(cleaned) < hp.min_traces:
            raise DataError(f"{' + '.join(sources)}: {len(cleaned)} usable traces after cleaning ({len(traces)} "
                            f"before), `--data.min_traces` is {hp.min_traces}; collect more questions, "
                            "raise the sampling budget, or lower `--data.min_traces`")
        if not cleaned:
            rank_zero_warn(f"{' + '.join(sources)}: no usable traces; nothing to train on, the exported model will "
                           "be the base model")
        examples = [encode_trace(module.tokenizer, t, hp.max_length) for t in cleaned]
        stages = objective_stages(examples, hp.objective, hp.stage2_size, hp.seed) if examples else [[]]
        self.plan = SFTPlan(stages, hp.batch_size, hp.shuffle_examples, hp.seed, hp.stage1_epochs, self.batching)
        self.stats = {f"data/{k}": float(v) for k, v in {**trace_stats(cleaned), **cleaning}.items()}
        self.stats["data/truncated"] = float(sum(e.truncated for e in examples))
        self.stats.update({f"budget/phase1_{k}": float(v) for k, v in self._budget().items()})
        rank_zero_info(f"SRT data: {len(cleaned)} traces from {' + '.join(sources)}; stages: "
                       f"{[len(s) for s in stages]} examples; cleaning: {cleaning}; "
                       f"{self.stats['data/truncated']:.0f} cut at max_length {hp.max_length}")

    def _budget(self) -> dict[str, int]:
        return BudgetLedger(self.paths().budget).totals() if self.paths().budget.exists() else {}

    # ------------------------------------------------------------------------ 3. the SFT module's contract
    def stage_of_epoch(self, epoch: int) -> int:
        return self.plan.stage_of_epoch(epoch)

    def stage_steps(self, trainer) -> list[int]:
        return self.plan.stage_steps(trainer)

    def train_dataloader(self) -> DataLoader:
        loader = self.plan.dataloader(self.trainer, self.pad_id)
        self.stats.update(self.plan.epoch_stats)  # logged by the module at the epoch's start
        return loader

    def teardown(self, stage: str) -> None:
        if self.plan is not None and self.trainer is not None and stage == "fit":
            self.plan.release(self.trainer)

    def handoff(self) -> Handoff:
        """What Phase 2 must match: these control phrases, instruction and system prompt, and these questions."""
        return Handoff.of(self.source, self.control, self._question_ids, self._budget())


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=0) + "\n")
    os.replace(tmp, path)
