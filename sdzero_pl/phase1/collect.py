"""Phase 1 data: self-revision traces sampled from the base model itself (SPEC "Phase 1", data collection 1-4).

For each of the first N1 questions: sample ``inits_per_question`` initial answers (paper: 1), verify them, pick
the control phrase P_r by the reward, sample ``revisions_per_init`` revisions (paper: 3) from the reviser context
``chat(x) + init + "\\n\\n" + P_r + "\\n\\n"`` (the SAME assistant turn; the init's end-of-turn token stripped;
the delimiter tokenized on its own and concatenated as ids, as in Phase 2), verify the revisions and keep the
traces whose revision is correct. Both branches (r=1 "rephrase", r=0 "start over") are on by default, as in the
paper; the reference code revises wrong inits only (``revise_correct=False``). No reference answer is ever shown.

Nothing is lost. Questions go through the rollout backend in chunks of ``questions_per_chunk``; a finished chunk
is appended to a JSONL file in one write, flushed and fsync'ed. One object per line, by ``kind``:

* ``header``: the collection's settings (a resumed or reused file must have been made with the same ones);
* ``trace``: a kept trace: question id and row, prompt (chat(x) as text), init, init reward, control, revision,
  revision reward, token counts;
* ``question``: one per processed question, after its traces, so a question with no kept trace is not redone;
* ``chunk``: closes a chunk, with its seed and its generation and token counts: the resume point;
* ``finished``: every question processed, or the target trace count reached.

A restarted run drops whatever follows the last ``chunk`` line (a torn line or half a chunk from kill -9) and
continues with the next chunk. Seeds depend only on (seed, chunk index), so a resumed run writes exactly the same
file as an uninterrupted one. The reference code's cleaning (degenerate repeating tails, sycophantic openers,
duplicates) is applied when traces are loaded for training (:func:`clean_traces`), so the file keeps what the
model actually produced and the switches can change without new generations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.prompts import control_text, render_prompt
from sdzero_pl.data.questions import DataError, Question
from sdzero_pl.tasks import RewardBatch, Verifier
from sdzero_pl.rollout import Rollout, RolloutBackend
from sdzero_pl.core.sequences import strip_stop

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRACE_FIELDS = ("prompt", "init", "control", "revision")  # what training needs from every trace


# ------------------------------------------------------------------------------------------------------ cleaning
def trim_repeating_tail(text: str, min_block: int = 10, max_block: int = 1500, min_repeats: int = 3,
                        max_passes: int = 5) -> str:
    """Cut a degenerate tail (a block of ``min_block``..``max_block`` characters repeated at least ``min_repeats``
    times at the very end, the "loop until the token budget runs out" failure) down to one copy of the block.
    Repeated, because removing one period can reveal another."""
    for _ in range(max_passes):
        n, trimmed = len(text), False
        for period in range(min_block, min(max_block, n // min_repeats) + 1):
            start = n - period  # extend the periodic suffix backwards while text[i] == text[i + period]
            while start > 0 and text[start - 1] == text[start - 1 + period]:
                start -= 1
            if n - start >= min_repeats * period:
                text, trimmed = text[: start + period], True
                break
        if not trimmed:
            break
    return text


# Chat-assistant openers an instruct model emits as if a user had flagged its error; they break the single
# self-revising stream the revision continues (reference code: prepare_data.py).
_OPENERS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:yes|indeed)?[,!.]?\s*you(?:'re|’re| are)\s+(?:absolutely\s+|completely\s+|totally\s+)?right\s+to\s+[^.!?\n]*[.!?]\s*",
        r"^(?:yes|indeed)?[,!.]?\s*you(?:'re|’re| are)\s+(?:absolutely\s+|completely\s+|totally\s+)?right\b\s*[—–\-,:;.!]*\s*",
        r"^thank(?:s| you)\s+for\b[^.!?\n]*[.!?]\s*",
        r"^great\s+question\b[^.!?\n]*?[.!?—–\-]\s*",
        r"^(?:good|nice|great)\s+(?:catch|point|observation)\b[^.!?\n]*?[.!?—–\-]\s*",
    )
]


def strip_opener(text: str) -> str:
    """Remove sycophantic openers ("You're absolutely right — ", "Good catch!") from the start of ``text``,
    re-capitalising what follows; text without one comes back unchanged."""
    out, changed = text.lstrip(), False
    while True:
        for pattern in _OPENERS:
            new = pattern.sub("", out, count=1)
            if new != out:
                out, changed = new.lstrip(), True
                break
        else:
            break
    if not changed:
        return text
    return out[:1].upper() + out[1:]


def clean_traces(traces: Sequence[dict], trim_repeats: bool = True, strip_openers: bool = True,
                 dedupe: bool = True) -> tuple[list[dict], dict[str, int]]:
    """Cleaned copies of ``traces`` and the count of each change. Repeating tails are trimmed in init and
    revision, openers stripped from the revision; duplicates are (question, init, revision) seen before."""
    out, seen = [], set()
    stats = {"trimmed": 0, "openers": 0, "duplicates": 0}
    for trace in traces:
        trace = dict(trace)
        if trim_repeats:
            for name in ("init", "revision"):
                trimmed = trim_repeating_tail(trace[name])
                stats["trimmed"] += trimmed != trace[name]
                trace[name] = trimmed
        if strip_openers:
            stripped = strip_opener(trace["revision"])
            stats["openers"] += stripped != trace["revision"]
            trace["revision"] = stripped
        key = (trace.get("question_id", trace["prompt"]), trace["init"], trace["revision"])
        if dedupe and key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        out.append(trace)
    return out, stats


# ------------------------------------------------------------------------------------------------------ the file
@dataclass
class TraceFile:
    """What a trace file holds up to its last complete chunk (a handcrafted file without a header: every line)."""

    header: dict | None
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # 1-based line number of each record, for error messages
    chunks: int = 0
    finished: dict | None = None
    valid_bytes: int = 0  # the file is kept up to here; what follows is an interrupted chunk
    total_bytes: int = 0

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind", "trace") == kind]


def read_trace_file(path: str | os.PathLike) -> TraceFile:
    """Parse a trace file, tolerating a torn last line (kill -9 during a write)."""
    data = Path(path).read_bytes()
    parsed, offset = [], 0
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):  # the piece after the last "\n" is torn
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error})") from error
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        parsed.append((number, offset, obj))
    if not parsed or parsed[0][2].get("kind") != "header":  # handcrafted: every complete line is a record
        return TraceFile(None, [o for _, _, o in parsed], [n for n, _, _ in parsed], 0, None, len(data), len(data))
    state = TraceFile(parsed[0][2], valid_bytes=parsed[0][1], total_bytes=len(data))
    pending: list[tuple[int, int, dict]] = []
    for number, end, obj in parsed[1:]:
        kind = obj.get("kind")
        if kind == "finished":
            state.finished, state.valid_bytes = obj, end
            break
        pending.append((number, end, obj))
        if kind == "chunk":
            if obj.get("chunk") != state.chunks:
                raise DataError(f"{path}: line {number}: chunk {obj.get('chunk')} where chunk {state.chunks} was due")
            state.records += [o for _, _, o in pending]
            state.lines += [n for n, _, _ in pending]
            state.chunks, state.valid_bytes, pending = state.chunks + 1, end, []
    return state


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append records as JSON lines in one write, then flush and fsync: durable before the next chunk starts."""
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())


