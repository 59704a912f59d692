"""Cleaning of collected samples, as the reference code does before SFT (its ``prepare_data.py``): degenerate
repeating tails trimmed, sycophantic openers stripped from revisions, duplicates dropped. Applied when a collection
is loaded for training, never to the file, so the switches can change without new generations.
"""

from __future__ import annotations

import re
from typing import Sequence


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
