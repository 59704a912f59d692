"""On-policy DataModule for Phase 2 (docs/method.md, "Phase 2", steps 1-3 and 5).

Every epoch (``reload_dataloaders_every_n_epochs=1``) it takes the next ``prompts_per_epoch`` questions, samples
ONE completion per question from the student's CURRENT weights through the rollout backend, verifies it, picks
the control phrase P_r and builds the student / teacher sequences. Each rank generates its own share of the
questions with its own seed stream; the data of one epoch is generated once, however often Lightning asks for
the dataloader (``estimated_stepping_batches``, sanity checks, reloads).

Each micro-batch carries ``global_tokens``: the number of valid y tokens in its whole optimizer step (all its
micro-batches, all ranks), so the loss is the token mean of the global batch however the batch is split; with
``batching.mode="tokens"`` each step's rollouts are cut by length into micro-batches of at most ``max_tokens``
padded tokens (:mod:`sdzero_pl.data.batching`), the same update with far less padding on long-tailed rollouts.

Right before generating, :class:`~sdzero_pl.rollout.RolloutCallback` s run ``on_before_rollout`` (the vLLM weight
refresh pushes the student's weights there: Lightning builds the dataloader BEFORE ``on_train_epoch_start``).
When the backend returns the sampled tokens' log-probs, the student recomputes them for a few rollouts and
``rollout/logprob_gap`` measures how stale the engine is (``sdzero_pl/rollout/staleness.py``).

Baselines and controls on the same loop (everything else, the loss included, stays SD-Zero's):

* ``teacher_context``: what the frozen teacher sees in front of y. "revision" is SD-Zero's reviser
  ``chat(x) + y + P_r + y``; "demonstration" is SDFT (Shenfeld et al. 2026, arXiv 2601.19897), the teacher reads
  the question with the dataset's reference solution in the user turn (:data:`DEMONSTRATION_TEMPLATE`) and scores y;
  "answer" is the "final answer only" SDFT variant SD-Zero compares with (:data:`ANSWER_DEMONSTRATION`);
  "question" strips (y, P_r) from the teacher's context: it scores y in the student's own context, so the loss is
  0 until the student moves away from the frozen teacher (a "no teacher information" control).
* ``reward_signal="shuffled"``: "same steps, no signal". The verifier still runs (``rollout/reward_mean`` logs the
  true reward), but P_r is picked by a seeded permutation of this rank's rewards of the epoch: same rate of P_1 and
  P_0, same steps and tokens, but P_r says nothing about y. ``rollout/control_agreement`` is the fraction of
  examples whose phrase matches their true reward (1 with "verified").
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from sdzero_pl.contracts import DistillPolicy, require
from sdzero_pl.core.prompts import ControlPhrases, control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import DistillExample, build_distill_example, build_prefixed_example, collate_distill
from sdzero_pl.data.batching import (
    PAD, Batching, MicroBatcher, RankShard, check_question_pool, padding_fraction, planned_epochs,
    require_reload_every_epoch, split_steps, step_totals
)
from sdzero_pl.data.questions import Question, QuestionSource, epoch_questions
from sdzero_pl.phase1.handoff import check_handoff, read_handoff
from sdzero_pl.rollout import HFRollout, RolloutBackend, before_rollout, rollout_seed
from sdzero_pl.rollout.staleness import logprob_gap, sampled_token_logps
from sdzero_pl.tasks import MathReward, Verifier

TEACHER_CONTEXTS = ("revision", "demonstration", "answer", "question")
REWARD_SIGNALS = ("verified", "shuffled")

# SDFT's teacher prompt (arXiv 2601.19897, Sec. 3, and its reference code idanshen/Self-Distillation): the question,
# then the demonstration, then an invitation to answer in the model's own words.
DEMONSTRATION_TEMPLATE = (
    "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
# The demonstration of the "final answer only" SDFT variant (teacher_context="answer"); ``{answer}`` is the
# dataset's reference answer.
ANSWER_DEMONSTRATION = "The final answer is \\boxed{{answer}}."


def fill_template(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]`` in one pass: other braces (LaTeX) stay, and a
    value that itself holds ``{question}`` is not substituted again."""
    pattern = "|".join(re.escape("{" + name + "}") for name in values)
    return re.sub(pattern, lambda match: values[match.group(0)[1:-1]], template)


