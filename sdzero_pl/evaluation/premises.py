"""The premise each method of the comparison table rests on, measured (not typed in), and the rule that marks a row
whose premise fails (``python -m sdzero_pl.compare`` runs the measurements; docs/baselines.md, "Premises").

* SDFT / SDFT (final answer only): the teacher is the model itself with the demonstration (or the final answer) in
  its context; distilling towards it only helps if that teacher is better than the student. Measured on the base
  model (both methods' start and step-0 teacher): accuracy of one sample per question from the teacher's prompt
  (the prompt the data module builds, :func:`~sdzero_pl.phase2.onpolicy.teacher_question`) vs from the student's
  plain prompt, same questions, same sampler, scored by the training verifier. **Fails** when teacher accuracy <=
  student accuracy.
* SD-Zero: the reviser (the SRT model, Phase 2's teacher at step 0) must read the reward phrase P_r. Measured by the
  probe (:mod:`sdzero_pl.evaluation.probe`) on the SRT model: the reviser's accuracy after wrong answers with P_0
  ("start over") and with P_1 ("rephrase"), after right answers with P_1, and the teacher's mean per-token
  KL(true P_r || opposite P_r) on wrong vs right answers. **Fails** unless P_0's revision accuracy after wrong
  answers is above P_1's by a paired sign-flip test at p < 0.05 (each wrong answer is revised after both phrases;
  the differences are pooled over seeds): the phrase the reward picks must make better revisions than the other.
* The control (shuffled reward): its premise is to have none: it is SD-Zero's training with the signal removed;
  it shares SD-Zero's reviser (the same SRT model), whose probe it shows.
* RFT, GRPO: the base model solves some training questions (without any correct sample there is nothing to keep or
  no advantage); SRT: some revisions are verified correct. Both show in the budget files (kept samples / traces),
  and a run without any fails loudly (``min_samples`` / ``min_traces``), so they are stated, not re-measured.

Pure functions here turn measurements into the table's check (:func:`judge`); :func:`teacher_accuracy` samples.
"""

from __future__ import annotations

import math
from typing import Sequence

from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.prompts import encode_prompts, stop_token_ids
from sdzero_pl.data.questions import Question, QuestionSource
from sdzero_pl.evaluation.probe import probe, summarize
from sdzero_pl.evaluation.stats import format_p, sign_flip_test
from sdzero_pl.phase2.onpolicy import teacher_question
from sdzero_pl.rollout import HFRollout
from sdzero_pl.tasks import Verifier

STATED = {
    "base": "none (no training)",
    "rft": "the base model solves some training questions (stated: RFT keeps only its correct samples)",
    "grpo": "some rollout groups have mixed rewards (stated: otherwise every advantage is 0)",
    "srt": "some revisions are verified correct (stated: SRT trains only on them)",
}
RULES = {
    "sdft": "fails when the teacher's accuracy with the demonstration <= the student's",
    "sdft_answer": "fails when the teacher's accuracy with the final answer <= the student's",
    "sdzero": "fails unless the reviser's accuracy after wrong answers is higher with P_0 than with P_1, by a paired "
              "sign-flip test over those answers at p < 0.05 (the point estimates when no paired data)",
}
TEACHER_CONTEXT = {"sdft": "demonstration", "sdft_answer": "answer"}


def teacher_accuracy(model, tokenizer, questions: Sequence[Question], *, reward: Verifier, context: str,
                     template: str, instruction: str = "", system_prompt: str | None = None,
                     temperature: float = 0.7, max_new_tokens: int = 192, seed: int = 0) -> dict:
    """One sample per question from the student's prompt (``question + instruction``) and one from the SDFT
    teacher's (``context`` "demonstration" | "answer", ``template`` as the data module's); the share of each that
    ``reward`` accepts, over the questions whose reference is usable."""
    stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
    rollout = HFRollout(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=64, show_progress=False)
    rollout.setup(model, tokenizer, stops)
    answers = [q.answer for q in questions]
    texts = {"student": [q.question + instruction for q in questions],
             "teacher": [teacher_question(q, instruction, context, template) for q in questions]}
    rewards = {}
    for offset, (role, users) in enumerate(texts.items()):
        samples = rollout.generate(encode_prompts(tokenizer, users, system_prompt), seed=seed + offset,
                                   desc=f"premise: {role} samples")
        rewards[role] = reward([tokenizer.decode(s.completion_ids, skip_special_tokens=True) for s in samples],
                               answers).rewards
    usable = [i for i in range(len(questions)) if rewards["student"][i] is not None
              and rewards["teacher"][i] is not None]
    return {"questions": len(usable), "context": context,
            **{f"{role}_acc": _share([rewards[role][i] >= 0.5 for i in usable]) for role in rewards}}


def probe_check(report: dict) -> dict:
    """The numbers of SD-Zero's premise from a probe report (:func:`sdzero_pl.evaluation.probe.summarize`)."""
    r0, r1 = report["r0"], report["r1"]
    return {"wrong": r0["responses"], "right": r1["responses"],
            "wrong_acc_P0": r0["revised_acc_after_P0"], "wrong_acc_P1": r0["revised_acc_after_P1"],
            "right_acc_P1": r1["revised_acc_after_P1"], "right_acc_P0": r1["revised_acc_after_P0"],
            "kl_wrong": r0["control_kl_mean"], "kl_right": r1["control_kl_mean"]}


