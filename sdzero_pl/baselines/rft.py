"""RFT baseline: rejection fine-tuning, SFT on the model's own verified-correct samples (SPEC "Results": the RFT row;
"Data and verification": "RFT (SFT on own correct samples)").

:class:`RFTDataModule` samples ``samples_per_question`` completions for each of ``num_questions`` questions from the
base model (paper's budget: 15K questions x 4 = 60K generations), verifies them, keeps the correct ones and
serves them to :class:`~sdzero_pl.phase1.SelfReviseSFTModule` as ``chat(x) + y + EOS`` sequences whose only
targets are y and its EOS: the module's generation loss is then exactly the completion-only NLL of y, token mean
over the global batch; the revision loss has no tokens and is 0. So RFT shares Phase 1's SFT module, optimizer,
schedule, micro-batching and export unchanged; only what is sampled and kept differs.

The collection uses Phase 1's file conventions (:mod:`sdzero_pl.phase1.collect`): a JSONL with a ``header`` of the
settings, then per chunk of questions its ``sample`` lines (kept completions), ``question`` lines (all rewards)
and a closing ``chunk`` line (seed, generations, tokens), written in one fsync'ed append; a killed run resumes at
the last complete chunk with the same seeds, a finished one is reused. Generations and generated tokens go to
``budget.json`` (phase ``"rft/sample"``), recomputed from the file so a resumed run never counts twice.
Cleaning on load, as Phase 1 does: repeating tails trimmed, duplicate (question, completion) pairs dropped, and
optionally at most ``max_per_question`` completions per question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.phase1.collect import (
    FORMAT_VERSION,
    TraceFile,
    append_records,
    chunk_seed,
    open_collection,
    read_trace_file,
    trim_repeating_tail,
)
from sdzero_pl.core.optim import total_optimizer_steps
from sdzero_pl.core.prompts import render_prompt, stop_token_ids
from sdzero_pl.data.questions import LOCAL_FORMATS, DataError, Question, select_questions
from sdzero_pl.tasks import MathReward, Verifier
from sdzero_pl.rollout import RolloutBackend, HFRollout
from sdzero_pl.core.sequences import strip_stop
from sdzero_pl.phase1.srt import SRTExample, MicroBatches, build_srt_example

log = logging.getLogger(__name__)

TOTALS = ("questions", "generations", "tokens", "correct", "kept", "unverifiable", "verify_timeouts")


# ------------------------------------------------------------------------------------------------ the collector
class SampleCollector:
    """Samples, verifies and writes the correct completions; see the module docstring for the file."""

    def __init__(self, rollout: RolloutBackend, reward: Verifier, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], instruction: str = "", system_prompt: str | None = None,
                 samples_per_question: int = 4, questions_per_chunk: int = 64, seed: int = 0) -> None:
        for flag, value in (("samples_per_question", samples_per_question), ("questions_per_chunk", questions_per_chunk)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        self.rollout, self.reward, self.tokenizer, self.stop_ids = rollout, reward, tokenizer, list(stop_ids)
        self.instruction, self.system_prompt = instruction, system_prompt
        self.samples, self.chunk_size, self.seed = samples_per_question, questions_per_chunk, seed

    def settings(self, questions: Sequence[Question], extra: dict | None = None) -> dict:
        """Everything the file's content depends on; stored in the header and compared on resume / reuse."""
        settings = {
            "questions": len(questions),
            "question_ids_sha256": hashlib.sha256("\n".join(q.id for q in questions).encode()).hexdigest(),
            "samples_per_question": self.samples, "questions_per_chunk": self.chunk_size, "seed": self.seed,
            "instruction": self.instruction, "system_prompt": self.system_prompt,
            "rollout": {"class": type(self.rollout).__name__, "temperature": self.rollout.temperature,
                        "top_p": self.rollout.top_p, "max_new_tokens": self.rollout.max_new_tokens},
            "reward": type(self.reward).__name__, **(extra or {}),
        }
        return json.loads(json.dumps(settings))  # as it reads back from the file (tuples -> lists)

    def run(self, path: str | os.PathLike, questions: Sequence[Question], source: str = "questions",
            extra_settings: dict | None = None, ledger: BudgetLedger | None = None, recollect: bool = False,
            show_progress: bool = True, prepare: Callable[[], None] | None = None) -> TraceFile:
        """Collect into ``path``, resuming a partial file and reusing a finished one (unless ``recollect``).
        ``prepare`` runs once before the first generation (binding the rollout backend), never on reuse."""
        path = Path(path)
        header = {"kind": "header", "version": FORMAT_VERSION, "method": "rft",
                  "settings": self.settings(questions, extra_settings)}
        state = open_collection(path, header, recollect)
        totals = summarize(state)
        _record_budget(ledger, totals)
        bar = tqdm(total=len(questions), initial=totals["questions"], unit="question", desc="RFT samples",
                   disable=not show_progress or state.finished is not None)
        try:
            while state.finished is None:
                start = state.chunks * self.chunk_size
                if start >= len(questions):
                    state.finished = {"kind": "finished", "questions": totals["questions"], "kept": totals["kept"]}
                    append_records(path, [state.finished])
                    break
                if prepare is not None:
                    prepare()
                    prepare = None
                records = self._chunk(state.chunks, questions[start : start + self.chunk_size], start, source)
                append_records(path, records)
                for key in TOTALS:
                    totals[key] += records[-1][key]
                state.chunks += 1
                _record_budget(ledger, totals)
                bar.update(records[-1]["questions"])
                bar.set_postfix(kept=totals["kept"], acc=f"{totals['correct'] / max(totals['generations'], 1):.1%}")
        finally:
            bar.close()
        return read_trace_file(path)

    def _chunk(self, chunk: int, questions: Sequence[Question], first: int, source: str) -> list[dict]:
        """Sample k completions per question of one chunk, verify them; its sample, question and chunk lines."""
        tok, k = self.tokenizer, self.samples
        prompts = [render_prompt(tok, q.question + self.instruction, self.system_prompt) for q in questions]
        prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        seed = chunk_seed(self.seed, chunk, "rft")
        rollouts = self.rollout.generate([p for p in prompt_ids for _ in range(k)], seed=seed, desc=f"RFT chunk {chunk}")
        completion_ids = [strip_stop(r.completion_ids, self.stop_ids) for r in rollouts]
        verdict = self.reward([tok.decode(ids, skip_special_tokens=True) for ids in completion_ids],
                              [q.answer for q in questions for _ in range(k)])
        records, unverifiable = [], 0
        for i, question in enumerate(questions):
            rewards = verdict.rewards[i * k : (i + 1) * k]
            error = None
            if any(r is None for r in rewards):  # the reference cannot be used: counted, logged, collection goes on
                unverifiable += 1
                error = next((e for e in verdict.errors[i * k : (i + 1) * k] if e), "unusable reference answer")
                log.warning("%s: row %d (id %s): %s; question skipped", source, first + i + 1, question.id, error)
            for j in range(i * k, (i + 1) * k):
                if verdict.rewards[j] is not None and verdict.rewards[j] >= 0.5:
                    records.append({"kind": "sample", "question_id": question.id, "row": first + i + 1,
                                    "prompt": prompts[i], "completion": tok.decode(completion_ids[j]),
                                    "reward": verdict.rewards[j], "sample_index": j - i * k,
                                    "prompt_tokens": len(prompt_ids[i]),
                                    "completion_tokens": len(rollouts[j].completion_ids),
                                    "finish": rollouts[j].finish_reason})
            records.append({"kind": "question", "question_id": question.id, "row": first + i + 1, "chunk": chunk,
                            "rewards": rewards, "kept": sum(r is not None and r >= 0.5 for r in rewards),
                            "error": error})
        records.append({"kind": "chunk", "chunk": chunk, "questions": len(questions), "seed": seed,
                        "generations": len(rollouts), "tokens": sum(len(r.completion_ids) for r in rollouts),
                        "correct": sum(r is not None and r >= 0.5 for r in verdict.rewards),
                        "kept": sum(r["kind"] == "sample" for r in records), "unverifiable": unverifiable,
                        "verify_timeouts": verdict.timeouts})
        return records


