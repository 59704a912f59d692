"""RFT baseline: rejection fine-tuning, SFT on the model's own verified-correct samples (docs/method.md, "Results": the RFT row;
"Data and verification": "RFT (SFT on own correct samples)").

:class:`RFTDataModule` samples ``samples_per_question`` completions for each of ``num_questions`` questions from the
base model (paper's budget: 15K questions x 4 = 60K generations), verifies them, keeps the correct ones and
serves them to :class:`~sdzero_pl.phase1.SelfReviseSFTModule` as ``chat(x) + y + EOS`` sequences whose only
targets are y and its EOS: the module's generation loss is then exactly the completion-only NLL of y, token mean
over the global batch; the revision loss has no tokens and is 0. So RFT shares Phase 1's SFT module, optimizer,
schedule, micro-batching and export unchanged; only what is sampled and kept differs.

The collection is a resumable JSONL like Phase 1's (:mod:`sdzero_pl.data.records`, the same runner): per chunk of
questions its ``sample`` lines (kept completions), ``question`` lines (all rewards) and a closing ``chunk`` line
(seed, generations, tokens); a killed run resumes at the last complete chunk with the same seeds, a finished one is
reused. Generations and generated tokens go to
``budget.json`` (phase ``"rft/sample"``), recomputed from the file so a resumed run never counts twice.
Cleaning on load, as Phase 1 does: repeating tails trimmed, duplicate (question, completion) pairs dropped, and
optionally at most ``max_per_question`` completions per question.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from sdzero_pl.contracts import PolicyModule
from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.prompts import render_prompt
from sdzero_pl.core.sequences import strip_stop
from sdzero_pl.data.batching import Batching, require_reload_every_epoch
from sdzero_pl.data.questions import DataError, Question, QuestionSource
from sdzero_pl.data.records import (
    CollectionPaths, TraceFile, chunk_seed, collect_with_policy, collection_settings, read_trace_file, run_collection,
    summarize
)
from sdzero_pl.phase1.clean import trim_repeating_tail
from sdzero_pl.phase1.data import SFTPlan
from sdzero_pl.phase1.srt import SRTExample, build_srt_example
from sdzero_pl.rollout import HFRollout, RolloutBackend
from sdzero_pl.tasks import MathReward, Verifier

log = logging.getLogger(__name__)

TOTALS = ("questions", "generations", "tokens", "correct", "kept", "unverifiable", "verify_timeouts")


# ------------------------------------------------------------------------------------------------ the collector
class SampleCollector:
    """Samples, verifies and writes the correct completions (a :class:`~sdzero_pl.data.records.ChunkCollector`);
    see the module docstring for the file."""

    method, totals, desc = "rft", TOTALS, "RFT samples"

    def __init__(self, rollout: RolloutBackend, reward: Verifier, *, instruction: str = "",
                 system_prompt: str | None = None, samples_per_question: int = 4, questions_per_chunk: int = 64,
                 seed: int = 0, template_kwargs: dict | None = None) -> None:
        for flag, value in (("samples_per_question", samples_per_question), ("questions_per_chunk", questions_per_chunk)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        self.rollout, self.reward = rollout, reward
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.stop_ids: list[int] = []
        self.instruction, self.system_prompt, self.template_kwargs = instruction, system_prompt, template_kwargs
        self.samples, self.chunk_size, self.seed = samples_per_question, questions_per_chunk, seed

    def bind(self, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> SampleCollector:
        """The model's tokenizer and end-of-turn ids; needed before the first chunk."""
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)
        return self

    def run(self, path: str | os.PathLike, questions: Sequence[Question], **kwargs) -> TraceFile:
        """:func:`~sdzero_pl.data.records.run_collection` with this collector (same keyword arguments)."""
        return run_collection(path, self, questions, **kwargs)

    def settings(self, questions: Sequence[Question], extra: dict | None = None) -> dict:
        return collection_settings(questions, self.rollout, self.reward, self.chunk_size, self.seed,
                                   samples_per_question=self.samples, instruction=self.instruction,
                                   system_prompt=self.system_prompt,
                                   **({"chat_template_kwargs": self.template_kwargs} if self.template_kwargs else {}),
                                   **(extra or {}))

    def stop_reason(self, totals: dict[str, int]) -> str | None:
        return None  # every question is sampled

    def finished_record(self, totals: dict[str, int], reason: str) -> dict:
        return {"kind": "finished", "questions": totals["questions"], "kept": totals["kept"]}

    def record_budget(self, ledger: BudgetLedger, totals: dict[str, int]) -> None:
        ledger.set("rft/sample", totals["generations"], totals["tokens"])

    def progress(self, totals: dict[str, int]) -> dict[str, str]:
        return {"kept": str(totals["kept"]), "acc": f"{totals['correct'] / max(totals['generations'], 1):.1%}"}

    def collect_chunk(self, chunk: int, questions: Sequence[Question], first: int, source: str) -> list[dict]:
        """Sample k completions per question of one chunk, verify them; its sample, question and chunk lines."""
        tok, k = self.tokenizer, self.samples
        prompts = [render_prompt(tok, q.question + self.instruction, self.system_prompt, self.template_kwargs)
                   for q in questions]
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
    :class:`~sdzero_pl.phase1.SelfReviseSFTModule` (the :class:`~sdzero_pl.contracts.SFTData` contract)."""

    def __init__(
        self,
        questions: QuestionSource,
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
        batching: Batching = Batching(),
        max_length: int = 32768,
        shuffle_examples: bool = True,
        show_progress: bool = True,
        seed: int = 0,
    ) -> None:
        """
        Args:
            questions: the questions sampled (paper's baseline budget: ``num_questions`` 15K).
            samples_per_question: completions sampled per question (paper's baseline budget: 4, so 60K in all).
            questions_per_chunk: questions per generation round; the unit of resumption (a chunk is written whole).
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward. It also reads the questions.
            output_dir: samples.jsonl and budget.json go here; default ``<default_root_dir>/rft_data``. A finished
                collection there is reused, a partial one resumed.
            recollect: discard an existing collection in ``output_dir`` and start over.
            min_samples: fewer kept samples than this after cleaning is an error; 0 allows a run with none (the
                exported model is then the base model: smoke tests with a random model).
            max_per_question: keep at most this many correct completions per question; null = all.
            trim_repeats: cut degenerate repeating tails of the completions (as Phase 1 does).
            dedupe: drop repeated (question, completion) pairs.
            batch_size: sequences per micro-batch on each rank ("count" batching); an optimizer step takes
                ``batch_size x accumulate_grad_batches`` sequences per rank in either batching mode.
            batching: how a step's sequences are cut into micro-batches: fixed count, or by tokens (length-aware).
            max_length: longest training sequence in tokens; longer ones are cut on the right (and counted).
            shuffle_examples: reshuffle the training examples every epoch (seeded by ``seed`` and the epoch).
            show_progress: progress bar over the collected questions.
            seed: seed of the collection's sampling, of the question order and of the example order.
        """
        super().__init__()
        for flag, value, low in (("min_samples", min_samples, 0), ("batch_size", batch_size, 1),
                                 ("max_length", max_length, 2)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        if questions.num_questions == 0:
            raise ValueError("`--data.questions.num_questions` must be >= 1 or null (all) for RFT, got 0")
        if max_per_question is not None and max_per_question < 1:
            raise ValueError(f"`--data.max_per_question` must be >= 1 or null, got {max_per_question}")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.batching = Batching.of(batching)
        self.hparams.update(questions=asdict(questions), batching=asdict(self.batching))  # plain types in checkpoints
        self.source = questions
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.collector = SampleCollector(self.rollout, self.reward, instruction=questions.instruction,
                                         system_prompt=questions.system_prompt,
                                         template_kwargs=questions.chat_template_kwargs,
                                         samples_per_question=samples_per_question,
                                         questions_per_chunk=questions_per_chunk, seed=seed)
        self.questions: list[Question] | None = None
        self.plan: SFTPlan | None = None
        self.pad_id: int | None = None
        self.stats: dict[str, float] = {}

    def paths(self) -> CollectionPaths:
        return CollectionPaths.of(self.trainer, self.hparams.output_dir, "rft_data", "samples.jsonl")

    def setup(self, stage: str) -> None:
        """The questions, read and checked before any model weights load."""
        if stage != "fit" or self.questions is not None:
            return
        require_reload_every_epoch(self.trainer, "RFT reshuffles its examples")
        self.questions = self.source.select(self.reward.load_questions(self.source), self.hparams.seed)
        wanted = self.source.num_questions
        if wanted is not None and len(self.questions) < wanted:
            rank_zero_warn(f"{self.source.name}: only {len(self.questions)} questions after "
                           f"skip_first={self.source.skip_first}, `--data.questions.num_questions` is {wanted}")

    def connect(self, module: PolicyModule) -> None:
        """Collect with the module's (not yet trained) model, then encode the correct samples."""
        if self.plan is not None:
            return
        hp = self.hparams
        self.pad_id = module.tokenizer.pad_token_id
        collect_with_policy(self.trainer, module, self.collector, rollout=self.rollout, paths=self.paths(),
                            questions=self.questions, source=self.source, recollect=hp.recollect,
                            show_progress=hp.show_progress)
        state = read_trace_file(self.paths().records)
        samples, cleaning = clean_samples(load_samples(self.paths().records), hp.trim_repeats, hp.dedupe,
                                          hp.max_per_question)
        if len(samples) < hp.min_samples:
            raise DataError(f"{self.paths().records}: {len(samples)} correct samples after cleaning, "
                            f"`--data.min_samples` is {hp.min_samples}; sample more questions or lower it")
        if not samples:
            rank_zero_warn(f"{self.paths().records}: no correct sample; nothing to train on, the exported model will "
                           "be the base model")
        examples = [encode_sample(module.tokenizer, s, hp.max_length) for s in samples]
        self.plan = SFTPlan([examples], hp.batch_size, hp.shuffle_examples, hp.seed, batching=self.batching)
        totals = summarize(state, TOTALS)
        self.stats = {f"data/{k}": float(v) for k, v in cleaning.items()}
        self.stats.update({
            "data/samples": float(len(samples)), "data/truncated": float(sum(e.truncated for e in examples)),
            "data/questions_with_correct": float(len({s.get("question_id", s["prompt"]) for s in samples})),
            "rollout/generations": float(totals["generations"]), "rollout/generated_tokens": float(totals["tokens"]),
            "rollout/reward_mean": totals["correct"] / max(totals["generations"], 1),
        })
        rank_zero_info(f"RFT data: {len(samples)} correct samples of {totals['generations']} generations "
                       f"({totals['questions']} questions) in {self.paths().records}; cleaning: {cleaning}")

    # ------------------------------------------------------------------ the SFT module's data-module contract
    def stage_of_epoch(self, epoch: int) -> int:
        return 0  # one stage

    def stage_steps(self, trainer) -> list[int]:
        return self.plan.stage_steps(trainer)

    def train_dataloader(self) -> DataLoader:
        loader = self.plan.dataloader(self.trainer, self.pad_id)
        self.stats.update(self.plan.epoch_stats)  # logged by the module at the epoch's start
        return loader

    def teardown(self, stage: str) -> None:
        if self.plan is not None and self.trainer is not None and stage == "fit":
            self.plan.release(self.trainer)

    def handoff(self) -> None:
        return None  # RFT is a baseline: nothing for Phase 2 to match
