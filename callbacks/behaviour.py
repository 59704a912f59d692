"""Behaviour over training (docs/method.md, "Analyses"): mean response length and the frequency of self-revision phrases
("wait", "let me start over", the control phrases, ...) in the latest rollouts, logged every epoch.

The paper reports both rising in Phase 1 (SRT teaches the model to revise) and falling in Phase 2 (SD-Zero
outputs about half SRT's length). The callback reads the data module's ``last_completions: list[str]`` (the
completion texts of this rank's latest rollouts; the on-policy data module refreshes it each epoch, before
``on_train_epoch_start``), so it works with any data module that provides :class:`~sdzero_pl.contracts.RolloutData`
(Phase 2, GRPO).

Logged (epoch level, averaged over ranks): ``behaviour/len_tokens_mean`` (re-tokenized with the module's
tokenizer, special tokens not counted), ``behaviour/len_chars_mean``, ``behaviour/revision_phrases_per_response``
(all phrases together) and, per phrase, ``behaviour/phrase/<phrase>_per_response`` (mean occurrences) and
``behaviour/phrase/<phrase>_any`` (share of responses holding it). Matching is case-insensitive, on word
boundaries ("wait" counts in "Wait," but not in "awaiting").
"""

from __future__ import annotations

import lightning as L

from sdzero_pl.contracts import RolloutData, require
from sdzero_pl.core.prompts import CONTROL_PRESETS
from sdzero_pl.evaluation.metrics import DEFAULT_PHRASES, behaviour_metrics, phrase_pattern, phrase_slug


class RolloutBehaviourLogger(L.Callback):
    """Logs response length and self-revision phrase frequencies of each epoch's rollouts."""

    def __init__(
        self,
        phrases: list[str] | None = None,
        control_preset: str | None = "paper",
        count_tokens: bool = True,
    ) -> None:
        """
        Args:
            phrases: self-revision phrases to count; default: "wait", "let me start over", "let me correct",
                "let me rephrase", "let me check", "alternatively", "hmm".
            control_preset: also count that preset's two control phrases ("paper", "qwen", "olmo"); None = no.
            count_tokens: also log the mean length in tokens (re-tokenizing with ``pl_module.tokenizer``).
        """
        chosen = list(phrases) if phrases is not None else list(DEFAULT_PHRASES)
        if control_preset is not None:
            if control_preset not in CONTROL_PRESETS:
                raise ValueError(f"`RolloutBehaviourLogger.control_preset` must be one of {sorted(CONTROL_PRESETS)} "
                                 f"or null, got {control_preset!r}")
            chosen += [CONTROL_PRESETS[control_preset][r] for r in (0, 1)]
        chosen = list(dict.fromkeys(chosen))
        if not chosen:
            raise ValueError("`RolloutBehaviourLogger.phrases` is empty and no control preset is set")
        for phrase in chosen:
            phrase_pattern(phrase)  # raises on an empty phrase
        slugs = [phrase_slug(p) for p in chosen]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"`RolloutBehaviourLogger.phrases` holds phrases with the same metric name: {chosen}")
        self.phrases = chosen
        self.count_tokens = count_tokens
        self.data: RolloutData | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.data = require(trainer.datamodule, RolloutData, "callbacks.RolloutBehaviourLogger")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        completions = self.data.last_completions
        if not completions:  # no rollouts this epoch (e.g. an empty shard): nothing to measure
            return
        token_counts = None
        if self.count_tokens:
            token_counts = [len(ids) for ids in pl_module.tokenizer(completions, add_special_tokens=False)["input_ids"]]
        metrics = behaviour_metrics(completions, self.phrases, token_counts, prefix="behaviour")
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
