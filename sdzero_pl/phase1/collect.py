"""Phase 1 data: self-revision traces sampled from the base model itself (docs/method.md, "Phase 1", data collection 1-4).

For each of the first N1 questions: sample ``inits_per_question`` initial answers (paper: 1), verify them, pick
the control phrase P_r by the reward, sample ``revisions_per_init`` revisions (paper: 3) from the reviser context
``chat(x) + init + "\\n\\n" + P_r + "\\n\\n"`` (the SAME assistant turn; the init's end-of-turn token stripped;
the delimiter tokenized on its own and concatenated as ids, as in Phase 2), verify the revisions and keep the
traces whose revision is correct. Both branches (r=1 "rephrase", r=0 "start over") are on by default, as in the
paper; the reference code revises wrong inits only (``revise_correct=False``). No reference answer is ever shown.

Nothing is lost: questions go through the rollout backend in chunks of ``questions_per_chunk``, written to a
resumable JSONL collection (:mod:`sdzero_pl.data.records`: header, chunk lines, kill -9 safe, a resumed run writes
the same file). Per chunk: a ``trace`` line per kept trace (question id and row, prompt = chat(x) as text, init,
init reward, control, revision, revision reward, token counts), then one ``question`` line per processed question
(so a question with no kept trace is not redone). ``finished`` comes after every question, or once
``target_traces`` are kept. The reference code's cleaning (:mod:`sdzero_pl.phase1.clean`) is applied when traces
are loaded for training, so the file keeps what the model actually produced.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.prompts import control_text, render_prompt
from sdzero_pl.core.sequences import strip_stop
from sdzero_pl.data.questions import DataError, Question
from sdzero_pl.data.records import TraceFile, chunk_seed, collection_settings, read_trace_file, run_collection
from sdzero_pl.rollout import Rollout, RolloutBackend
from sdzero_pl.tasks import RewardBatch, Verifier

log = logging.getLogger(__name__)

TRACE_FIELDS = ("prompt", "init", "control", "revision")  # what training needs from every trace


# ----------------------------------------------------------------------------------------------- the collector
TOTALS = ("questions", "init_generations", "init_tokens", "init_correct", "revision_generations", "revision_tokens",
          "revisions_correct", "kept", "unverifiable", "verify_timeouts")


class TraceCollector:
    """Samples, verifies and writes self-revision traces (a :class:`~sdzero_pl.data.records.ChunkCollector`: run it
    with :func:`~sdzero_pl.data.records.run_collection`); see the module docstring for what it writes."""

    method, totals, desc = "srt", TOTALS, "SRT traces"

    def __init__(self, rollout: RolloutBackend, reward: Verifier, *, phrases: dict[int, str], instruction: str = "",
                 system_prompt: str | None = None, inits_per_question: int = 1, revisions_per_init: int = 3,
                 revise_correct: bool = True, revise_wrong: bool = True, keep_incorrect: bool = False,
                 target_traces: int | None = None, questions_per_chunk: int = 64, seed: int = 0,
                 template_kwargs: dict | None = None) -> None:
        if not (revise_correct or revise_wrong):
            raise ValueError("`revise_correct` and `revise_wrong` are both off: no revision would be sampled")
        for flag, value in (("inits_per_question", inits_per_question), ("revisions_per_init", revisions_per_init),
                            ("questions_per_chunk", questions_per_chunk)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        if target_traces is not None and target_traces < 1:
            raise ValueError(f"`--data.target_traces` must be >= 1 or null, got {target_traces}")
        self.rollout, self.reward, self.phrases = rollout, reward, phrases
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.stop_ids: list[int] = []
        self.instruction, self.system_prompt, self.template_kwargs = instruction, system_prompt, template_kwargs
        self.inits, self.revisions = inits_per_question, revisions_per_init
        self.branches = {1: revise_correct, 0: revise_wrong}
        self.keep_incorrect, self.target_traces = keep_incorrect, target_traces
        self.chunk_size, self.seed = questions_per_chunk, seed

    def bind(self, tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> TraceCollector:
        """The model's tokenizer and end-of-turn ids; needed before the first chunk."""
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)
        return self

    # ------------------------------------------------------------------------ what run_collection asks for
    def run(self, path: str | os.PathLike, questions: Sequence[Question], **kwargs) -> TraceFile:
        """:func:`~sdzero_pl.data.records.run_collection` with this collector (same keyword arguments)."""
        return run_collection(path, self, questions, **kwargs)

    def settings(self, questions: Sequence[Question], extra: dict | None) -> dict:
        return collection_settings(
            questions, self.rollout, self.reward, self.chunk_size, self.seed, inits_per_question=self.inits,
            revisions_per_init=self.revisions, revise_correct=self.branches[1], revise_wrong=self.branches[0],
            keep_incorrect=self.keep_incorrect, target_traces=self.target_traces,
            control={"1": self.phrases[1], "0": self.phrases[0]}, instruction=self.instruction,
            system_prompt=self.system_prompt,
            **({"chat_template_kwargs": self.template_kwargs} if self.template_kwargs else {}), **(extra or {}))

    def stop_reason(self, totals: dict[str, int]) -> str | None:
        reached = self.target_traces is not None and totals["kept"] >= self.target_traces
        return "target reached" if reached else None

    def finished_record(self, totals: dict[str, int], reason: str) -> dict:
        return {"kind": "finished", "questions": totals["questions"], "traces": totals["kept"], "reason": reason}

    def record_budget(self, ledger: BudgetLedger, totals: dict[str, int]) -> None:
        ledger.set("phase1/init", totals["init_generations"], totals["init_tokens"])
        ledger.set("phase1/revision", totals["revision_generations"], totals["revision_tokens"])

    def progress(self, totals: dict[str, int]) -> dict[str, str]:
        return {"kept": str(totals["kept"]),
                "accept": f"{totals['kept'] / max(totals['revision_generations'], 1):.1%}",
                "init_acc": f"{totals['init_correct'] / max(totals['init_generations'], 1):.1%}"}

    def collect_chunk(self, chunk: int, questions: Sequence[Question], first: int, source: str) -> list[dict]:
        """Steps 1-4 of docs/method.md, "Phase 1" for one chunk; returns its trace, question and chunk lines."""
        tok, c = self.tokenizer, _Chunk(chunk, questions, first)
        c.prompts = [render_prompt(tok, q.question + self.instruction, self.system_prompt, self.template_kwargs)
                     for q in questions]
        c.prompt_ids = [tok.encode(p, add_special_tokens=False) for p in c.prompts]
        c.owners = [i for i in range(len(questions)) for _ in range(self.inits)]  # init j answers question owners[j]
        # 1. sample the inits from chat(x); 2. verify them
        c.inits = self.rollout.generate([c.prompt_ids[i] for i in c.owners], seed=chunk_seed(self.seed, chunk, "init"),
                                        desc=f"inits chunk {chunk}")
        c.init_ids = [strip_stop(r.completion_ids, self.stop_ids) for r in c.inits]
        c.init_verdict = self.reward([tok.decode(ids, skip_special_tokens=True) for ids in c.init_ids],
                                     [questions[i].answer for i in c.owners])
        # 3. P_r by the reward; revisions from chat(x) + init + "\n\n" + P_r + "\n\n", for the branches that are on
        contexts = []
        for j, r in enumerate(c.init_verdict.rewards):
            if r is not None and self.branches[1 if r >= 0.5 else 0]:
                control_ids = tok.encode(control_text(self.phrases, r), add_special_tokens=False)
                contexts += [c.prompt_ids[c.owners[j]] + c.init_ids[j] + control_ids] * self.revisions
                c.revised += [(j, k) for k in range(self.revisions)]
        c.revisions = (self.rollout.generate(contexts, seed=chunk_seed(self.seed, chunk, "revision"),
                                             desc=f"revisions chunk {chunk}") if contexts else [])
        # 4. verify the revisions; keep the traces whose revision is correct
        c.revision_ids = [strip_stop(r.completion_ids, self.stop_ids) for r in c.revisions]
        c.revision_verdict = self.reward([tok.decode(ids, skip_special_tokens=True) for ids in c.revision_ids],
                                         [questions[c.owners[j]].answer for j, _ in c.revised])
        return self._records(c, source)

    def _records(self, c: "_Chunk", source: str) -> list[dict]:
        tok, per_question = self.tokenizer, [[] for _ in c.questions]
        for n, (j, k) in enumerate(c.revised):
            r = c.revision_verdict.rewards[n]
            if r is None or (r < 0.5 and not self.keep_incorrect):
                continue
            i, init_reward = c.owners[j], c.init_verdict.rewards[j]
            per_question[i].append({
                "kind": "trace", "question_id": c.questions[i].id, "row": c.first + i + 1, "prompt": c.prompts[i],
                "init": tok.decode(c.init_ids[j]), "init_reward": init_reward,
                "control": self.phrases[1 if init_reward >= 0.5 else 0], "revision": tok.decode(c.revision_ids[n]),
                "revision_reward": r, "init_index": j % self.inits, "revision_index": k,
                "prompt_tokens": len(c.prompt_ids[i]), "init_tokens": len(c.inits[j].completion_ids),
                "revision_tokens": len(c.revisions[n].completion_ids), "init_finish": c.inits[j].finish_reason,
                "revision_finish": c.revisions[n].finish_reason,
            })
        records, unverifiable = [], 0
        for i, question in enumerate(c.questions):
            mine = [j for j, owner in enumerate(c.owners) if owner == i]
            error = next((_error(c.init_verdict, j) for j in mine if c.init_verdict.rewards[j] is None), None)
            if error is not None:  # the reference cannot be used: counted, logged, the collection goes on
                unverifiable += 1
                log.warning("%s: row %d (id %s): %s; question skipped", source, c.first + i + 1, question.id, error)
            records += per_question[i]
            records.append({"kind": "question", "question_id": question.id, "row": c.first + i + 1, "chunk": c.index,
                            "init_rewards": [c.init_verdict.rewards[j] for j in mine],
                            "revisions": sum(c.owners[j] == i for j, _ in c.revised),
                            "kept": sum(t["revision_reward"] >= 0.5 for t in per_question[i]), "error": error})
        records.append({
            "kind": "chunk", "chunk": c.index, "questions": len(c.questions),
            "init_seed": chunk_seed(self.seed, c.index, "init"),
            "revision_seed": chunk_seed(self.seed, c.index, "revision"),
            "init_generations": len(c.inits), "init_tokens": sum(len(r.completion_ids) for r in c.inits),
            "init_correct": sum(r is not None and r >= 0.5 for r in c.init_verdict.rewards),
            "revision_generations": len(c.revisions),
            "revision_tokens": sum(len(r.completion_ids) for r in c.revisions),
            "revisions_correct": sum(r is not None and r >= 0.5 for r in c.revision_verdict.rewards),
            "kept": sum(q["kept"] for q in records if q["kind"] == "question"),
            "unverifiable": unverifiable, "verify_timeouts": c.init_verdict.timeouts + c.revision_verdict.timeouts,
        })
        return records