def teacher_question(question: Question, instruction: str, context: str, template: str) -> str:
    """The teacher's user turn for "demonstration" / "answer" (the student's is ``question + instruction``)."""
    text = question.question + instruction
    if context == "demonstration":
        assert question.solution is not None, f"question {question.id} has no solution (solution_field not set?)"
        return fill_template(template, question=text, demonstration=question.solution)
    assert context == "answer", f"no teacher question for teacher_context={context!r}"
    demonstration = fill_template(ANSWER_DEMONSTRATION, answer=question.answer)
    return fill_template(template, question=text, demonstration=demonstration)


def shuffled_rewards(rewards: Sequence[float | None], seed: int) -> list[float | None]:
    """The usable rewards in a seeded random order over the usable slots (None slots stay put): the same rate of
    r=1, but which y gets which reward carries no information."""
    slots = [i for i, r in enumerate(rewards) if r is not None]
    values = [rewards[i] for i in slots]
    random.Random(seed).shuffle(values)
    out = list(rewards)
    for i, value in zip(slots, values):
        out[i] = value
    return out


def control_agreement(rewards: Sequence[float | None], control_rewards: Sequence[float | None]) -> float:
    """Fraction of the usable examples whose control phrase is the one their true reward picks."""
    pairs = [(r >= 0.5, c >= 0.5) for r, c in zip(rewards, control_rewards) if r is not None]
    return sum(r == c for r, c in pairs) / max(len(pairs), 1)


@dataclass
class EpochData:
    epoch: int
    batches: list[dict]
    stats: dict[str, float]
    completions: list[str]


def check_teacher_context(context: str, template: str, solution_field: str | None, reward_signal: str) -> None:
    """Validate the baseline / control flags together (errors name the flags and the values)."""
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"`--data.teacher_context` must be one of {TEACHER_CONTEXTS}, got {context!r}")
    if reward_signal not in REWARD_SIGNALS:
        raise ValueError(f"`--data.reward_signal` must be one of {REWARD_SIGNALS}, got {reward_signal!r}")
    missing = [p for p in ("{question}", "{demonstration}") if p not in template]
    if missing:
        raise ValueError(f"`--data.demonstration_template` must contain {' and '.join(missing)}, got {template!r}")
    if context == "demonstration" and solution_field is None:
        raise ValueError("`--data.teacher_context=demonstration` needs `--data.questions.solution_field` (the column "
                         "of reference solutions), got solution_field=None")
    if reward_signal != "verified" and context != "revision":
        raise ValueError(f"`--data.reward_signal={reward_signal}` only applies with `--data.teacher_context=revision` "
                         f"(the reward reaches the teacher only through P_r), got teacher_context={context!r}")


