"""The tiny base model's ``--retry_style localized``: retry examples whose attempts are the model's OWN answers.

Used by ``scripts/train_tiny_base.py``. Until ``--own_errors_from`` the retry examples are the ``feedback`` style's
(synthetic slips, misread operands, flipped operations); from then on, every ``--own_errors_every`` steps, the
current model answers ``--own_errors_pool`` fresh training problems at ``--own_errors_temperature`` and those
answers become the attempts (:func:`sdzero_pl.tasks.chain.localized_retry_example`): a wrong one is followed by
"that is not correct" feedback and the canonical solution (the attempt's correct steps repeated, its first wrong
step fixed), a right one by "correct" feedback and the same solution. Wrong and right attempts are balanced to
``--retry_slip_prob`` wrong; when the model has too few right answers, restatements of the canonical solution (what
a right answer is) make up the difference. Why: the Phase-2 teacher must know, at the first wrong token of the generator's own
answer, that this token is the mistake; synthetic errors sit where the model is sure of the right token, its own
errors where it is not (docs/demo_task.md, "The chain variant").
"""

from __future__ import annotations

import random
from collections import Counter

from sdzero_pl.tasks.arithmetic import Problem
from sdzero_pl.tasks.chain import first_wrong_step, is_correct, localized_retry_example

from tiny_base_record import log, measure  # isort: skip  (this folder is on sys.path when the script runs)


class OwnErrors:
    """Rebuilds the retry examples from the model's own answers on a schedule; keeps a record for TRAINING.md."""

    def __init__(self, args, problems: list[Problem], reward) -> None:
        self.args, self.problems, self.reward = args, problems, reward
        self.refreshes: list[dict] = []
        self.cursor = 0
        self.first: int | None = None  # the step of the first rebuild, once it happened

    def due(self, step: int, accuracy: float | None = None) -> bool:
        """True at the first step >= ``--own_errors_from`` where the latest validation ``accuracy`` is at least
        ``--own_errors_min_accuracy`` (None: no validation yet), then every ``--own_errors_every`` steps after it."""
        if self.first is None:
            threshold = getattr(self.args, "own_errors_min_accuracy", 0.0)
            ready = threshold <= 0 or (accuracy is not None and accuracy >= threshold)
            if step < self.args.own_errors_from or not ready:
                return False
            self.first = step
        return (step - self.first) % self.args.own_errors_every == 0

    def examples(self, model, tokenizer, step: int) -> list[tuple[Problem, tuple[str, str, str]]]:
        """(problem, (attempt, interjection, target)) for a fresh pool of training problems answered by ``model``;
        empty when the model answered every problem of the pool right (the caller keeps its previous examples)."""
        pool = [self.problems[(self.cursor + i) % len(self.problems)] for i in range(self.args.own_errors_pool)]
        self.cursor += len(pool)
        sampled = measure(model, tokenizer, pool, self.args, self.reward, temperature=self.args.own_errors_temperature,
                          seed=self.args.seed + step)["samples"]
        model.train()
        rng = random.Random(self.args.seed + step)
        answers = [(p, completion) for p, (_, completion) in zip(pool, sampled)]
        wrong = [(p, c) for p, c in answers if not is_correct(c, p)]
        right = [(p, c) for p, c in answers if is_correct(c, p)]
        wrong_share = len(wrong) / len(answers)
        share = self.args.retry_slip_prob  # every own wrong answer is kept while right ones can balance it
        n_wrong = min(len(wrong), round(len(answers) * share))
        n_right = round(n_wrong * (1 - share) / share)
        wrong = rng.sample(wrong, n_wrong)
        deficit = max(0, n_right - len(right))  # restate problems the model got wrong: a right answer IS the solution
        restated = [(p, p.solution) for p in rng.sample([p for p, _ in answers], min(deficit, len(answers)))]
        right = rng.sample(right, min(len(right), n_right)) + restated
        kept = wrong + right
        positions = Counter(first_wrong_step(c, p.solution) for p, c in wrong)
        record = {"step": step, "pool": len(pool), "wrong_share_sampled": wrong_share, "wrong": len(wrong),
                  "right": len(right) - len(restated), "restated": len(restated),
                  "first_wrong_step": {str(k): v for k, v in sorted(positions.items(), key=lambda kv: str(kv[0]))}}
        self.refreshes.append(record)
        log(f"step {step}: own-error retry examples rebuilt from {len(pool)} answers ({wrong_share:.0%} wrong): "
            f"{len(wrong)} wrong + {record['right']} right + {len(restated)} restated solutions kept; "
            f"first wrong step {dict(positions)}")
        return [(p, localized_retry_example(p, c, rng)) for p, c in kept]
