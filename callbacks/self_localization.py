"""Token-level self-localization logger (docs/method.md, "Analyses"; the paper's bucket analysis of Phase 2).

On a FIXED set of responses (default 200, sampled once from the student with a fixed seed the first time the
logger runs), every ``every_n_steps`` optimizer steps it scores each response with the CURRENT student and teacher:

* D_t: the per-token divergence of the training loss (same top-k, same ``divergence`` / ``forward_weight``);
* the token KL reward ``log p_student(y_t | x, y_<t) - log p_teacher(y_t | x, y, P_r, y_<t)`` (full vocabulary,
  computed per chunk of tokens, never as [batch, seq, vocab]).

It writes, under ``<log_dir>/self_localization/step_<N>/``: ``data.json`` (every number), ``responses.html`` (an
index of every response ranked by its largest D_t, with the token that holds it, linked to the top responses
rendered with their question, reference answer, reward and each token shaded by its D_t;
:mod:`sdzero_pl.evaluation.localization`) and ``buckets.png``; with a TensorBoard logger it also logs the bucket
figure, histograms of D_t and of the bucket shares, the top responses as text and a few scalars. Bucket analysis:
tokens sorted by D_t (highest first) into ``num_buckets`` equal-count buckets; per bucket its share of the total
divergence and its mean D_t (log scale in the figure), for r=0 and r=1 separately (paper: wrong responses
concentrate the mass on a few tokens, right ones are flat and low).

D_t is a float32 sum of KL terms and can come out a few 1e-7 below 0: values down to ``-roundoff_tolerance`` are
clamped to 0; a NaN, an infinity or anything lower is reported as corrupted scores.

The logger never changes the weights: everything runs under ``torch.no_grad()``, the global RNG is forked
(``torch.random.fork_rng``) and the train / eval mode of every module is restored. Every rank computes (sharded
models need all ranks in the forward); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Sequence

import lightning as L
import torch

from sdzero_pl.core.losses import gathered_logits, teacher_topk, token_logps, topk_divergence
from sdzero_pl.core.models import hidden_states, output_weight
from sdzero_pl.core.prompts import control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import build_distill_example, collate_distill, select_targets
from sdzero_pl.evaluation.localization import (
    Response, ResponseView, Scored, bucket_report, ranked, render_html, render_tensorboard_text
)
from sdzero_pl.evaluation.metrics import clamp_roundoff
from sdzero_pl.evaluation.plots import bucket_figure, require_matplotlib
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q)) if values else 0.0


@contextlib.contextmanager
def _frozen_state(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """No grad, forked RNG (the training stream is untouched), every module's train / eval mode restored."""
    modes = [(m, m.training) for m in module.modules()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, training in modes:
            m.training = training


def _teacher_side(model: torch.nn.Module, batch: dict, top_k: int, chunk_size: int):
    """The teacher's top-k (ids, logits) and log-probs of y's tokens, on the second copy of y."""
    hidden = hidden_states(model, batch["teacher_ids"], batch["teacher_attention_mask"])
    h, targets = select_targets(hidden, batch["teacher_ids"], batch["teacher_mask"])
    weight = output_weight(model)
    topk_ids, logits, _ = teacher_topk(h, weight, top_k, chunk_size)
    return topk_ids, logits, targets, token_logps(h, weight, targets, chunk_size)


def _student_side(model: torch.nn.Module, batch: dict, topk_ids: torch.Tensor, chunk_size: int):
    """The student's logits at the teacher's top-k ids and log-probs of y's tokens."""
    hidden = hidden_states(model, batch["student_ids"], batch["student_attention_mask"])
    h, targets = select_targets(hidden, batch["student_ids"], batch["student_mask"])
    weight = output_weight(model)
    return gathered_logits(h, weight, topk_ids, chunk_size), targets, token_logps(h, weight, targets, chunk_size)


def _compact(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


# ------------------------------------------------------------------------------------------------ callback
class SelfLocalizationLogger(L.Callback):
    """Logs where the reviser's divergence from the student sits, token by token, on a fixed set of responses."""

    def __init__(
        self,
        num_responses: int = 200,
        every_n_steps: int = 50,
        num_buckets: int = 20,
        per_response: bool = False,
        num_rendered: int = 20,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        at_start: bool = True,
        save_tokens: bool = True,
        dirname: str = "self_localization",
        roundoff_tolerance: float = 1e-4,
    ) -> None:
        """
        Args:
            num_responses: size of the fixed response set (paper: 200): the first N questions of the data module,
                one completion each, sampled once from the student.
            every_n_steps: score the set every N optimizer steps.
            num_buckets: D_t buckets of equal token count (paper: 20).
            per_response: bucket each response's tokens and average the shares over responses (each response
                weighs the same); default: pool all tokens of a reward class, as the paper describes.
            num_rendered: responses rendered in full on the page (the first of the ranking by largest D_t; the
                index lists all of them); TensorBoard gets the first 8 of them.
            max_new_tokens: longest sampled response; default the rollout backend's.
            batch_size: responses per scoring forward pass.
            seed: seed of the one-off sampling of the response set.
            at_start: also score at the start of training (before the first optimizer step).
            save_tokens: store every response's token ids and texts in data.json (large for long responses).
            dirname: sub-directory of the log directory that receives ``step_<N>/``.
            roundoff_tolerance: D_t values in [-tolerance, 0) are float round-off and become 0; lower ones raise.
        """
        for flag, value in (("num_responses", num_responses), ("every_n_steps", every_n_steps),
                            ("num_buckets", num_buckets), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"`SelfLocalizationLogger.{flag}` must be >= 1, got {value}")
        if num_rendered < 0:
            raise ValueError(f"`SelfLocalizationLogger.num_rendered` must be >= 0, got {num_rendered}")
        if roundoff_tolerance < 0:
            raise ValueError(f"`SelfLocalizationLogger.roundoff_tolerance` must be >= 0, got {roundoff_tolerance}")
        self.roundoff_tolerance = roundoff_tolerance
        self.num_responses, self.every_n_steps, self.num_buckets = num_responses, every_n_steps, num_buckets
        self.per_response, self.num_rendered, self.max_new_tokens = per_response, num_rendered, max_new_tokens
        self.batch_size, self.seed, self.at_start = batch_size, seed, at_start
        self.save_tokens, self.dirname = save_tokens, dirname
        self.responses: list[Response] | None = None
        self.skipped = 0  # sampled responses whose reference answer could not be parsed (no reward, left out)
        self._last_step = -1

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_matplotlib()  # fail now, not at the first write
        if not isinstance(pl_module, SelfDistillModule):
            raise TypeError(f"SelfLocalizationLogger needs a SelfDistillModule, got {type(pl_module).__name__}")
        if not isinstance(trainer.datamodule, OnPolicyDataModule):
            raise TypeError(
                f"SelfLocalizationLogger needs an OnPolicyDataModule, got {type(trainer.datamodule).__name__}"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start:  # the rollout backend is bound: Lightning built the first dataloader before this hook
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step != self._last_step and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: SelfDistillModule) -> None:
        """Score the fixed set now (sampling it first if needed) and write / log the results."""
        self._last_step = trainer.global_step
        with _frozen_state(pl_module, pl_module.device):
            pl_module.policy.eval()  # no dropout while scoring; _frozen_state restores the mode
            if self.responses is None:
                self.responses = self._sample(trainer.datamodule, pl_module)
            scored = self._score(trainer.datamodule, pl_module)
        log_dir = trainer.log_dir or trainer.default_root_dir  # on every rank: Trainer.log_dir is a broadcast
        if trainer.is_global_zero:
            self._write(trainer, pl_module, scored, log_dir)

    # ------------------------------------------------------------------------------------------- sampling
    def _sample(self, data: OnPolicyDataModule, pl_module: SelfDistillModule) -> list[Response]:
        tokenizer = pl_module.tokenizer
        questions = data.questions[: self.num_responses]
        prompts = encode_prompts(tokenizer, [data.source.text(q) for q in questions], data.source.system_prompt,
                                 data.source.chat_template_kwargs)
        rollouts = data.rollout.generate(prompts, seed=self.seed, desc="self-localization responses",
                                         max_new_tokens=self.max_new_tokens)
        texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
        rewards = data.reward(texts, [q.answer for q in questions]).rewards
        self.skipped = sum(r is None for r in rewards)
        return [Response(q.id, list(p), list(r.completion_ids), float(w), q.question, str(q.answer))
                for q, p, r, w in zip(questions, prompts, rollouts, rewards) if w is not None]

    # -------------------------------------------------------------------------------------------- scoring
    def _score(self, data: OnPolicyDataModule, pl_module: SelfDistillModule) -> list[Scored]:
        tokenizer = pl_module.tokenizer
        stops = stop_token_ids(tokenizer, pl_module.policy.generation_config.eos_token_id)
        controls = {r: tokenizer.encode(control_text(data.control.phrases, r), add_special_tokens=False) for r in (0.0, 1.0)}
        scored: list[Scored] = []
        for start in range(0, len(self.responses), self.batch_size):
            chunk = self.responses[start : start + self.batch_size]
            examples = [build_distill_example(r.prompt_ids, r.completion_ids, controls[1.0 if r.reward >= 0.5 else 0.0],
                                              stops, data.hparams.max_teacher_len) for r in chunk]
            batch = {k: v.to(pl_module.device) for k, v in collate_distill(examples, tokenizer.pad_token_id).items()}
            scored += self._score_batch(pl_module, batch, chunk, self.roundoff_tolerance)
        return scored

    @staticmethod
    def _score_batch(pl_module: SelfDistillModule, batch: dict, chunk: Sequence[Response],
                     tolerance: float) -> list[Scored]:
        """The training step's divergence (no grad), plus the full-vocab token KL reward, split per response. Each
        role is scored through ``pl_module.score``, so FSDP-sharded models are gathered as in training."""
        hp = pl_module.hparams
        topk_ids, teacher_logits, teacher_targets, teacher_logps = pl_module.score(
            "teacher", _teacher_side, batch, hp.top_k, hp.chunk_size)
        student_logits, student_targets, student_logps = pl_module.score(
            "policy", _student_side, batch, topk_ids, hp.chunk_size)
        assert torch.equal(student_targets, teacher_targets), "student y and the teacher's second copy differ"
        divergence = topk_divergence(student_logits, teacher_logits, hp.divergence, hp.forward_weight)["loss"]
        divergence = clamp_roundoff(divergence, tolerance)  # float32 KL terms: about -5e-7 is round-off
        token_reward = student_logps - teacher_logps  # (N,)
        counts = batch["student_mask"][:, 1:].sum(-1).tolist()
        pieces = zip(student_targets.split(counts), divergence.split(counts), token_reward.split(counts))
        return [Scored(r, ids.tolist(), _compact(d), _compact(t)) for r, (ids, d, t) in zip(chunk, pieces)]

    # -------------------------------------------------------------------------------------------- outputs
    def _write(self, trainer: L.Trainer, pl_module: SelfDistillModule, scored: list[Scored], log_dir: str) -> None:
        step, tokenizer = trainer.global_step, pl_module.tokenizer
        directory = os.path.join(log_dir, self.dirname, f"step_{step}")
        os.makedirs(directory, exist_ok=True)
        report = bucket_report(scored, self.num_buckets, self.per_response)
        with open(os.path.join(directory, "data.json"), "w", encoding="utf-8") as handle:
            json.dump(self._data(pl_module, scored, report, step), handle)
        values = [d for s in scored for d in s.divergence]
        views = [ResponseView(s.response.question_id, s.response.question, s.response.answer, s.response.reward,
                              [tokenizer.decode([i]) for i in s.target_ids], s.divergence,
                              len(s.target_ids) < len(s.response.completion_ids)) for s in scored if s.target_ids]
        page = render_html(views, _quantile(values, 0.99), f"Self-localization at step {step}", self.num_rendered)
        with open(os.path.join(directory, "responses.html"), "w", encoding="utf-8") as handle:
            handle.write(page)
        figure = bucket_figure({k: v["shares"] for k, v in report.items()}, f"D_t buckets, step {step}",
                               {k: v["means"] for k, v in report.items()})
        figure.savefig(os.path.join(directory, "buckets.png"), dpi=120)
        top = [(f"question {v.question_id}, r={v.reward:g}, max D_t {v.peak()[1]:.3g}", v.tokens, v.divergence)
               for v in ranked(views)[: min(self.num_rendered, 8)]]
        self._log(trainer, report, scored, figure, render_tensorboard_text(
            top, _quantile(values, 0.95), _quantile(values, 0.8)))

    def _data(self, pl_module: SelfDistillModule, scored: list[Scored], report: dict, step: int) -> dict:
        hp, tokenizer = pl_module.hparams, pl_module.tokenizer
        responses = []
        for s in scored:
            row = {"question_id": s.response.question_id, "reward": s.response.reward,
                   "divergence": s.divergence, "token_reward": s.token_reward}
            if self.save_tokens:
                row.update(token_ids=s.target_ids, tokens=[tokenizer.decode([i]) for i in s.target_ids])
            responses.append(row)
        return {"step": step, "divergence": hp.divergence, "forward_weight": hp.forward_weight, "top_k": hp.top_k,
                "num_buckets": self.num_buckets, "per_response": self.per_response,
                "skipped_responses": self.skipped, "buckets": report, "responses": responses}

    def _log(self, trainer: L.Trainer, report: dict, scored: list[Scored], figure: Any, text: str) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        step = trainer.global_step
        scalars = {f"self_localization/{name}_{key}": float(value) for key, row in report.items()
                   for name, value in (("top_bucket_share", (row["shares"] or [None])[0]),
                                       ("mean_divergence", row["mean_divergence"]),
                                       ("mean_token_reward", row["mean_token_reward"]),
                                       ("responses", row["responses"])) if value is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_figure("self_localization/buckets", figure, step, close=False)
            writer.add_text("self_localization/responses", text, step)
            for key, reward in (("r0", 0.0), ("r1", 1.0)):
                values = [d for s in scored if (s.response.reward >= 0.5) == (reward >= 0.5) for d in s.divergence]
                if values:
                    writer.add_histogram(f"self_localization/divergence_{key}", torch.tensor(values), step)
                shares = report[key]["shares"]
                if shares:
                    _add_share_histogram(writer, f"self_localization/bucket_shares_{key}", shares, step)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        rows = None if self.responses is None else [vars(r) for r in self.responses]
        return {"responses": rows, "skipped": self.skipped, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rows = state_dict["responses"]
        self.responses = None if rows is None else [Response(**row) for row in rows]
        self.skipped, self._last_step = state_dict["skipped"], state_dict["last_step"]


def _add_share_histogram(writer: Any, tag: str, shares: Sequence[float], step: int) -> None:
    """Bucket shares as a TensorBoard histogram: bucket i (0 = highest D_t) spans (i, i + 1], height = its share."""
    centres = [i + 0.5 for i in range(len(shares))]
    writer.add_histogram_raw(
        tag, min=0.0, max=float(len(shares)), num=1.0, sum=sum(c * s for c, s in zip(centres, shares)),
        sum_squares=sum(c * c * s for c, s in zip(centres, shares)),
        bucket_limits=[float(i + 1) for i in range(len(shares))], bucket_counts=list(shares), global_step=step,
    )
