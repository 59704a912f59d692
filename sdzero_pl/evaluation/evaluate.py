"""Benchmark evaluation and generate-then-revise (docs/method.md, "Results" and "Analyses").

    python main.py validate --config configs/eval/qwen.yaml [--model.model_name_or_path=runs/.../hf_model]

:class:`EvalDataModule` loads the benchmarks (:mod:`sdzero_pl.evaluation.benchmarks`) and hands each rank its share of the
questions; :class:`EvalModule` loads any HF checkpoint, samples ``num_samples`` completions per question through
the rollout backend (paper: temperature 0.7, k = 8), verifies them and reports avg@n, unbiased pass@k, mean
completion length and truncation rate per benchmark and averaged over benchmarks (unweighted, like the paper's
"Avg" column). With ``revise: true`` each completion is also revised in the SAME assistant turn,
``chat(x) + y' + "\\n\\n" + P_r + "\\n\\n"`` (y' = y without its end-of-turn token, P_r picked by y's reward),
and the paper's Table 9 numbers are reported: initial and revised accuracy, correction rate, tokens of both.
Results go to ``<log_dir>/eval_<stage>.json`` and ``eval_<stage>.md``. ``callbacks.BenchmarkEval`` runs the
same evaluation on the trained policy during ``fit``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from sdzero_pl.core.artifacts import atomic_write_json, atomic_write_text, read_manifest, write_manifest
from sdzero_pl.core.console import advance_bar
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import ControlPhrases, control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import strip_stop
from sdzero_pl.data.batching import RankShard
from sdzero_pl.data.questions import Question
from sdzero_pl.evaluation.benchmarks import PAPER_BENCHMARKS, load_benchmark, resolve_benchmark
from sdzero_pl.evaluation.metrics import BenchmarkScores, markdown_table
from sdzero_pl.rollout import HFRollout, RolloutBackend, rollout_seed
from sdzero_pl.tasks import MathReward, Verifier

DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class EvalItem:
    benchmark: str
    question: Question
    text: str  # the question with the instruction appended, before the chat template


@dataclass
class SampleRecord:
    benchmark: str
    question_id: str
    sample: int
    reward: float | None  # None: the reference answer could not be parsed
    tokens: int
    truncated: bool
    completion: str
    revision_reward: float | None = None
    revision_tokens: int | None = None
    revision_truncated: bool | None = None
    revision: str | None = None


# -------------------------------------------------------------------------------------------------- data
def _as_list(batch: list[EvalItem]) -> list[EvalItem]:
    return batch


class EvalDataModule(L.LightningDataModule):
    """Benchmark questions for ``validate`` / ``test``; each rank gets every ``world_size``-th question."""

    def __init__(
        self,
        benchmarks: list[str] | None = None,
        benchmark_overrides: dict[str, dict[str, Any]] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_questions: int | None = None,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            benchmarks: registry names (aime24, aime25, hmmt25, math500, amobench, openr1) and/or local
                .json / .jsonl / .parquet files; default: the paper's math benchmarks.
            benchmark_overrides: per benchmark name, adapter fields to change (source, config, split,
                question_field, answer_field, id_field, normalise, start, stop), e.g.
                ``{aime25: {source: math-ai/aime25, split: test}}``.
            instruction: text appended to every question.
            system_prompt: optional system message of the chat.
            chat_template_kwargs: extra chat-template arguments, e.g. ``{enable_thinking: false}`` for hybrid-thinking
                models (the paper evaluates in non-thinking mode); must be the training configs'.
            max_questions: keep only the first N questions of each benchmark (smoke tests); None = all.
            batch_size: questions per step (each sampled ``num_samples`` times).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`--data.batch_size` must be >= 1, got {batch_size}")
        if max_questions is not None and max_questions < 1:
            raise ValueError(f"`--data.max_questions` must be >= 1, got {max_questions}")
        self.save_hyperparameters()
        # Read from attributes, not self.hparams: LightningCLI gives every data module it builds (also one nested
        # in a callback such as BenchmarkEval) the hparams of the top-level `data` entry.
        self.instruction, self.system_prompt, self.chat_template_kwargs = instruction, system_prompt, chat_template_kwargs
        self.max_questions, self.batch_size = max_questions, batch_size
        entries = list(benchmarks) if benchmarks is not None else list(PAPER_BENCHMARKS)
        if not entries:
            raise ValueError("`--data.benchmarks` must name at least one benchmark")
        self.benchmarks = [resolve_benchmark(e, benchmark_overrides) for e in entries]
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"`--data.benchmarks` names a benchmark twice: {names}")
        stray = sorted(set(benchmark_overrides or {}) - set(names))
        if stray:
            raise ValueError(f"`--data.benchmark_overrides` names benchmarks that are not evaluated: {stray} "
                             f"(evaluated: {names})")
        self.items: list[EvalItem] | None = None
        self.ungraded: dict[str, int] = {}  # per benchmark: questions left out, their answer kind cannot be graded

    @property
    def benchmark_names(self) -> list[str]:
        return [b.name for b in self.benchmarks]

    def load_items(self) -> list[EvalItem]:
        """Every benchmark's questions (all ranks), loaded once."""
        if self.items is None:
            items = []
            for bench in self.benchmarks:
                loaded = load_benchmark(bench)
                questions, self.ungraded[bench.name] = loaded.questions[: self.max_questions], loaded.ungraded
                if not questions:
                    raise ValueError(f"benchmark {bench.name!r} ({bench.source}) holds no questions")
                items += [EvalItem(bench.name, q, q.question + self.instruction) for q in questions]
            self.items = items
        return self.items

    def setup(self, stage: str) -> None:
        self.load_items()

    def shard(self, rank: int, world_size: int) -> list[EvalItem]:
        return self.load_items()[rank::world_size]

    def _loader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(RankShard(self.shard(rank, world)), batch_size=self.batch_size,
                          collate_fn=_as_list, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # question texts (frozen dataclasses): the rollout backend moves token ids itself

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


# ------------------------------------------------------------------------------------------------ sampling
class Sampler:
    """Samples, verifies and (optionally) revises completions for a batch of :class:`EvalItem` s."""

    def __init__(self, rollout: RolloutBackend, reward: Verifier, tokenizer, stop_ids: Sequence[int],
                 num_samples: int, phrases: dict[int, str] | None, revise_max_new_tokens: int | None) -> None:
        self.rollout, self.reward, self.tokenizer = rollout, reward, tokenizer
        self.stop_ids, self.num_samples = list(stop_ids), num_samples
        self.phrases, self.revise_max_new_tokens = phrases, revise_max_new_tokens

    def __call__(self, items: Sequence[EvalItem], system_prompt: str | None, seed: int, revise_seed: int,
                 progress: Callable[[float], None] | None = None,
                 template_kwargs: dict[str, Any] | None = None) -> list[SampleRecord]:
        """``progress(fraction)`` is told how much of this batch's generation (samples, then revisions) is done;
        ``template_kwargs``: extra arguments of the chat template (e.g. ``enable_thinking``)."""
        n, tok = self.num_samples, self.tokenizer
        prompts = encode_prompts(tok, [item.text for item in items], system_prompt, template_kwargs)
        repeated = [p for p in prompts for _ in range(n)]
        answers = [item.question.answer for item in items for _ in range(n)]
        tick = None if progress is None else _counter(len(repeated) * (1 if self.phrases is None else 2), progress)
        rollouts = self.rollout.generate(repeated, seed=seed, desc="eval samples", on_progress=tick)
        texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        rewards = self.reward(texts, answers).rewards
        records = [
            SampleRecord(items[i // n].benchmark, items[i // n].question.id, i % n, rewards[i],
                         len(r.completion_ids), r.truncated, texts[i])
            for i, r in enumerate(rollouts)
        ]
        if self.phrases is not None:
            self._revise(records, repeated, rollouts, answers, revise_seed, tick)
        return records

    def _revise(self, records, prompts, rollouts, answers, seed: int, tick: Callable[[int], None] | None) -> None:
        """Revision context: chat(x) + y' + "\\n\\n" + P_r + "\\n\\n", the delimiter tokenized on its own."""
        tok = self.tokenizer
        controls = {r: tok.encode(control_text(self.phrases, r), add_special_tokens=False) for r in (0.0, 1.0)}
        contexts = [
            list(prompt) + strip_stop(rollout.completion_ids, self.stop_ids) + controls[1.0 if rec.reward else 0.0]
            for prompt, rollout, rec in zip(prompts, rollouts, records)
        ]
        revisions = self.rollout.generate(contexts, seed=seed, desc="eval revisions",
                                          max_new_tokens=self.revise_max_new_tokens, on_progress=tick)
        texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in revisions]
        rewards = self.reward(texts, answers).rewards
        for rec, revision, text, reward in zip(records, revisions, texts, rewards):
            rec.revision_reward, rec.revision_tokens = reward, len(revision.completion_ids)
            rec.revision_truncated, rec.revision = revision.truncated, text


def _counter(total: int, progress: Callable[[float], None]) -> Callable[[int], None]:
    done = [0]

    def tick(count: int) -> None:
        done[0] += count
        progress(min(done[0] / max(total, 1), 1.0))

    return tick


def evaluate_questions(model: torch.nn.Module, tokenizer, questions: Sequence[Question], *, rollout: RolloutBackend,
                       reward: Verifier, num_samples: int = 1, pass_k: Sequence[int] | None = None,
                       phrases: dict[int, str] | None = None, instruction: str = "", system_prompt: str | None = None,
                       batch_size: int = 64, seed: int = 0, name: str = "questions",
                       ) -> tuple[dict[str, float], list[SampleRecord]]:
    """The evaluator on questions held in memory (scripts, notebooks, a training loop outside Lightning): the same
    sampling, verification, revision and metrics as ``main.py validate`` on one rank (same ``seed`` and
    ``batch_size``: the same samples). ``phrases`` adds generate-then-revise. Returns the metrics row of
    :class:`~sdzero_pl.evaluation.metrics.BenchmarkScores` (avg@n, pass@k, length, truncation, revision stats)
    and every sample."""
    pass_k = list(pass_k) if pass_k is not None else [num_samples]
    check_sampling(num_samples, pass_k, "evaluate_questions")
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    rollout.setup(model, tokenizer, stops)
    sampler = Sampler(rollout, reward, tokenizer, stops, num_samples, phrases, None)
    scores = BenchmarkScores([name], num_samples, pass_k, phrases is not None)
    items = [EvalItem(name, q, q.question + instruction) for q in questions]
    records: list[SampleRecord] = []
    for index, start in enumerate(range(0, len(items), batch_size)):
        batch = sampler(items[start : start + batch_size], system_prompt, seed=rollout_seed(seed, index, 0),
                        revise_seed=rollout_seed(seed + 1, index, 0))
        scores.update(batch)
        records += batch
    return scores.compute()[name], records


def write_results(results: dict[str, dict[str, float]], directory: str, stage: str,
                  settings: dict[str, Any]) -> tuple[str, str]:
    """``eval_<stage>.json`` (raw fractions + the settings used) and ``eval_<stage>.md`` (the table)."""
    json_path, md_path = os.path.join(directory, f"eval_{stage}.json"), os.path.join(directory, f"eval_{stage}.md")
    clean = {b: {k: (None if math.isnan(v) else v) for k, v in row.items()} for b, row in results.items()}
    atomic_write_json(json_path, {"settings": settings, "results": clean})
    atomic_write_text(md_path, markdown_table(results))
    return json_path, md_path


def record_complete(directory: str, stage: str) -> None:
    """Mark the evaluation in ``directory`` as finished (:func:`~sdzero_pl.core.artifacts.is_complete`): a manifest
    of its result and sample files, written last (those of an earlier stage in the same directory are kept)."""
    earlier = read_manifest(directory)
    names = {name for name in (earlier["files"] if earlier else {}) if os.path.isfile(os.path.join(directory, name))}
    names |= {name for name in os.listdir(directory)
              if name in (f"eval_{stage}.json", f"eval_{stage}.md") or
              (name.startswith(f"samples_{stage}_rank") and name.endswith(".jsonl"))}
    write_manifest(directory, "evaluation", sorted(names))


def check_sampling(num_samples: int, pass_k: Sequence[int], prefix: str) -> None:
    if num_samples < 1:
        raise ValueError(f"`{prefix}.num_samples` must be >= 1, got {num_samples}")
    for k in pass_k:
        if not 1 <= k <= num_samples:
            raise ValueError(f"`{prefix}.pass_k` entries must be in [1, num_samples={num_samples}], got {k}")


def _settings(sampler_rollout: RolloutBackend, data: EvalDataModule, **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "temperature": sampler_rollout.temperature,
        "top_p": sampler_rollout.top_p,
        "max_new_tokens": sampler_rollout.max_new_tokens,
        "benchmarks": {b.name: asdict(b) for b in data.benchmarks},
        "instruction": data.instruction,
        "chat_template_kwargs": data.chat_template_kwargs,
        "ungraded": dict(data.ungraded),
    }


# -------------------------------------------------------------------------------------------------- module
class EvalModule(L.LightningModule):
    """Scores any HF checkpoint on the data module's benchmarks: ``python main.py validate`` (or ``test``)."""

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "bfloat16",
        num_samples: int = 8,
        pass_k: list[int] | None = None,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        revise: bool = False,
        revise_max_new_tokens: int | None = None,
        control: ControlPhrases = ControlPhrases(),
        seed: int = 0,
        results_dir: str | None = None,
        save_samples: bool = False,
    ) -> None:
        """
        Args:
            model_name_or_path: the checkpoint to evaluate (hub id or HF directory, e.g. ``<run>/hf_model``).
            dtype: weights dtype: float32, bfloat16, float16 or float64.
            num_samples: completions sampled per question, n (paper: avg@8).
            pass_k: k values of the unbiased pass@k estimator, each <= num_samples; default ``[num_samples]``.
            rollout: the generation backend (``class_path``); default HF generate at temperature 0.7 (paper), up to
                32768 new tokens.
            reward: the verifier (``class_path``); default the math reward.
            revise: also run generate-then-revise (paper Table 9): revise every sample with P_r in the same turn.
            revise_max_new_tokens: longest revision; default the rollout's ``max_new_tokens``.
            control: the control phrases P_r of generate-then-revise (the same strings as training).
            seed: seed of the sampling streams (one per rank and batch).
            results_dir: where eval_<stage>.json / .md go; default the trainer's log directory.
            save_samples: also write every sample (text, reward, tokens) to ``samples_<stage>_rank<r>.jsonl``.
        """
        super().__init__()
        pass_k = list(pass_k) if pass_k is not None else [num_samples]
        check_sampling(num_samples, pass_k, "--model")
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.hparams.update(control=asdict(control))  # plain types in checkpoints
        self.rollout = rollout or HFRollout(temperature=0.7, max_new_tokens=32768)
        self.reward = reward or MathReward()
        self.pass_k = pass_k
        self.phrases = control.phrases
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.policy: torch.nn.Module | None = None  # the model evaluated
        self.scores: BenchmarkScores | None = None
        self._sampler: Sampler | None = None
        self._records: list[SampleRecord] = []

    @property
    def start_model(self) -> str:
        return self.hparams.model_name_or_path

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = load_model(self.hparams.model_name_or_path, self.hparams.dtype)
            self.policy.eval()
            self.policy.requires_grad_(False)

    def _begin(self) -> None:
        data = self.trainer.datamodule
        if not isinstance(data, EvalDataModule):
            raise TypeError(f"EvalModule needs `--data` to be an EvalDataModule, got {type(data).__name__}")
        hp = self.hparams
        if self._sampler is None:
            stops = stop_token_ids(self.tokenizer, self.policy.generation_config.eos_token_id)
            self.rollout.setup(self.policy, self.tokenizer, stops)
            self._sampler = Sampler(self.rollout, self.reward, self.tokenizer, stops, hp.num_samples,
                                    self.phrases if hp.revise else None, hp.revise_max_new_tokens)
        self.scores = BenchmarkScores(data.benchmark_names, hp.num_samples, self.pass_k, hp.revise,
                                      [data.ungraded.get(n, 0) for n in data.benchmark_names]).to(self.device)
        self._records = []

    def _step(self, batch: list[EvalItem], batch_idx: int, stage: str) -> None:
        seed, rank, data = self.hparams.seed, self.global_rank, self.trainer.datamodule
        records = self._sampler(batch, data.system_prompt, seed=rollout_seed(seed, batch_idx, rank),
                                revise_seed=rollout_seed(seed + 1, batch_idx, rank),
                                progress=lambda done: advance_bar(self.trainer, stage, batch_idx + done),
                                template_kwargs=data.chat_template_kwargs)
        self.scores.update(records)
        if self.hparams.save_samples:
            self._records.extend(records)

    def _finish(self, stage: str) -> None:
        results = self.scores.compute()  # summed over ranks by torchmetrics
        for bench, row in results.items():
            values = {f"{stage}/{bench}/{k}": v for k, v in row.items() if not math.isnan(v)}
            self.log_dict(values, batch_size=1)
        directory = self.hparams.results_dir or self.trainer.log_dir or self.trainer.default_root_dir
        if self.hparams.save_samples:  # every rank's samples first, then the results, then the manifest
            write_samples(self._records, os.path.join(directory, f"samples_{stage}_rank{self.global_rank}.jsonl"))
        self.trainer.strategy.barrier("eval samples")
        if self.trainer.is_global_zero:
            hp = self.hparams
            settings = _settings(self.rollout, self.trainer.datamodule, model_name_or_path=hp.model_name_or_path,
                                 num_samples=hp.num_samples, pass_k=self.pass_k, revise=hp.revise, seed=hp.seed)
            write_results(results, directory, stage, settings)
            record_complete(directory, stage)
            rank_zero_info(f"\n{hp.model_name_or_path}: {stage} results ({directory})\n\n{markdown_table(results)}")
        self.scores.reset()

    def on_validation_start(self) -> None:
        self._begin()

    def validation_step(self, batch: list[EvalItem], batch_idx: int) -> None:
        self._step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_start(self) -> None:
        self._begin()

    def test_step(self, batch: list[EvalItem], batch_idx: int) -> None:
        self._step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._finish("test")


def write_samples(records: Sequence[SampleRecord], path: str) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(record)) + "\n" for record in records))
