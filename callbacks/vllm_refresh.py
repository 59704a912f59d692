"""vLLM weight refresh: the rollout engine samples from the student's CURRENT weights (docs/method.md, "Phase 2", step 1).

The colocated engine (``sdzero_pl.rollout.VLLMRollout``) starts from the model directory on disk. Right before
each epoch's rollouts (the data module's ``on_before_rollout`` hook: Lightning builds the dataloader BEFORE
``on_train_epoch_start``, so an epoch-start hook would be one epoch late) this callback pushes the student's
weights into it, one tensor at a time, gathered from DDP / FSDP1 / FSDP2 shards without a second full copy of the
model, and the engine drops its prefix cache. No optimizer step since the last push: nothing to push. After a
resume (``--ckpt_path``) the engine's disk weights are not the restored ones, so the first rollouts push first.
Weights are never reloaded from disk after a push. ``rollout/logprob_gap`` shows whether it worked. A LoRA policy
pushes its merged weights ``W + s * B @ A`` (one layer at a time), so the engine needs no LoRA support of its own.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from sdzero_pl.core.lora import hf_named_tensors
from sdzero_pl.rollout import RolloutBackend, RolloutCallback, VLLMRollout


class VLLMWeightRefresh(RolloutCallback):
    """Pushes the student's weights into the vLLM rollout engine before rollouts that would otherwise be stale."""

    def __init__(self, push_at_start: bool = False) -> None:
        """
        Args:
            push_at_start: also push before the very first rollouts of a fresh run (needed only when the engine's
                ``model`` directory is not the student's starting checkpoint).
        """
        self.push_at_start = push_at_start
        self.pushes = 0
        self.skips = 0
        self.last_push_s = 0.0
        self._pushed_step: int | None = None  # global step whose weights the engine holds; None = unknown

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # restore happened before this hook: a resumed run's weights differ from the engine's disk weights
        fresh = trainer.ckpt_path is None and trainer.global_step == 0 and not self.push_at_start
        self._pushed_step = 0 if fresh else None

    def on_before_rollout(
        self, trainer: L.Trainer, pl_module: L.LightningModule, rollout: RolloutBackend, policy: torch.nn.Module
    ) -> None:
        if not isinstance(rollout, VLLMRollout):
            raise TypeError("callbacks.VLLMWeightRefresh needs `--data.rollout` to be sdzero_pl.rollout.VLLMRollout, "
                            f"got {type(rollout).__name__} (HF generate samples from the live model: drop the "
                            "callback)")
        if self._pushed_step == trainer.global_step and not rollout.weights_lost:
            self.skips += 1
            return
        self.last_push_s = rollout.update_weights(hf_named_tensors(policy))
        self._pushed_step = trainer.global_step
        self.pushes += 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict({"time/refresh_s": self.last_push_s, "rollout/weight_pushes": float(self.pushes)},
                           on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {"pushes": self.pushes}  # the engine's state is not in the checkpoint: a resume pushes again

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pushes = state_dict["pushes"]
