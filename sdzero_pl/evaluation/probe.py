"""Does my reviser read the reward? A probe of a model before Phase 2 (docs/method.md, "Analyses").

    python -m sdzero_pl.evaluation.probe MODEL QUESTIONS [--n 200] [--reward arithmetic] [--out DIR]

SD-Zero's Phase 2 only turns the binary reward into token-level supervision if the reviser (the SRT model, which is
Phase 2's frozen teacher at step 0) reads the control phrase P_r: after a wrong answer, "not correct, start over"
must change its next-token distributions where the answer is wrong, and make its revisions better. This probe
samples one answer y per question from MODEL and measures, by reward r:

- the teacher's per-token KL between the TRUE and the OPPOSITE phrase, ``KL(p(. | x, y, P_r, y_<t) ||
  p(. | x, y, P_(1-r), y_<t))`` over the full vocabulary: its mean, and where it concentrates (share of the total in
  the top 5% of tokens, the paper's bucket analysis);
- the training divergence D_t between the student ``p(. | x, y_<t)`` and the teacher with the true phrase (Phase 2's
  per-token loss at step 0, same top-k and divergence as training);
- the reviser's accuracy after each phrase, ``chat(x) + y' + P + revision`` for P = P_1 and P = P_0;
- when the task's verifier can locate errors (:class:`~sdzero_pl.tasks.StepVerifier`, the demo's arithmetic task;
  load the questions with ``--solution-field solution``): how often the largest-D_t token, and the largest-KL
  token, of a wrong answer is its first wrong token, against the student's own surprise at its sampled tokens
  (the token with the lowest ``log p(y_t | x, y_<t)``) as the baseline any localizer must beat.

It writes ``probe.json`` (every number and every response) and ``probe.md`` (the summary) to ``--out`` and prints
the summary. One model, no training; CPU is fine for small models.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from sdzero_pl.core.losses import check_divergence, topk_divergence
from sdzero_pl.core.models import hidden_states, load_model, load_tokenizer, output_weight
from sdzero_pl.core.prompts import ControlPhrases, control_text, encode_prompts, stop_token_ids
from sdzero_pl.core.sequences import build_distill_example, collate_distill, select_targets, strip_stop
from sdzero_pl.data.questions import Question, QuestionSource
from sdzero_pl.evaluation.metrics import bucket_shares
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import ArithmeticReward, MathReward, StepVerifier, Verifier

REWARDS = {"math": MathReward, "arithmetic": ArithmeticReward}
NO_BUDGET = 1 << 30  # the probe scores whole sequences: no teacher length budget


@dataclass
class Probed:
    question_id: str
    reward: float
    token_ids: list[int]
    divergence: list[float]  # D_t, student vs teacher with the true P_r
    control_kl: list[float]  # KL(teacher with the true P_r || teacher with the opposite one)
    surprise: list[float]  # -log p_student(y_t | x, y_<t)
    revision_rewards: dict[str, float | None] = field(default_factory=dict)  # "1" / "0": after P_1 / after P_0
    first_error: int | None = None  # token index of the first wrong token (a step verifier's answer)


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_tokens(model, batch: dict, top_k: int, divergence: str, forward_weight: float, chunk_size: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per y token: D_t (student vs teacher with the true phrase), the teacher's KL between the true and the opposite
    phrase, and the student's surprise. ``batch``: the student sequences plus ``teacher_*`` (true phrase) and
    ``opposite_*`` (opposite phrase) sequences. -> three (N,) tensors, flattened in (row, position) order."""
    weight = output_weight(model)
    sides = {}
    for role in ("student", "teacher", "opposite"):
        hidden = hidden_states(model, batch[f"{role}_ids"], batch[f"{role}_attention_mask"])
        sides[role] = select_targets(hidden, batch[f"{role}_ids"], batch[f"{role}_mask"])  # (N, H), (N,)
    targets = sides["student"][1]
    assert all(torch.equal(targets, sides[r][1]) for r in ("teacher", "opposite")), "the copies of y differ"
    out = ([], [], [])
    for start in range(0, targets.shape[0], chunk_size):
        piece = slice(start, start + chunk_size)
        logits = {r: F.linear(sides[r][0][piece], weight).double() for r in sides}  # (n, V) each, one chunk
        top = logits["teacher"].topk(top_k, dim=-1).indices  # (n, k)
        d = topk_divergence(logits["student"].gather(-1, top), logits["teacher"].gather(-1, top), divergence,
                            forward_weight)["loss"]
        true, opposite = logits["teacher"].log_softmax(-1), logits["opposite"].log_softmax(-1)
        kl = (true.exp() * (true - opposite)).sum(-1).clamp(min=0.0)  # round-off below 0 is noise
        surprise = -logits["student"].log_softmax(-1).gather(-1, targets[piece, None]).squeeze(-1)
        for values, new in zip(out, (d, kl, surprise)):
            values.append(new.float().cpu())
    return tuple(torch.cat(v) if v else torch.zeros(0) for v in out)