@dataclass
class _Chunk:
    """What one chunk sampled: init j answers question ``owners[j]``; revision n revises init ``revised[n][0]``."""

    index: int
    questions: Sequence[Question]
    first: int  # position of the chunk's first question in the collection (its row - 1)
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    inits: list[Rollout] = field(default_factory=list)
    init_ids: list[list[int]] = field(default_factory=list)
    init_verdict: RewardBatch = field(default_factory=lambda: RewardBatch([]))
    revised: list[tuple[int, int]] = field(default_factory=list)
    revisions: list[Rollout] = field(default_factory=list)
    revision_ids: list[list[int]] = field(default_factory=list)
    revision_verdict: RewardBatch = field(default_factory=lambda: RewardBatch([]))


def _error(verdict: RewardBatch, row: int) -> str:
    reason = verdict.errors[row] if row < len(verdict.errors) else None
    return reason or "the reference answer could not be used by the verifier"


# ---------------------------------------------------------------------------------------------- for training
def load_traces(path: str | os.PathLike) -> list[dict]:
    """The kept traces of a collected or handcrafted file (correct revisions only), each row validated.

    Handcrafted files hold one trace object per line with at least ``prompt`` (chat(x) as text), ``init``,
    ``control`` (the phrase P_r, without separators) and ``revision``; ``init_reward`` and ``revision_reward``
    are optional (the revision counts as correct when absent)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    state = read_trace_file(path)
    if state.header is not None and state.finished is None:
        raise DataError(f"{path}: the collection is not finished ({state.chunks} chunks); run fit again to resume it")
    traces = []
    for record, number in zip(state.records, state.lines):
        if record.get("kind", "trace") != "trace":
            continue
        for name in TRACE_FIELDS:
            if not isinstance(record.get(name), str):
                raise DataError(f"{path}: line {number}: field {name!r} must be a string, got {record.get(name)!r}")
        for name in ("init_reward", "revision_reward"):
            if record.get(name) is not None and not isinstance(record[name], (int, float)):
                raise DataError(f"{path}: line {number}: field {name!r} must be a number, got {record[name]!r}")
        if record.get("revision_reward", 1.0) >= 0.5:
            traces.append({**record, "line": number, "file": str(path)})
    return traces


def phase1_question_ids(state: TraceFile) -> list[str]:
    """Ids of the questions a collection processed, in order (Phase 2 excludes them)."""
    return [str(r["question_id"]) for r in state.of_kind("question")]


def trace_stats(traces: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts of kept traces by branch (init reward)."""
    right = sum(1 for t in traces if (t.get("init_reward") or 0.0) >= 0.5)
    return {"traces": len(traces), "traces_init_correct": right, "traces_init_wrong": len(traces) - right}