def summarize(state: TraceFile) -> dict[str, int]:
    """Totals over the complete chunks of a sample file (budget and acceptance)."""
    return {k: sum(int(c[k]) for c in state.of_kind("chunk")) for k in TOTALS}


def _record_budget(ledger: BudgetLedger | None, totals: dict[str, int]) -> None:
    if ledger is not None:
        ledger.set("rft/sample", totals["generations"], totals["tokens"])


def load_samples(path: str | os.PathLike) -> list[dict]:
    """The kept (correct) samples of a finished sample file, each row validated."""
    state = read_trace_file(path)
    if state.header is not None and state.finished is None:
        raise DataError(f"{path}: the collection is not finished ({state.chunks} chunks); run fit again to resume it")
    samples = []
    for record, number in zip(state.records, state.lines):
        if record.get("kind") != "sample":
            continue
        for name in ("prompt", "completion"):
            if not isinstance(record.get(name), str):
                raise DataError(f"{path}: line {number}: field {name!r} must be a string, got {record.get(name)!r}")
        if record.get("reward", 0.0) >= 0.5:
            samples.append(record)
    return samples


def clean_samples(samples: Sequence[dict], trim_repeats: bool = True, dedupe: bool = True,
                  max_per_question: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """Cleaned copies and the count of each change: repeating tails trimmed, duplicates dropped, per-question cap."""
    out, seen, per_question = [], set(), {}
    stats = {"trimmed": 0, "duplicates": 0, "over_cap": 0}
    for sample in samples:
        sample = dict(sample)
        if trim_repeats:
            trimmed = trim_repeating_tail(sample["completion"])
            stats["trimmed"] += trimmed != sample["completion"]
            sample["completion"] = trimmed
        key = (sample.get("question_id", sample["prompt"]), sample["completion"])
        if dedupe and key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        if max_per_question is not None and per_question.get(key[0], 0) >= max_per_question:
            stats["over_cap"] += 1
            continue
        per_question[key[0]] = per_question.get(key[0], 0) + 1
        out.append(sample)
    return out, stats


def encode_sample(tokenizer: PreTrainedTokenizerBase, sample: dict, max_length: int) -> SRTExample:
    """``chat(x) + y + EOS``; y + EOS are the generation targets (the SRT example with no control and no
    revision), the revision mask is empty."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return build_srt_example(encode(sample["prompt"]), encode(sample["completion"]) + [tokenizer.eos_token_id], [],
                             [], max_length)


# --------------------------------------------------------------------------------------------- the data module
class RFTDataModule(L.LightningDataModule):
    """Collects (or reuses) correct samples of the model being trained, then serves SFT micro-batches to
    :class:`~sdzero_pl.phase1.SelfReviseSFTModule` (the data-module side of its interface: ``stage_of_epoch``,
    ``stage_steps``, ``stats``, ``budget_path``)."""

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
        num_questions: int = 15_000,
        samples_per_question: int = 4,
        questions_per_chunk: int = 64,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        output_dir: str | None = None,
        recollect: bool = False,
        min_samples: int = 1,
        max_per_question: int | None = None,
        trim_repeats: bool = True,
        dedupe: bool = True,
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
            skip_first: leave out the first N questions.
            num_questions: questions sampled (paper's baseline budget: 15K).
            samples_per_question: completions sampled per question (paper's baseline budget: 4, so 60K in all).
            questions_per_chunk: questions per generation round; the unit of resumption (a chunk is written whole).
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward.
            output_dir: samples.jsonl and budget.json go here; default ``<default_root_dir>/rft_data``. A finished
                collection there is reused, a partial one resumed.
            recollect: discard an existing collection in ``output_dir`` and start over.
            min_samples: fewer kept samples than this after cleaning is an error; 0 allows a run with none (the
                exported model is then the base model: smoke tests with a random model).
            max_per_question: keep at most this many correct completions per question; null = all.
            trim_repeats: cut degenerate repeating tails of the completions (as Phase 1 does).
            dedupe: drop repeated (question, completion) pairs.
            batch_size: sequences per micro-batch on each rank.
            max_length: longest training sequence in tokens; longer ones are cut on the right (and counted).
            shuffle: reshuffle the examples every epoch (seeded by ``seed`` and the epoch).
            show_progress: progress bar over the collected questions.
            seed: seed of the collection's sampling and of the example order.
        """
        super().__init__()
        for flag, value, low in (("num_questions", num_questions, 1), ("samples_per_question", samples_per_question, 1),
                                 ("questions_per_chunk", questions_per_chunk, 1), ("min_samples", min_samples, 0),
                                 ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                                 ("skip_first", skip_first, 0)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        if max_per_question is not None and max_per_question < 1:
            raise ValueError(f"`--data.max_per_question` must be >= 1 or null, got {max_per_question}")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.examples: list[SRTExample] | None = None
        self.stats: dict[str, float] = {}
        self._epoch_plan: tuple[int, DataLoader] | None = None

    def output_dir(self) -> Path:
        return Path(self.hparams.output_dir or os.path.join(self.trainer.default_root_dir, "rft_data"))

    def samples_path(self) -> Path:
        return self.output_dir() / "samples.jsonl"

    def budget_path(self) -> Path:
        return self.output_dir() / "budget.json"

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.examples is not None:
            return
        hp = self.hparams
        if self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("RFT reshuffles its examples every epoch: set `--trainer.reload_dataloaders_every_n_epochs"
                             f"=1`, got {self.trainer.reload_dataloaders_every_n_epochs}")
        self._collect()
        state = read_trace_file(self.samples_path())
        samples, cleaning = clean_samples(load_samples(self.samples_path()), hp.trim_repeats, hp.dedupe,
                                          hp.max_per_question)
        if len(samples) < hp.min_samples:
            raise DataError(f"{self.samples_path()}: {len(samples)} correct samples after cleaning, "
                            f"`--data.min_samples` is {hp.min_samples}; sample more questions or lower it")
        if not samples:
            rank_zero_warn(f"{self.samples_path()}: no correct sample; nothing to train on, the exported model will "
                           "be the base model")
        tokenizer = self.trainer.lightning_module.tokenizer
        self.examples = [encode_sample(tokenizer, s, hp.max_length) for s in samples]
        totals = summarize(state)
        self.stats = {f"data/{k}": float(v) for k, v in cleaning.items()}
        self.stats.update({
            "data/samples": float(len(samples)), "data/truncated": float(sum(e.truncated for e in self.examples)),
            "data/questions_with_correct": float(len({s.get("question_id", s["prompt"]) for s in samples})),
            "rollout/generations": float(totals["generations"]), "rollout/generated_tokens": float(totals["tokens"]),
            "rollout/reward_mean": totals["correct"] / max(totals["generations"], 1),
        })
        rank_zero_info(f"RFT data: {len(samples)} correct samples of {totals['generations']} generations "
                       f"({totals['questions']} questions) in {self.samples_path()}; cleaning: {cleaning}")

    def _collect(self) -> None:
        """Rank 0 samples with the (not yet trained) model; other ranks wait for the finished file."""
        trainer, hp = self.trainer, self.hparams
        if trainer.is_global_zero:
            local = Path(hp.dataset).suffix.lower() in LOCAL_FORMATS
            source = hp.dataset if local else f"{hp.dataset}[{hp.dataset_config or 'default'}:{hp.split}]"
            questions = self.reward.load_questions(
                hp.dataset, hp.dataset_config, hp.split, hp.question_field, hp.answer_field, hp.id_field
            )
            questions = select_questions(questions, hp.skip_first)[: hp.num_questions]
            if len(questions) < hp.num_questions:
                rank_zero_warn(f"{source}: only {len(questions)} questions after skip_first={hp.skip_first}, "
                               f"`--data.num_questions` is {hp.num_questions}")
            module = trainer.lightning_module
            module.configure_model()  # idempotent; Lightning calls it again after setup
            model = module.model.to(trainer.strategy.root_device)
            stops = stop_token_ids(module.tokenizer, model.generation_config.eos_token_id)
            collector = SampleCollector(self.rollout, self.reward, module.tokenizer, stops, hp.instruction,
                                        hp.system_prompt, hp.samples_per_question, hp.questions_per_chunk, hp.seed)
            ledger = BudgetLedger(self.budget_path())
            collector.run(self.samples_path(), questions, source,
                          {"model": module.hparams.model_name_or_path, "dtype": module.hparams.dtype, "dataset": source},
                          ledger, hp.recollect, hp.show_progress,
                          prepare=lambda: self.rollout.setup(model, module.tokenizer, stops))
            rank_zero_info(f"RFT sample budget ({self.budget_path()}): {ledger.summary()}")
        else:
            while not (self.samples_path().exists() and read_trace_file(self.samples_path()).finished):
                time.sleep(10)  # polling, not a collective: a collection takes longer than a barrier timeout
        trainer.strategy.barrier("rft-collection")

    # ------------------------------------------------------------------ the SFT module's data-module interface
    def stage_of_epoch(self, epoch: int) -> int:
        return 0  # one stage

    def stage_steps(self, trainer) -> list[int]:
        micro_batches = math.ceil(math.ceil(len(self.examples) / trainer.world_size) / self.hparams.batch_size)
        return [total_optimizer_steps(trainer, math.ceil(micro_batches / trainer.accumulate_grad_batches))]

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            pad_id = self.trainer.lightning_module.tokenizer.pad_token_id
            batches = MicroBatches(self._plan(epoch), self.examples, pad_id)
            self._epoch_plan = (epoch, DataLoader(batches, batch_size=None, num_workers=0))
        return self._epoch_plan[1]

    def _plan(self, epoch: int) -> list[tuple[list[int], int, int]]:
        """This rank's micro-batches (example indices, -1 = masked padding row) with (0 revision tokens, the
        completion tokens of their optimizer step over all micro-batches and ranks): the token-mean normaliser."""
        trainer, hp = self.trainer, self.hparams
        rank, world, accumulate = trainer.global_rank, trainer.world_size, trainer.accumulate_grad_batches
        order = list(range(len(self.examples)))
        if hp.shuffle:
            random.Random(hp.seed * 1_000_003 + epoch).shuffle(order)
        order += [-1] * (-len(order) % world)  # equal shares on all ranks
        local = order[rank::world]
        micro = [local[i : i + hp.batch_size] for i in range(0, len(local), hp.batch_size)]
        steps = [micro[i : i + accumulate] for i in range(0, len(micro), accumulate)]
        counts = torch.tensor([sum(self.examples[i].num_generation_tokens for mb in step for i in mb if i >= 0)
                               for step in steps], dtype=torch.long)
        totals = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu().tolist()
        return [(mb, 0, total) for step, total in zip(steps, totals) for mb in step]