def token_of_char(tokenizer, token_ids: Sequence[int], char_index: int) -> int:
    """The index of the token of ``token_ids`` whose decoded text holds character ``char_index`` of the decoded
    completion (per-token decoding, cumulative lengths)."""
    end = 0
    for t, token in enumerate(token_ids):
        end += len(tokenizer.decode([token], skip_special_tokens=True))
        if end > char_index:
            return t
    return len(token_ids) - 1


def rank_of(values: Sequence[float], index: int) -> int:
    """1-based rank of ``values[index]`` from the largest (ties counted in its favour)."""
    return 1 + sum(v > values[index] for v in values)


# ------------------------------------------------------------------------------------------------ summary
def summarize(probed: Sequence[Probed], num_buckets: int = 20) -> dict:
    """The report's numbers, by reward (``r0`` wrong answers, ``r1`` right ones) and for error localization."""
    report: dict = {"responses": len(probed)}
    for key, right in (("r0", False), ("r1", True)):
        rows = [p for p in probed if (p.reward >= 0.5) == right]
        kl = [v for p in rows for v in p.control_kl]
        d = [v for p in rows for v in p.divergence]
        after = {phrase: [p.revision_rewards[phrase] for p in rows if p.revision_rewards.get(phrase) is not None]
                 for phrase in ("1", "0")}
        report[key] = {
            "responses": len(rows), "tokens": len(kl),
            "control_kl_mean": _mean(kl), "divergence_mean": _mean(d),
            "control_kl_top_share": bucket_shares(kl, num_buckets)[0] if kl and sum(kl) > 0 else None,
            "divergence_top_share": bucket_shares(d, num_buckets)[0] if d and sum(d) > 0 else None,
            "revised_acc_after_P1": _mean(after["1"]), "revised_acc_after_P0": _mean(after["0"]),
        }
    located = [p for p in probed if p.reward < 0.5 and p.first_error is not None and p.divergence]
    report["localization"] = {"wrong_with_located_error": len(located)}
    for name, attribute in (("divergence", "divergence"), ("control_kl", "control_kl"), ("surprise", "surprise")):
        ranks = [rank_of(getattr(p, attribute), p.first_error) for p in located]
        report["localization"][name] = {"hit@1": _mean([r == 1 for r in ranks]), "hit@3": _mean([r <= 3 for r in ranks]),
                                        "mean_rank": _mean(ranks)}
    return report


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def markdown(report: dict, settings: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    def num(value):
        return "n/a" if value is None else f"{value:.4g}"

    lines = [f"# Reviser probe: {settings['model']}", "",
             f"{report['responses']} responses to {settings['questions']} (temperature {settings['temperature']}, "
             f"seed {settings['seed']}); control phrases: {settings['control']}.", "",
             "| | wrong answers (r=0) | right answers (r=1) |", "|---|---|---|"]
    r0, r1 = report["r0"], report["r1"]
    for label, key, fmt in (("responses", "responses", str), ("teacher KL(true P_r || opposite P_r), mean per token",
                            "control_kl_mean", num), ("... share of it in the top 5% of tokens", "control_kl_top_share",
                            pct), ("D_t student vs teacher (training loss at step 0), mean", "divergence_mean", num),
                            ("... share of it in the top 5% of tokens", "divergence_top_share", pct),
                            ("revision accuracy after P_1 (rephrase), %", "revised_acc_after_P1", pct),
                            ("revision accuracy after P_0 (start over), %", "revised_acc_after_P0", pct)):
        lines.append(f"| {label} | {fmt(r0[key])} | {fmt(r1[key])} |")
    loc = report["localization"]
    lines += ["", f"Error localization on {loc['wrong_with_located_error']} wrong answers with a located first error "
              "(hit@k: the first wrong token is among the k tokens with the largest score):", "",
              "| score | hit@1 | hit@3 | mean rank |", "|---|---|---|---|"]
    for name, label in (("divergence", "D_t (Phase 2's loss)"), ("control_kl", "teacher KL between the phrases"),
                        ("surprise", "student's own surprise (baseline)")):
        row = loc.get(name, {})
        lines.append(f"| {label} | {pct(row.get('hit@1'))} | {pct(row.get('hit@3'))} | {num(row.get('mean_rank'))} |")
    lines += ["", "Reading it: the reviser reads the reward when, after a wrong answer, P_0 gives better revisions than "
              "P_1 and the KL between the phrases is larger on wrong answers than on right ones; Phase 2 can localize "
              "errors when D_t finds the first wrong token more often than the student's own surprise does."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the probe
def probe(model, tokenizer, questions: Sequence[Question], *, reward: Verifier, phrases: dict[int, str],
          instruction: str = "", system_prompt: str | None = None, temperature: float = 0.7,
          max_new_tokens: int = 256, top_k: int = 64, divergence: str = "mixed", forward_weight: float = 0.5,
          batch_size: int = 16, seed: int = 0) -> list[Probed]:
    """Sample, verify, revise with both phrases and score every answer (see the module docstring)."""
    check_divergence(divergence, forward_weight)
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    rollout = HFRollout(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=64, show_progress=False)
    rollout.setup(model, tokenizer, stops)
    prompts = encode_prompts(tokenizer, [q.question + instruction for q in questions], system_prompt)
    answers = [q.answer for q in questions]
    samples = rollout.generate(prompts, seed=seed, desc="probe answers")
    texts = [tokenizer.decode(s.completion_ids, skip_special_tokens=True) for s in samples]
    rewards = reward(texts, answers).rewards
    controls = {r: tokenizer.encode(control_text(phrases, r), add_special_tokens=False) for r in (0, 1)}
    revised = {}
    for phrase in (1, 0):  # every answer revised after both phrases, whatever its reward
        contexts = [list(p) + strip_stop(s.completion_ids, stops) + controls[phrase] for p, s in zip(prompts, samples)]
        revisions = rollout.generate(contexts, seed=seed + 1 + phrase, desc=f"probe revisions after P_{phrase}")
        revised[str(phrase)] = reward([tokenizer.decode(r.completion_ids, skip_special_tokens=True)
                                       for r in revisions], answers).rewards
    kept = [i for i, r in enumerate(rewards) if r is not None]  # an unusable reference: left out
    probed: list[Probed] = []
    model.eval()
    for start in range(0, len(kept), batch_size):
        rows = kept[start : start + batch_size]
        batch = _batch(prompts, samples, rewards, controls, stops, rows, tokenizer.pad_token_id)
        d, kl, surprise = score_tokens(model, batch, top_k, divergence, forward_weight)
        counts = batch["student_mask"][:, 1:].sum(-1).tolist()
        for i, d_i, kl_i, s_i in zip(rows, d.split(counts), kl.split(counts), surprise.split(counts)):
            ids = list(samples[i].completion_ids)
            error = None
            if rewards[i] < 0.5 and isinstance(reward, StepVerifier) and ids:
                char = reward.first_error(texts[i], questions[i])
                error = None if char is None else token_of_char(tokenizer, ids, char)
            probed.append(Probed(questions[i].id, float(rewards[i]), ids, d_i.tolist(), kl_i.tolist(), s_i.tolist(),
                                 {k: v[i] for k, v in revised.items()}, error))
    return probed


def _batch(prompts, samples, rewards, controls, stops, rows, pad_id) -> dict:
    true = [build_distill_example(prompts[i], samples[i].completion_ids, controls[int(rewards[i] >= 0.5)], stops,
                                  NO_BUDGET) for i in rows]
    opposite = [build_distill_example(prompts[i], samples[i].completion_ids, controls[int(rewards[i] < 0.5)], stops,
                                      NO_BUDGET) for i in rows]
    batch = collate_distill(true, pad_id)
    other = collate_distill(opposite, pad_id)
    batch.update({key.replace("teacher", "opposite"): value for key, value in other.items() if key.startswith("teacher")})
    return batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdzero_pl.evaluation.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="HF model directory or hub id (normally the Phase-1 SRT export)")
    parser.add_argument("questions", help="questions: a local .json / .jsonl / .parquet file or a hub dataset")
    parser.add_argument("--n", type=int, default=200, help="questions probed (the first N; paper: 200 responses)")
    parser.add_argument("--reward", choices=tuple(REWARDS), default="math",
                        help="verifier; 'arithmetic' (the demo's task) also locates the first error")
    parser.add_argument("--id-field", default=None, help="id column (default: the row number)")
    parser.add_argument("--solution-field", default=None,
                        help="reference-solution column (the arithmetic task's step verifier needs 'solution')")
    parser.add_argument("--instruction", default="", help="text appended to every question (as in training)")
    parser.add_argument("--system-prompt", default=None, help="system message (as in training)")
    parser.add_argument("--control-preset", default="paper", help="control phrases: paper | qwen | olmo")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64, help="teacher top-k of D_t (as in training)")
    parser.add_argument("--divergence", default="mixed", help="D_t's divergence: reverse | forward | mixed")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("runs/probe"), help="where probe.json / probe.md go")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit(f"`--n` must be >= 1, got {args.n}")
    torch.set_num_threads(args.threads)
    reward = REWARDS[args.reward]()
    source = QuestionSource(args.questions, id_field=args.id_field, solution_field=args.solution_field,
                            instruction=args.instruction, system_prompt=args.system_prompt, num_questions=args.n)
    questions = source.select(reward.load_questions(source), args.seed)
    control = ControlPhrases(args.control_preset)
    try:
        probed = probe(load_model(args.model, args.dtype), load_tokenizer(args.model), questions, reward=reward,
                       phrases=control.phrases, instruction=args.instruction, system_prompt=args.system_prompt,
                       temperature=args.temperature, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                       divergence=args.divergence, seed=args.seed)
    finally:
        reward.close()
    report = summarize(probed)
    settings = {"model": args.model, "questions": source.name, "n": len(questions), "reward": args.reward,
                "temperature": args.temperature, "seed": args.seed, "top_k": args.top_k, "divergence": args.divergence,
                "control": args.control_preset}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps({"settings": settings, "report": report,
                                                     "responses": [asdict(p) for p in probed]}) + "\n")
    text = markdown(report, settings)
    (args.out / "probe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