def mean_over_seeds(measured: Sequence[dict]) -> dict:
    """Each numeric field averaged over the seeds that have it (None where none has); counts are summed; the
    per-answer differences ``wrong_diffs`` are pooled over seeds into one paired sign-flip test (``paired_p``)."""
    out = {}
    if any("wrong_diffs" in m for m in measured):
        pooled = [d for m in measured for d in m.get("wrong_diffs", [])]
        out["paired_p"] = sign_flip_test(pooled) if pooled else None
    for key in (k for k in measured[0] if k != "wrong_diffs"):
        values = [m[key] for m in measured if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
        if key in ("questions", "wrong", "right"):
            out[key] = sum(values)
        elif values:
            out[key] = sum(values) / len(values)
        else:
            out[key] = measured[0][key] if all(m.get(key) == measured[0][key] for m in measured) else None
    return out


def judge(method: str, measured: dict | None) -> dict:
    """``{"holds": True | False | None, "check": text, "rule": text}`` for one row; ``measured``: the seed mean of
    :func:`teacher_accuracy` (SDFT rows) or :func:`probe_check` (SD-Zero and the control), None when not
    measured. ``holds`` None: nothing to fail (stated premise, the control) or not measured."""
    if method in STATED:
        return {"holds": None, "check": STATED[method], "rule": "stated"}
    if measured is None:
        return {"holds": None, "check": "not measured (--no-premises, or a suite without a validation split)",
                "rule": RULES.get(method, "none")}
    if method in TEACHER_CONTEXT:
        teacher, student = measured["teacher_acc"], measured["student_acc"]
        holds = None if teacher is None or student is None else teacher > student
        what = "demonstration" if method == "sdft" else "final answer"
        return {"holds": holds, "rule": RULES[method],
                "check": f"teacher with the {what} {_pct(teacher)}% vs student {_pct(student)}% "
                         f"({measured['questions']} questions)"}
    p0, p1 = measured["wrong_acc_P0"], measured["wrong_acc_P1"]
    paired = "" if measured.get("paired_p") is None else f", paired sign-flip p = {format_p(measured['paired_p'])}"
    check = (f"reviser after wrong answers: P_0 {_pct(p0)}% vs P_1 {_pct(p1)}% ({measured['wrong']} answers{paired}); "
             f"after right answers: P_1 {_pct(measured['right_acc_P1'])}%; teacher KL(true P_r || opposite P_r) "
             f"per token: wrong {_num(measured['kl_wrong'])} vs right {_num(measured['kl_right'])}")
    if method == "control":
        return {"holds": None, "rule": "none (the control removes the signal on purpose)",
                "check": f"none (a control); its reviser is SD-Zero's: {check}"}
    paired_p = measured.get("paired_p")
    holds = None if p0 is None or p1 is None else p0 > p1 and (paired_p is None or paired_p < 0.05)
    return {"holds": holds, "rule": RULES["sdzero"], "check": check}


def mark(label: str, verdict: dict | None) -> str:
    """The table's method cell: a row whose premise fails says so."""
    return f"{label} (premise fails)" if verdict and verdict["holds"] is False else label


def premise_cell(verdict: dict | None) -> str:
    if verdict is None:
        return "n/a"
    if verdict["holds"] is False:
        return f"**premise fails** ({verdict['rule']}): {verdict['check']}"
    return f"holds: {verdict['check']}" if verdict["holds"] else verdict["check"]


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# ------------------------------------------------------------------------------------------------ measuring
def measure(kind: str, model_dir: str, questions_path: str, *, reward: Verifier, n: int, seed: int,
            instruction: str = "", system_prompt: str | None = None, template: str = "", phrases: dict | None = None,
            temperature: float = 0.7, max_new_tokens: int = 192) -> dict:
    """One premise measurement on the first ``n`` questions of ``questions_path`` (a JSONL file with ``id``,
    ``problem`` / ``question``, ``answer`` and, for the reviser probe's step verifier, ``solution``).

    ``kind``: "demonstration" | "answer" (SDFT's teacher vs student, :func:`teacher_accuracy`) or "reviser" (the
    probe, :func:`probe_check`; also returns the probe's whole report under ``"probe"``)."""
    source = QuestionSource(questions_path, id_field="id", solution_field="solution", num_questions=n)
    questions = source.select(reward.load_questions(source), seed)
    model, tokenizer = load_model(model_dir, "float32"), load_tokenizer(model_dir)
    if kind in ("demonstration", "answer"):
        return teacher_accuracy(model, tokenizer, questions, reward=reward, context=kind, template=template,
                                instruction=instruction, system_prompt=system_prompt, temperature=temperature,
                                max_new_tokens=max_new_tokens, seed=seed)
    if kind != "reviser":
        raise ValueError(f"premise kind must be demonstration | answer | reviser, got {kind!r}")
    probed = probe(model, tokenizer, questions, reward=reward, phrases=phrases, instruction=instruction,
                   system_prompt=system_prompt, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return {**probe_check(summarize(probed)), "wrong_diffs": wrong_diffs(probed), "probe": summarize(probed)}


def wrong_diffs(probed) -> list[float]:
    """Per wrong answer revised after both phrases: reward after P_0 minus after P_1 (the paired test's input)."""
    return [p.revision_rewards["0"] - p.revision_rewards["1"] for p in probed
            if p.reward < 0.5 and p.revision_rewards.get("0") is not None and p.revision_rewards.get("1") is not None]
