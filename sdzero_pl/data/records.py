"""Resumable, append-only JSONL collections: what Phase 1 (traces) and RFT (samples) write while they sample.

One object per line, by ``kind``: a ``header`` with the collection's settings (a resumed or reused file must have
been made with the same ones), then per chunk of questions the chunk's records (``trace`` / ``sample`` lines, one
``question`` line per processed question) closed by a ``chunk`` line (its seeds and counts: the resume point),
and at the end ``finished``. A chunk is appended in one write, flushed and fsync'ed.

A restarted run drops whatever follows the last ``chunk`` line (a torn line or half a chunk from kill -9) and
continues with the next chunk. Seeds depend only on (seed, chunk index), so a resumed run writes exactly the same
file as an uninterrupted one. :func:`run_collection` is that loop, for any :class:`ChunkCollector`;
:func:`collect_on_rank_zero` runs it on global rank 0 while the other ranks wait for the finished file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from sdzero_pl.contracts import PolicyModule
from sdzero_pl.core.budget import BudgetLedger
from sdzero_pl.core.prompts import stop_token_ids
from sdzero_pl.data.questions import DataError, Question, QuestionSource

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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


def summarize(state: TraceFile, keys: Sequence[str]) -> dict[str, int]:
    """Totals of ``keys`` over the complete chunks of a collected file (budget and acceptance)."""
    chunks = state.of_kind("chunk")
    return {k: sum(int(c[k]) for c in chunks) for k in keys}


def question_ids_digest(questions: Sequence[Question]) -> str:
    """sha256 of the question ids in order: a collection's settings name its questions by this."""
    return hashlib.sha256("\n".join(q.id for q in questions).encode()).hexdigest()


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


@dataclass(frozen=True)
class CollectionPaths:
    """The files of one collection: the JSONL ``records`` and its ``budget.json``, in ``directory``."""

    directory: Path
    records: Path
    budget: Path

    @classmethod
    def of(cls, trainer, output_dir: str | None, default_dir: str, records_name: str) -> CollectionPaths:
        """In ``output_dir``, or ``<default_root_dir>/<default_dir>``."""
        directory = Path(output_dir or os.path.join(trainer.default_root_dir, default_dir))
        return cls(directory, directory / records_name, directory / "budget.json")


# ------------------------------------------------------------------------------------------------ the runner
class ChunkCollector(Protocol):
    """One kind of collection (Phase 1's traces, RFT's samples): what :func:`run_collection` needs from it."""

    method: str  # written in the header; a file of another method is refused
    chunk_size: int  # questions per chunk: the unit of generation and of resumption
    totals: tuple[str, ...]  # integer fields of the "chunk" line summed into the run's totals
    desc: str  # progress bar label

    def settings(self, questions: Sequence[Question], extra: dict | None) -> dict:
        """Everything the file's content depends on (stored in the header, compared on resume / reuse)."""

    def collect_chunk(self, index: int, questions: Sequence[Question], first: int, source: str) -> list[dict]:
        """Sample and verify one chunk; its records, the closing ``chunk`` line last."""

    def stop_reason(self, totals: dict[str, int]) -> str | None:
        """Why to finish before the questions run out (e.g. "target reached"), or None."""

    def finished_record(self, totals: dict[str, int], reason: str) -> dict:
        """The ``finished`` line."""

    def record_budget(self, ledger: BudgetLedger, totals: dict[str, int]) -> None:
        """Absolute counts into the ledger (recomputed from the file: a resumed run never counts twice)."""

    def progress(self, totals: dict[str, int]) -> dict[str, str]:
        """Progress bar postfix."""

    def bind(self, tokenizer, stop_ids: Sequence[int]) -> ChunkCollector:
        """The sampling model's tokenizer and end-of-turn ids; needed before the first chunk."""


