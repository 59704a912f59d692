"""What the dry run (``sdzero_pl.pipelines.dryrun``) puts in place of what cannot run on a laptop.

* :class:`ScriptedRollout`: HF ``generate`` on the stand-in model, with every ``scripted_every``-th completion
  replaced by a correct answer: the worked solution a synthetic question carries in its dry-run marker
  (:mod:`sdzero_pl.data.hub`), a ``print a + b`` program for the synthetic code problems, or the answer of a row
  of a real local file (``solutions_file``). A tiny random model is never right, so without it the verifier's
  r=1 path, kept Phase-1 traces and GRPO groups with both outcomes would never run.
* :class:`StopAfterSteps`: ends ``fit`` after N optimizer steps (the LR schedule keeps the config's length) and
  records the learning rate of each step.
* :func:`stand_in_model`: the tiny random Qwen3-style model (``sdzero_pl.core.tiny``; ChatML template like Qwen3's
  and Olmo-3's) or any Hugging Face directory given by the user (e.g. a small pretrained model).
* :func:`synthetic_local_rows`: rows for a local question file that does not exist (e.g. the demo's generated
  data), with the config's own field names.
* :func:`emulate_handoff`: the hand-off record a Phase-1 config of the same folder would leave next to its export,
  so Phase 2 leaves out (and counts) the questions Phase 1 would have used and checks the phrases.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning as L

from sdzero_pl.data.hub import PROGRAM_MARK, SOLUTION_MARK, SUM_PROGRAM, math_solution
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.rollout import HFRollout, Rollout

SOLUTION = re.compile(re.escape(SOLUTION_MARK).replace(re.escape("{solution}"), "(.*?)"))


class ScriptedRollout(HFRollout):
    """HF generate on the stand-in, every ``scripted_every``-th completion a scripted correct answer (module doc)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 16, batch_size: int = 64,
                 show_progress: bool = False, scripted_every: int = 2, max_scripted: int = 16,
                 solutions_file: str | None = None) -> None:
        """
        Args:
            temperature: sampling temperature of the stand-in's own completions.
            top_p: nucleus sampling threshold.
            max_new_tokens: longest sampled completion (scripted ones are written whole).
            batch_size: prompts per ``generate`` call.
            show_progress: progress bar over generation batches.
            scripted_every: every N-th completion of a call (counted from the call's seed) is scripted; 0: none.
            max_scripted: at most this many per call (spread evenly): sandboxed code checks are slow.
            solutions_file: JSON {question text: completion} for real local rows (no dry-run marker).
        """
        super().__init__(temperature, top_p, max_new_tokens, batch_size, show_progress)
        if scripted_every < 0 or max_scripted < 1:
            raise ValueError(f"`scripted_every` must be >= 0 and `max_scripted` >= 1, got {scripted_every}, "
                             f"{max_scripted}")
        self.scripted_every, self.max_scripted = scripted_every, max_scripted
        self.solutions = json.loads(Path(solutions_file).read_text()) if solutions_file else {}
        self.tokenizer = None
        self.scripted = 0  # completions replaced so far

    def setup(self, policy, tokenizer, stop_ids: Sequence[int]) -> None:
        super().setup(policy, tokenizer, stop_ids)
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, seed: int, desc: str = "generate", max_new_tokens: int | None = None,
                 on_progress=None):
        rollouts = super().generate(prompt_ids, seed, desc, max_new_tokens, on_progress)
        if not self.scripted_every:
            return rollouts
        every = max(self.scripted_every, -(-len(prompt_ids) // self.max_scripted))
        for i, prompt in enumerate(prompt_ids):
            if (i + seed) % every:
                continue
            text = self.answer(self.tokenizer.decode(prompt, skip_special_tokens=True))
            if text is not None:
                ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.stop_ids[0]]
                rollouts[i] = Rollout(ids, "stop")
                self.scripted += 1
        return rollouts

    def answer(self, context: str) -> str | None:
        """A correct completion for the question in ``context`` (the prompt, or prompt + y + P_r), if known."""
        marks = SOLUTION.findall(context)
        if marks:
            return marks[-1]
        if PROGRAM_MARK in context:
            return f"Read the two integers and print their sum.\n\n```python\n{SUM_PROGRAM}```"
        for question, completion in self.solutions.items():
            if question in context:
                return completion
        return None


class StopAfterSteps(L.Callback):
    """Stops ``fit`` once ``steps`` optimizer steps ran; ``learning_rates`` holds the LR each step used."""

    def __init__(self, steps: int = 1) -> None:
        """
        Args:
            steps: optimizer steps to run.
        """
        if steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {steps}")
        self.steps = steps
        self.learning_rates: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.learning_rates.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def stand_in_model(choice: str, workdir: Path) -> Path:
    """``"tiny"``: the tiny random Qwen3-style model with the character-level ChatML tokenizer, built once under
    ``workdir``; anything else: an existing Hugging Face model directory."""
    if choice != "tiny":
        path = Path(choice)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"`--stand_in`: {choice!r} is neither 'tiny' nor a Hugging Face model directory")
        return path
    path = workdir / "stand_in" / "tiny-random"
    if not (path / "config.json").is_file():
        from sdzero_pl.core.tiny import save_tiny_model

        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_model(tmp, seed=0)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def model_copy(stand_in: Path, directory: Path) -> Path:
    """A directory that IS the stand-in (its files linked, not copied), to hold a hand-off record of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    for item in stand_in.iterdir():
        target = directory / item.name
        if item.is_file() and not target.exists():
            target.symlink_to(item.resolve())
    return directory


def synthetic_local_rows(fields: dict[str, str | None], code: bool, count: int) -> list[dict]:
    """Rows for a missing local question file: the config's own field names (``question``, ``answer``, ``id``,
    ``solution``), "What is a + b?" questions with a dry-run marker (or "print a + b" problems with tests)."""
    rows = []
    for j in range(count):
        a, b = 3 + j % 97, 5 + (7 * j) % 89
        row: dict[str, Any] = {}
        if code:
            row[fields["question"]] = f"You are given two integers a and b. Print a + b. {PROGRAM_MARK}"
            row[fields["answer"]] = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"}]
        else:
            row[fields["question"]] = f"What is {a} + {b}? " + SOLUTION_MARK.format(solution=math_solution(a, b))
            row[fields["answer"]] = str(a + b)
        if fields.get("id"):
            row[fields["id"]] = f"q{j:06d}"
        if fields.get("solution"):
            row[fields["solution"]] = math_solution(a, b)
        rows.append(row)
    return rows


def solutions_for(questions: Sequence[Any], limit: int = 2000) -> dict[str, str]:
    """{question text: a correct completion} for real math rows (their solution if it has a box, else the answer
    boxed), for :class:`ScriptedRollout`'s ``solutions_file``; code rows have none."""
    out = {}
    for q in questions[:limit]:
        if not isinstance(q.answer, str):
            continue
        solution = q.solution if q.solution and "\\boxed" in q.solution else f"The answer is \\boxed{{{q.answer}}}."
        out[q.question] = solution
    return out


def emulate_handoff(directory: Path, source: QuestionSource, control, question_ids: list[str]) -> Path:
    """Write the hand-off record Phase 1 (``source``, ``control``) would leave after processing ``question_ids``."""
    from sdzero_pl.phase1.handoff import Handoff, write_handoff

    return write_handoff(directory, Handoff.of(source, control, question_ids, {}))
