"""The Phase 1 -> Phase 2 hand-off: one file next to the SRT model recording what Phase 2 must match.

Phase 2 starts from the Phase-1 export and must show the reviser the SAME control phrases, instruction, system
prompt and chat-template arguments that Phase 1 trained it on, and must not train on Phase 1's questions (docs/method.md, "Phase 2"). The
Phase-1 export writes ``sdzero_handoff.json`` (:func:`write_handoff`); the Phase-2 data module reads it from its
start model (:func:`read_handoff`), excludes those questions when it reads the same dataset, and refuses a mismatch
with an error that names the flag and both values (:func:`check_handoff`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdzero_pl.core.prompts import ControlPhrases
from sdzero_pl.data.questions import QuestionSource

HANDOFF_FILE = "sdzero_handoff.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Handoff:
    dataset: str  # QuestionSource.name of Phase 1's questions
    control_preset: str
    control: dict[str, str]  # {"1": P_1, "0": P_0}, the phrases Phase 1 trained with
    instruction: str
    system_prompt: str | None
    question_ids: list[str] = field(default_factory=list)  # the questions Phase 1 processed
    budget: dict[str, int] = field(default_factory=dict)  # Phase 1's generations and tokens
    chat_template_kwargs: dict | None = None  # how x was rendered (e.g. {"enable_thinking": false}); older: None

    @classmethod
    def of(cls, source: QuestionSource, control: ControlPhrases, question_ids: list[str],
           budget: dict[str, int]) -> Handoff:
        phrases = control.phrases
        return cls(source.name, control.preset, {"1": phrases[1], "0": phrases[0]}, source.instruction,
                   source.system_prompt, list(question_ids), dict(budget), source.chat_template_kwargs)


def write_handoff(directory: str | os.PathLike, handoff: Handoff) -> Path:
    path = Path(directory) / HANDOFF_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, **asdict(handoff)}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_handoff(directory: str | os.PathLike) -> Handoff | None:
    """The hand-off record of a model directory, or None when it has none (a base model, a hub id)."""
    path = Path(directory) / HANDOFF_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.pop("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
        return Handoff(**data)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: not a Phase-1 hand-off record ({error})") from error


def check_handoff(handoff: Handoff, source: QuestionSource, control: ControlPhrases | None, where: str) -> None:
    """Raise if Phase 2's settings differ from what Phase 1 trained the reviser with; ``control`` None skips the
    control phrases (a teacher that does not read P_r). ``where`` names the start model in the message."""
    hint = "; or `--data.ignore_handoff=true` to train anyway"
    if control is not None:
        phrases = control.phrases
        for reward in ("1", "0"):
            if phrases[int(reward)] != handoff.control[reward]:
                flag = "--data.control.correct" if reward == "1" else "--data.control.wrong"
                raise ValueError(
                    f"{where} was trained by Phase 1 with control preset {handoff.control_preset!r} "
                    f"(P_{reward} = {handoff.control[reward]!r}); Phase 2 has `--data.control.preset="
                    f"{control.preset}` (P_{reward} = {phrases[int(reward)]!r}): set `--data.control.preset="
                    f"{handoff.control_preset}` or `{flag}`{hint}")
    for flag, theirs, ours in (("instruction", handoff.instruction, source.instruction),
                               ("system_prompt", handoff.system_prompt, source.system_prompt),
                               ("chat_template_kwargs", handoff.chat_template_kwargs, source.chat_template_kwargs)):
        if theirs != ours:
            raise ValueError(f"{where} was trained by Phase 1 with `--data.questions.{flag}={theirs!r}`; Phase 2 "
                             f"has {ours!r}: use the same{hint}")