def run_collection(path: str | os.PathLike, collector: ChunkCollector, questions: Sequence[Question], *,
                   source: str = "questions", extra_settings: dict | None = None, ledger: BudgetLedger | None = None,
                   recollect: bool = False, show_progress: bool = True, prepare: Callable[[], None] | None = None,
                   ) -> TraceFile:
    """Collect ``questions`` into ``path`` chunk by chunk, resuming a partial file and reusing a finished one
    (unless ``recollect``). ``prepare`` runs once before the first generation (e.g. binding the rollout backend),
    never on reuse."""
    path = Path(path)
    header = {"kind": "header", "version": FORMAT_VERSION, "method": collector.method,
              "settings": collector.settings(questions, extra_settings)}
    state = open_collection(path, header, recollect)
    totals = summarize(state, collector.totals)
    if ledger is not None:
        collector.record_budget(ledger, totals)
    bar = tqdm(total=len(questions), initial=totals["questions"], unit="question", desc=collector.desc,
               disable=not show_progress or state.finished is not None)
    try:
        while state.finished is None:
            start = state.chunks * collector.chunk_size
            reason = collector.stop_reason(totals) or ("all questions" if start >= len(questions) else None)
            if reason is not None:
                state.finished = collector.finished_record(totals, reason)
                append_records(path, [state.finished])
                break
            if prepare is not None:
                prepare()
                prepare = None
            records = collector.collect_chunk(state.chunks, questions[start : start + collector.chunk_size], start,
                                              source)
            append_records(path, records)
            for key in collector.totals:
                totals[key] += records[-1][key]
            state.chunks += 1
            if ledger is not None:
                collector.record_budget(ledger, totals)
            bar.update(records[-1]["questions"])
            bar.set_postfix(collector.progress(totals))
    finally:
        bar.close()
    return read_trace_file(path)


def collect_on_rank_zero(trainer, path: Path, collect: Callable[[], None], name: str) -> None:
    """Global rank 0 runs ``collect`` (which writes the collection at ``path``); the other ranks poll until the file
    is finished (a collection takes longer than any barrier timeout), then all meet at a barrier."""
    if trainer.is_global_zero:
        collect()
    else:
        while not (path.exists() and read_trace_file(path).finished):
            time.sleep(10)
    trainer.strategy.barrier(name)


def collect_with_policy(trainer, module: PolicyModule, collector: ChunkCollector, *, rollout, paths: CollectionPaths,
                        questions: Sequence[Question], source: QuestionSource, recollect: bool,
                        show_progress: bool) -> None:
    """Phase 1's and RFT's collection, on every rank: global rank 0 loads the module's policy (before any weight
    changes), binds the collector (``collector.bind(tokenizer, stop_ids)``) and the rollout backend to it and runs
    the collection into ``paths``; the other ranks wait for the finished file."""
    path, ledger_path = paths.records, paths.budget

    def collect() -> None:
        module.configure_model()  # idempotent; Lightning calls it again after setup
        model = module.policy.to(trainer.strategy.root_device)
        stops = stop_token_ids(module.tokenizer, model.generation_config.eos_token_id)
        collector.bind(module.tokenizer, stops)
        ledger = BudgetLedger(ledger_path)
        run_collection(path, collector, questions, source=source.name,
                       extra_settings={"model": module.start_model, "dtype": module.hparams.dtype,
                                       "dataset": source.name},
                       ledger=ledger, recollect=recollect, show_progress=show_progress,
                       prepare=lambda: rollout.setup(model, module.tokenizer, stops))
        rank_zero_info(f"{collector.desc}: sample budget ({ledger_path}): {ledger.summary()}")

    collect_on_rank_zero(trainer, path, collect, f"{collector.method}-collection")


def collection_settings(questions: Sequence[Question], rollout, reward, chunk_size: int, seed: int,
                        **settings) -> dict:
    """The settings every collection depends on (questions, sampler, verifier, chunking, seed) plus ``settings``,
    as they read back from the file (tuples become lists)."""
    common = {
        "questions": len(questions), "question_ids_sha256": question_ids_digest(questions),
        "questions_per_chunk": chunk_size, "seed": seed,
        "rollout": {"class": type(rollout).__name__, "temperature": rollout.temperature, "top_p": rollout.top_p,
                    "max_new_tokens": rollout.max_new_tokens},
        "reward": type(reward).__name__,
    }
    return json.loads(json.dumps({**common, **settings}))