def chunk_seed(seed: int, chunk: int, stage: str) -> int:
    """Seed of one generation call: a function of (run seed, chunk, "init" / "revision") only, never of how
    many calls this process made, so resumed and uninterrupted runs sample the same tokens."""
    digest = hashlib.sha256(f"{seed}/{chunk}/{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def summarize(state: TraceFile) -> dict[str, int]:
    """Totals over the complete chunks of a collected file (budget and acceptance)."""
    keys = ("questions", "init_generations", "init_tokens", "init_correct", "revision_generations",
            "revision_tokens", "revisions_correct", "kept", "unverifiable", "verify_timeouts")
    chunks = state.of_kind("chunk")
    return {k: sum(int(c[k]) for c in chunks) for k in keys}


# ----------------------------------------------------------------------------------------------- the collector
class TraceCollector:
    """Samples, verifies and writes self-revision traces; see the module docstring for the file it writes."""

    def __init__(
        self,
        rollout: RolloutBackend,
        reward: Verifier,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: Sequence[int],
        phrases: dict[int, str],
        instruction: str = "",
        system_prompt: str | None = None,
        inits_per_question: int = 1,
        revisions_per_init: int = 3,
        revise_correct: bool = True,
        revise_wrong: bool = True,
        keep_incorrect: bool = False,
        questions_per_chunk: int = 64,
        seed: int = 0,
    ) -> None:
        if not (revise_correct or revise_wrong):
            raise ValueError("`revise_correct` and `revise_wrong` are both off: no revision would be sampled")
        for flag, value in (("inits_per_question", inits_per_question), ("revisions_per_init", revisions_per_init),
                            ("questions_per_chunk", questions_per_chunk)):
            if value < 1:
                raise ValueError(f"`--data.{flag}` must be >= 1, got {value}")
        self.rollout, self.reward, self.tokenizer = rollout, reward, tokenizer
        self.stop_ids, self.phrases = list(stop_ids), phrases
        self.instruction, self.system_prompt = instruction, system_prompt
        self.inits, self.revisions = inits_per_question, revisions_per_init
        self.branches = {1: revise_correct, 0: revise_wrong}
        self.keep_incorrect, self.chunk_size, self.seed = keep_incorrect, questions_per_chunk, seed

    def settings(self, questions: Sequence[Question], target_traces: int | None, extra: dict | None) -> dict:
        """Everything the file's content depends on; stored in the header and compared on resume / reuse."""
        ids = hashlib.sha256("\n".join(q.id for q in questions).encode()).hexdigest()
        settings = {
            "questions": len(questions), "question_ids_sha256": ids, "inits_per_question": self.inits,
            "revisions_per_init": self.revisions, "revise_correct": self.branches[1], "revise_wrong": self.branches[0],
            "keep_incorrect": self.keep_incorrect, "questions_per_chunk": self.chunk_size, "seed": self.seed,
            "target_traces": target_traces, "control": {"1": self.phrases[1], "0": self.phrases[0]},
            "instruction": self.instruction, "system_prompt": self.system_prompt,
            "rollout": {"class": type(self.rollout).__name__, "temperature": self.rollout.temperature,
                        "top_p": self.rollout.top_p, "max_new_tokens": self.rollout.max_new_tokens},
            "reward": type(self.reward).__name__, **(extra or {}),
        }
        return json.loads(json.dumps(settings))  # as it reads back from the file (tuples -> lists)

    def run(self, path: str | os.PathLike, questions: Sequence[Question], target_traces: int | None = None,
            source: str = "questions", extra_settings: dict | None = None, ledger: BudgetLedger | None = None,
            recollect: bool = False, show_progress: bool = True, prepare: Callable[[], None] | None = None,
            ) -> TraceFile:
        """Collect into ``path``, resuming a partial file and reusing a finished one (unless ``recollect``).
        ``prepare`` runs once before the first generation (e.g. binding the rollout backend), never on reuse."""
        if target_traces is not None and target_traces < 1:
            raise ValueError(f"`--data.target_traces` must be >= 1 or null, got {target_traces}")
        path = Path(path)
        header = {"kind": "header", "version": FORMAT_VERSION, "method": "srt",
                  "settings": self.settings(questions, target_traces, extra_settings)}
        state = open_collection(path, header, recollect)
        totals = summarize(state)
        _record_budget(ledger, totals)
        bar = tqdm(total=len(questions), initial=totals["questions"], unit="question", desc="SRT traces",
                   disable=not show_progress or state.finished is not None)
        try:
            while state.finished is None:
                start = state.chunks * self.chunk_size
                reason = ("target reached" if target_traces is not None and totals["kept"] >= target_traces
                          else "all questions" if start >= len(questions) else None)
                if reason is not None:
                    state.finished = {"kind": "finished", "questions": totals["questions"], "traces": totals["kept"],
                                      "reason": reason}
                    append_records(path, [state.finished])
                    break
                if prepare is not None:
                    prepare()
                    prepare = None
                records = self._chunk(state.chunks, questions[start : start + self.chunk_size], start, source)
                append_records(path, records)
                for key, value in records[-1].items():
                    if key in totals:
                        totals[key] += value
                state.chunks += 1
                _record_budget(ledger, totals)
                bar.update(records[-1]["questions"])
                bar.set_postfix(kept=totals["kept"], accept=f"{totals['kept'] / max(totals['revision_generations'], 1):.1%}",
                                init_acc=f"{totals['init_correct'] / max(totals['init_generations'], 1):.1%}")
        finally:
            bar.close()
        return read_trace_file(path)
        if state.valid_bytes < state.total_bytes:
            log.warning("%s: dropping %d bytes of an interrupted chunk", path, state.total_bytes - state.valid_bytes)
            with open(path, "r+b") as handle:
                handle.truncate(state.valid_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        rank_zero_info(f"{path}: resuming the collection at chunk {state.chunks} "
                       f"({len(state.of_kind('question'))} questions done)")
        return state

    def _chunk(self, chunk: int, questions: Sequence[Question], first: int, source: str) -> list[dict]:
        """Steps 1-4 of SPEC "Phase 1" for one chunk; returns its trace, question and chunk lines."""
        tok, c = self.tokenizer, _Chunk(chunk, questions, first)
        c.prompts = [render_prompt(tok, q.question + self.instruction, self.system_prompt) for q in questions]
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


def _record_budget(ledger: BudgetLedger | None, totals: dict[str, int]) -> None:
    """Absolute counts recomputed from the file: a resumed run never counts a chunk twice."""
    if ledger is not None:
        ledger.set("phase1/init", totals["init_generations"], totals["init_tokens"])
        ledger.set("phase1/revision", totals["revision_generations"], totals["revision_tokens"])


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


def open_collection(path: Path, header: dict, recollect: bool) -> TraceFile:
    """The file's complete part, after checking its method and settings; a fresh file (header only) if there is
    none. A partial file is truncated to its last complete chunk (a torn line from kill -9 included)."""
    if path.exists() and recollect:
        rank_zero_info(f"{path}: `recollect` is set, starting the collection over")
        path.unlink()
    state = read_trace_file(path) if path.exists() else None
    if state is None or (state.header is None and not state.records):  # absent, empty or a torn header
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        append_records(path, [header])
        return read_trace_file(path)
    if state.header is None:
        raise DataError(f"{path}: not a collected file (no header line); a handcrafted trace file goes to "
                        "`--data.extra_traces_file`")
    if state.header.get("method", "srt") != header.get("method", "srt"):
        raise DataError(f"{path}: a {state.header.get('method', 'srt')!r} collection, not {header.get('method', 'srt')!r}")
    old, new = state.header.get("settings", {}), header["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"{path} was collected with other settings ({diff}); set `--data.recollect=true` to "
                         "start over, or choose another `--data.output_dir`")
    if state.finished is not None:
        rank_zero_info(f"{path}: finished collection reused; `--data.recollect=true` starts over")
        return state
    if state.valid_bytes < state.total_bytes:
        log.warning("%s: dropping %d bytes of an interrupted chunk", path, state.total_bytes - state.valid_bytes)
        with open(path, "r+b") as handle:
            handle.truncate(state.valid_bytes)
            handle.flush()
            os.fsync(handle.fileno())
    rank_zero_info(f"{path}: resuming the collection at chunk {state.chunks}")
    return state