class OnPolicyDataModule(L.LightningDataModule):
    """Generates Phase-2 batches each epoch from the student being trained."""

    def __init__(
        self,
        questions: QuestionSource,
        control: ControlPhrases = ControlPhrases(),
        prompts_per_epoch: int = 128,
        batch_size: int = 8,
        batching: Batching = Batching(),
        max_teacher_len: int = 8192,
        rollout: RolloutBackend | None = None,
        reward: Verifier | None = None,
        seed: int = 0,
        logprob_gap_samples: int = 16,
        teacher_context: str = "revision",
        demonstration_template: str = DEMONSTRATION_TEMPLATE,
        reward_signal: str = "verified",
        ignore_handoff: bool = False,
        reuse_questions: bool = False,
    ) -> None:
        """
        Args:
            questions: the questions (paper: 9K OpenR1-Math questions Phase 1 never saw; set ``shuffle``). When
                the student's start model is a Phase-1 export, the questions Phase 1 used are left out.
            control: the control phrases P_r; must be Phase 1's (checked against the start model's hand-off).
            prompts_per_epoch: questions per epoch (all ranks together); one completion each.
            batch_size: rollouts per micro-batch on each rank ("count" batching); an optimizer step takes
                ``batch_size x accumulate_grad_batches`` rollouts per rank in either batching mode.
            batching: how a step's rollouts are cut into micro-batches: fixed count, or by tokens (length-aware).
            max_teacher_len: token budget of the teacher sequence (x + y + P_r + y, or x' + y for the other
                ``teacher_context`` s); y is truncated to fit.
            rollout: the generation backend (``class_path``); default HF generate.
            reward: the verifier (``class_path``); default the math reward. It also reads the questions.
            seed: seed of the question order (``questions.shuffle``) and of the rollout seed streams.
            logprob_gap_samples: rollouts per rank whose sampled tokens the student re-scores for
                ``rollout/logprob_gap`` (only with a backend that returns log-probs, e.g. vLLM); 0 = off.
            teacher_context: what the frozen teacher sees before scoring y: "revision" (SD-Zero,
                ``chat(x) + y + P_r + y``), "demonstration" (SDFT: x with the reference solution, needs
                ``questions.solution_field``), "answer" (SDFT with the final answer only) or "question" (control:
                chat(x), the student's own context).
            demonstration_template: the teacher's user turn for "demonstration" / "answer", with the placeholders
                {question} (x plus the instruction) and {demonstration}; default: SDFT's (arXiv 2601.19897).
            reward_signal: "verified" (P_r from the verifier's reward) or "shuffled" (control: P_r from a seeded
                permutation of the epoch's rewards on this rank; only with teacher_context "revision").
            ignore_handoff: do not check the start model's Phase-1 hand-off record (control phrases, instruction,
                system prompt) and do not leave out its questions.
            reuse_questions: let the run cycle through its question pool when it needs more questions
                (``prompts_per_epoch`` x epochs) than the pool holds; false: that is an error at setup, with the
                numbers (Phase 2 is meant to see new questions).
        """
        super().__init__()
        for flag, value, low in (("prompts_per_epoch", prompts_per_epoch, 1), ("batch_size", batch_size, 1),
                                 ("max_teacher_len", max_teacher_len, 2),
                                 ("logprob_gap_samples", logprob_gap_samples, 0)):
            if value < low:
                raise ValueError(f"`--data.{flag}` must be >= {low}, got {value}")
        check_teacher_context(teacher_context, demonstration_template, questions.solution_field, reward_signal)
        self.save_hyperparameters(ignore=["rollout", "reward"])
        self.batcher = MicroBatcher(batching)
        self.hparams.update(questions=asdict(questions), control=asdict(control),  # plain types in checkpoints
                            batching=asdict(self.batcher.batching))
        self.source, self.control = questions, control
        self.rollout = rollout or HFRollout()
        self.reward = reward or MathReward()
        self.module: DistillPolicy | None = None
        self.loaded: list[Question] | None = None  # every question of the dataset, validated
        self.questions: list[Question] | None = None  # the pool this run draws from, in order
        self._epoch_data: EpochData | None = None
        self._bound = False  # rollout backend bound to the student
        self.rollout_stats: dict[str, float] = {}  # this epoch's rollout metrics, logged by the module
        self.last_completions: list[str] = []  # this rank's completion texts of the latest epoch (for callbacks)

    # ----------------------------------------------------------------------------------------------- questions
    def setup(self, stage: str) -> None:
        """Read and check the questions (before any model weights load)."""
        if self.trainer is not None and stage == "fit":
            require_reload_every_epoch(self.trainer, "on-policy training generates new rollouts")
            self.batcher.accumulation(self.trainer)  # the user's, before any epoch's plan sets the trainer's
        if self.loaded is not None:
            return
        self.loaded = self.reward.load_questions(self.source)  # the verifier knows its kind of reference
        self.questions = self._pool(set())
        if self.hparams.teacher_context == "answer":
            for q in self.loaded:
                if not isinstance(q.answer, str):
                    raise ValueError(f"`--data.teacher_context=answer` needs a text answer per question (math); "
                                     f"{self.source.name}: question {q.id} has {type(q.answer).__name__} "
                                     f"{q.answer!r:.80}")

    def teardown(self, stage: str) -> None:
        if self.trainer is not None and stage == "fit":
            self.batcher.release(self.trainer)

    def connect(self, module: DistillPolicy) -> None:
        """Bind the student's module; check its Phase-1 hand-off record and leave out Phase 1's questions."""
        self.module = require(module, DistillPolicy, type(self).__name__)
        handoff = None if self.hparams.ignore_handoff else read_handoff(module.start_model)
        if handoff is not None:
            reads_control = self.hparams.teacher_context == "revision"
            check_handoff(handoff, self.source, self.control if reads_control else None, module.start_model)
        phase1 = set(handoff.question_ids) if handoff is not None and handoff.dataset == self.source.name else set()
        used = f"{len(phase1):,} used by Phase 1 ({module.start_model})" if phase1 else ""
        if phase1:
            self.questions = self._pool(phase1, used)
            rank_zero_info(f"{self.source.name}: {len(phase1)} questions used by Phase 1 ({module.start_model}) "
                           f"left out, {len(self.questions)} remain")
        if self.trainer is not None:
            steps = self.optimizer_steps_per_epoch(self.trainer.world_size, self.trainer.accumulate_grad_batches)
            check_question_pool(len(self.questions), self.hparams.prompts_per_epoch,
                                planned_epochs(self.trainer, steps), self.source.name, self._why(used),
                                self.hparams.reuse_questions)

    def _why(self, also: str = "") -> str:
        """Where the dataset's questions went (error messages)."""
        src = self.source
        excluded = f", exclude_ids_file={src.exclude_ids_file}" if src.exclude_ids_file else ""
        return (f"{len(self.loaded):,} in the dataset; skip_first={src.skip_first}, skip_last={src.skip_last}, "
                f"num_questions={src.num_questions}{excluded}" + (f"; {also} left out" if also else ""))

    def _pool(self, exclude: set[str], also: str = "") -> list[Question]:
        pool = self.source.select(self.loaded, self.hparams.seed, exclude)
        if not pool:
            raise ValueError(f"{self.source.name}: no questions left for this run ({self._why(also)})")
        return pool

    def epoch_questions(self, epoch: int) -> list[Question]:
        """The questions of one epoch (all ranks): the next ``prompts_per_epoch``, wrapping around the pool."""
        assert self.questions is not None, "setup() must run before epoch_questions()"
        return epoch_questions(self.questions, epoch, self.hparams.prompts_per_epoch)

    def optimizer_steps_per_epoch(self, world_size: int, accumulate: int) -> int:
        local = self.hparams.prompts_per_epoch // world_size
        return math.ceil(math.ceil(local / self.hparams.batch_size) / accumulate)

    # ------------------------------------------------------------------------------------------------ rollouts
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch_data is None or self._epoch_data.epoch != epoch:
            self._epoch_data = self._generate_epoch(epoch)
            self.rollout_stats = self._epoch_data.stats
            self.last_completions = self._epoch_data.completions
        return DataLoader(RankShard(self._epoch_data.batches), batch_size=None, num_workers=0)

    def _generate_epoch(self, epoch: int) -> EpochData:
        trainer, module, hp = self.trainer, self.module, self.hparams
        rank, world = trainer.global_rank, trainer.world_size
        if hp.prompts_per_epoch % world:
            raise ValueError(f"`--data.prompts_per_epoch` ({hp.prompts_per_epoch}) must be divisible by the number "
                             f"of ranks ({world})")
        tokenizer, stops = module.tokenizer, self.bind_rollout()
        questions = self.epoch_questions(epoch)[rank::world]
        prompts = encode_prompts(tokenizer, [self.source.text(q) for q in questions], self.source.system_prompt,
                                 self.source.chat_template_kwargs)
        before_rollout(trainer, self.rollout, module.policy)  # e.g. the vLLM weight refresh
        start = time.perf_counter()
        rollouts = self.rollout.generate(prompts, seed=rollout_seed(hp.seed, epoch, rank),
                                         desc=f"rollouts epoch {epoch}")
        generate_s = time.perf_counter() - start
        completions = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        verdict = self.reward(completions, [q.answer for q in questions])
        control_stats = {}
        if hp.teacher_context == "revision":
            controls = verdict.rewards  # the reward picks P_r ...
            if hp.reward_signal == "shuffled":  # ... or, in the control, a permutation of them does
                controls = shuffled_rewards(verdict.rewards, rollout_seed(hp.seed, epoch, rank))
            examples = self._revision_examples(tokenizer, prompts, rollouts, controls, stops)
            control_stats = {"rollout/control_agreement": control_agreement(verdict.rewards, controls)}
        else:
            examples = self._prefixed_examples(tokenizer, questions, prompts, rollouts)
        batches, batch_stats = self._batches(examples, tokenizer.pad_token_id)
        valid = [r for r in verdict.rewards if r is not None]
        stats = {
            "rollout/reward_mean": sum(valid) / max(len(valid), 1),
            "rollout/len_mean": sum(len(r.completion_ids) for r in rollouts) / max(len(rollouts), 1),
            "rollout/truncated_frac": sum(r.truncated for r in rollouts) / max(len(rollouts), 1),
            "rollout/budget_truncated_frac": sum(e.truncated for e in examples) / max(len(examples), 1),
            "rollout/skipped_answers": float(verdict.skipped),
            "rollout/verify_timeouts": float(verdict.timeouts),
            "rollout/generations": float(len(rollouts)),
            "rollout/generated_tokens": float(sum(len(r.completion_ids) for r in rollouts)),
            "time/generate_s": generate_s,
            **batch_stats,
            **control_stats,
            **self._staleness(prompts, rollouts, tokenizer.pad_token_id),
        }
        return EpochData(epoch, batches, stats, completions)

    def _revision_examples(self, tokenizer, prompts, rollouts, controls, stops) -> list[DistillExample]:
        """SD-Zero's teacher ``chat(x) + y + P_r + y``, P_r picked by ``controls`` (the reward, or the control's)."""
        examples, phrases = [], self.control.phrases
        for prompt, rollout, reward in zip(prompts, rollouts, controls):
            control = tokenizer.encode(control_text(phrases, reward or 0.0), add_special_tokens=False)
            example = build_distill_example(prompt, rollout.completion_ids, control, stops,
                                            self.hparams.max_teacher_len)
            if reward is None:  # unusable reference: keep the slot (equal batch counts on all ranks), no loss
                example.student_mask = [0] * len(example.student_mask)
                example.teacher_mask = [0] * len(example.teacher_mask)
            examples.append(example)
        return examples

    def _prefixed_examples(self, tokenizer, questions, prompts, rollouts) -> list[DistillExample]:
        """Teacher ``chat(x') + y`` with x' from ``teacher_context`` (SDFT, the question-only control). The reward
        does not reach this teacher, so rows with an unusable reference keep their loss."""
        hp = self.hparams
        if hp.teacher_context == "question":
            prefixes = prompts
        else:
            texts = [teacher_question(q, self.source.instruction, hp.teacher_context, hp.demonstration_template)
                     for q in questions]
            prefixes = encode_prompts(tokenizer, texts, self.source.system_prompt, self.source.chat_template_kwargs)
        return [build_prefixed_example(prompt, prefix, rollout.completion_ids, hp.max_teacher_len)
                for prompt, prefix, rollout in zip(prompts, prefixes, rollouts)]

    def bind_rollout(self) -> list[int]:
        """Bind the rollout backend to the student (once; a vLLM engine is built here) and return the stop ids."""
        module = self.module
        stops = stop_token_ids(module.tokenizer, module.policy.generation_config.eos_token_id)
        if not self._bound:
            self.rollout.setup(module.policy, module.tokenizer, stops)
            self._bound = True
        return stops

    def _staleness(self, prompts, rollouts, pad_id: int) -> dict[str, float]:
        """``rollout/logprob_gap`` over the first ``logprob_gap_samples`` rollouts, if the engine gave log-probs."""
        n = min(self.hparams.logprob_gap_samples, len(rollouts))
        if n == 0 or any(r.logps is None for r in rollouts[:n]):
            return {}
        trainer_logps = self.module.score("policy", sampled_token_logps, prompts[:n],
                                          [r.completion_ids for r in rollouts[:n]], pad_id, self.hparams.batch_size,
                                          self.module.chunk_size)
        return {"rollout/logprob_gap": logprob_gap([r.logps for r in rollouts[:n]], trainer_logps)}

    def _batches(self, examples: list[DistillExample], pad_id: int) -> tuple[list[dict], dict[str, float]]:
        """This rank's micro-batches of the epoch, each with the valid-token count of its optimizer step over all
        ranks; and the batching metrics."""
        steps = split_steps(list(range(len(examples))), self.hparams.batch_size,
                            self.batcher.accumulation(self.trainer))
        plan = self.batcher.plan(self.trainer, steps, [max(len(e.student_ids), len(e.teacher_ids)) for e in examples])
        totals = step_totals(self.trainer.strategy,
                             [sum(examples[i].num_tokens for mb in step for i in mb if i != PAD) for step in plan.steps])
        shortest = min(examples, key=lambda e: len(e.teacher_ids))  # a padding row: context only, no loss
        padding = dataclasses.replace(shortest, student_mask=[0] * len(shortest.student_mask),
                                      teacher_mask=[0] * len(shortest.teacher_mask))
        batches = []
        for step, total in zip(plan.steps, totals):
            for mb in step:
                batch = collate_distill([examples[i] if i != PAD else padding for i in mb], pad_id)
                batch["global_tokens"] = torch.tensor(int(total))
                batches.append(batch)
        stats = {"train/padding_frac": padding_fraction(batches, ("student_attention_mask", "teacher_attention_mask")),
                 "train/micro_batches_per_step": float(plan.micro_batches_per_step or self.batcher.accumulate),
                 "train/over_budget": float(plan.over_budget)}
        return batches, stats
