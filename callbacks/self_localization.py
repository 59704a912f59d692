"""Token-level self-localization logger (docs/method.md, "Analyses"; the paper's bucket analysis of Phase 2).

On a FIXED set of responses (default 200, sampled once from the student with a fixed seed the first time the
logger runs), every ``every_n_steps`` optimizer steps it scores each response with the CURRENT student and teacher:

* D_t: the per-token divergence of the training loss (same top-k, same ``divergence`` / ``forward_weight``);
* the token KL reward ``log p_student(y_t | x, y_<t) - log p_teacher(y_t | x, y, P_r, y_<t)`` (full vocabulary,
  computed per chunk of tokens, never as [batch, seq, vocab]).

It writes, under ``<log_dir>/self_localization/step_<N>/``: ``data.json`` (every number), ``responses.html`` (a few
responses with each token shaded by its D_t) and ``buckets.png``; with a TensorBoard logger it also logs the
bucket figure, histograms of D_t and of the bucket shares, the rendered responses as text and a few scalars.
Bucket analysis: tokens sorted by D_t (highest first) into ``num_buckets`` equal-count buckets, each bucket's
share of the total divergence, for r=0 and r=1 separately (paper: wrong responses concentrate the mass on a few
tokens, right ones are flat and low).

The logger never changes the weights: everything runs under ``torch.no_grad()``, the global RNG is forked
(``torch.random.fork_rng``) and the train / eval mode of every module is restored. Every rank computes (sharded
models need all ranks in the forward); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import lightning as L
import torch

from sdzero_pl.core.losses import gathered_logits, teacher_topk, token_logps, topk_divergence
from sdzero_pl.core.models import hidden_states, output_weight
from sdzero_pl.core.prompts import control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import build_distill_example, collate_distill, select_targets
from sdzero_pl.evaluation.metrics import bucket_shares, mean_bucket_shares
from sdzero_pl.evaluation.plots import bucket_figure, require_matplotlib
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule


@dataclass
class Response:
    question_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float


@dataclass
class Scored:
    response: Response
    target_ids: list[int]  # y's tokens scored (after any length-budget truncation)
    divergence: list[float]  # D_t
    token_reward: list[float]  # log p_student(y_t) - log p_teacher(y_t)


# ------------------------------------------------------------------------------------------ pure functions
def bucket_report(scored: Sequence[Scored], num_buckets: int, per_response: bool) -> dict[str, dict[str, Any]]:
    """Bucket shares and summary numbers for r=0 ("r0") and r=1 ("r1"); a class with no tokens gets no shares."""
    report = {}
    for key, reward in (("r0", 0.0), ("r1", 1.0)):
        rows = [s for s in scored if (s.response.reward >= 0.5) == (reward >= 0.5) and s.divergence]
        values = [d for s in rows for d in s.divergence]
        long_enough = [s.divergence for s in rows if len(s.divergence) >= num_buckets]
        if per_response:  # responses shorter than num_buckets are left out (see mean_bucket_shares)
            shares = mean_bucket_shares(long_enough, num_buckets) if long_enough else None
        else:
            shares = bucket_shares(values, num_buckets) if values else None
        report[key] = {
            "responses": len(rows),
            "tokens": len(values),
            "shares": shares,
            "mean_divergence": sum(values) / len(values) if values else None,
            "mean_token_reward": (sum(t for s in rows for t in s.token_reward) / len(values)) if values else None,
        }
    return report


def _shade(value: float, vmax: float) -> float:
    return 0.0 if vmax <= 0 else max(0.0, min(1.0, value / vmax))


def render_html(items: Sequence[tuple[str, Sequence[str], Sequence[float]]], vmax: float, title: str) -> str:
    """A standalone HTML page: each (heading, tokens, D_t) item as text with every token shaded by D_t / vmax.

    Model text is escaped (``html.escape``): a response holding ``<script>`` shows it, never runs it.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        ".y{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.5em}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>Token background: red intensity = D_t / {vmax:.4g} (clipped at 1). Hover a token for its value.</p>",
    ]
    for heading, tokens, values in items:
        spans = "".join(
            f"<span style='background:rgba(220,38,38,{_shade(v, vmax):.3f})' title='D_t={v:.4g}'>"
            f"{html.escape(tok, quote=True)}</span>"
            for tok, v in zip(tokens, values)
        )
        parts.append(f"<h3>{html.escape(heading)}</h3><div class='y'>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_tensorboard_text(items: Sequence[tuple[str, Sequence[str], Sequence[float]]], strong: float,
                            emphasis: float) -> str:
    """TensorBoard's text plugin strips colours, so high-D_t tokens are marked instead: bold above ``strong``,
    italic above ``emphasis``. Model text is escaped; newlines become ``<br>``."""
    parts = [f"<p>Bold: D_t &ge; {strong:.4g}; italic: D_t &ge; {emphasis:.4g}.</p>"]
    for heading, tokens, values in items:
        out = []
        for tok, v in zip(tokens, values):
            text = html.escape(tok, quote=True).replace("\n", "<br>")
            out.append(f"<strong>{text}</strong>" if v >= strong else f"<em>{text}</em>" if v >= emphasis else text)
        parts.append(f"<h4>{html.escape(heading)}</h4><p>{''.join(out)}</p>")
    return "\n".join(parts)


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
        num_rendered: int = 4,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        at_start: bool = True,
        save_tokens: bool = True,
        dirname: str = "self_localization",
    ) -> None:
        """
        Args:
            num_responses: size of the fixed response set (paper: 200): the first N questions of the data module,
                one completion each, sampled once from the student.
            every_n_steps: score the set every N optimizer steps.
            num_buckets: D_t buckets of equal token count (paper: 20).
            per_response: bucket each response's tokens and average the shares over responses (each response
                weighs the same); default: pool all tokens of a reward class, as the paper describes.
            num_rendered: responses rendered with their tokens shaded by D_t (half r=0, half r=1 where possible).
            max_new_tokens: longest sampled response; default the rollout backend's.
            batch_size: responses per scoring forward pass.
            seed: seed of the one-off sampling of the response set.
            at_start: also score at the start of training (before the first optimizer step).
            save_tokens: store every response's token ids and texts in data.json (large for long responses).
            dirname: sub-directory of the log directory that receives ``step_<N>/``.
        """
        for flag, value in (("num_responses", num_responses), ("every_n_steps", every_n_steps),
                            ("num_buckets", num_buckets), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"`SelfLocalizationLogger.{flag}` must be >= 1, got {value}")
        if num_rendered < 0:
            raise ValueError(f"`SelfLocalizationLogger.num_rendered` must be >= 0, got {num_rendered}")
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
        return [Response(q.id, list(p), list(r.completion_ids), float(w))
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
            scored += self._score_batch(pl_module, batch, chunk)
        return scored

    @staticmethod
    def _score_batch(pl_module: SelfDistillModule, batch: dict, chunk: Sequence[Response]) -> list[Scored]:
        """The training step's divergence (no grad), plus the full-vocab token KL reward, split per response. Each
        role is scored through ``pl_module.score``, so FSDP-sharded models are gathered as in training."""
        hp = pl_module.hparams
        topk_ids, teacher_logits, teacher_targets, teacher_logps = pl_module.score(
            "teacher", _teacher_side, batch, hp.top_k, hp.chunk_size)
        student_logits, student_targets, student_logps = pl_module.score(
            "policy", _student_side, batch, topk_ids, hp.chunk_size)
        assert torch.equal(student_targets, teacher_targets), "student y and the teacher's second copy differ"
        divergence = topk_divergence(student_logits, teacher_logits, hp.divergence, hp.forward_weight)["loss"]
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
        rendered = [(f"question {s.response.question_id}, r={s.response.reward:g}, {len(s.target_ids)} tokens",
                     [tokenizer.decode([i]) for i in s.target_ids], s.divergence) for s in self._pick(scored)]
        page = render_html(rendered, _quantile(values, 0.99), f"Self-localization at step {step}")
        with open(os.path.join(directory, "responses.html"), "w", encoding="utf-8") as handle:
            handle.write(page)
        figure = bucket_figure({k: v["shares"] for k, v in report.items()}, f"D_t buckets, step {step}")
        figure.savefig(os.path.join(directory, "buckets.png"), dpi=120)
        self._log(trainer, report, scored, figure, render_tensorboard_text(
            rendered, _quantile(values, 0.95), _quantile(values, 0.8)))

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

    def _pick(self, scored: list[Scored]) -> list[Scored]:
        """Up to ``num_rendered`` responses, alternating r=0 and r=1 while both are available."""
        wrong = [s for s in scored if s.response.reward < 0.5 and s.target_ids]
        right = [s for s in scored if s.response.reward >= 0.5 and s.target_ids]
        picked = []
        while len(picked) < self.num_rendered and (wrong or right):
            for pool in (wrong, right):
                if pool and len(picked) < self.num_rendered:
                    picked.append(pool.pop(0))
        return picked

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
