"""The divergence guard: a run whose loss, gradients or weights stop being numbers ends with an error, never with
an exported model; optionally, a run that explodes or collapses is flagged or stopped too.

Always on (every training module adds a :class:`DivergenceGuard` unless the trainer already has one):

* a non-finite loss in any micro-batch, a non-finite gradient (checked before the optimizer step, so the weights
  are still the last good ones) or a non-finite trainable weight right after a step (an optimizer post-hook,
  before any callback or rollout reads the new weights) raises :class:`DivergenceError`,
  naming the optimizer step and the metric. Lightning then skips ``on_train_end`` / ``on_fit_end``, so nothing is
  exported, and the guard turns off ``ModelCheckpoint(save_on_exception=True)`` for this error, so the last
  checkpoint on disk stays the last good one (the message names it). The decision is reduced over ranks (one
  small all-reduce per optimizer step and one after it), so every rank stops at the same step: no rank waits in a
  collective that the others left. With a GradScaler (``16-mixed``) non-finite gradients are the scaler's
  business (it skips the step and lowers its scale), so only the loss and the weights are checked.

Optional (off by default; ``action`` "warn" logs, "stop" raises :class:`DivergenceError`):

* ``max_loss``: the step's loss above an absolute bound;
* ``loss_spike_factor``: the step's loss above ``factor`` x the largest of the last ``loss_spike_window`` step
  losses (Megatron-LM's spiky-loss check compares with the largest recent loss the same way), ignored below
  ``loss_spike_floor`` (Phase 2's loss starts near 0: 0.0007 -> 0.01 is learning, not divergence);
* ``reward_collapse``: the epoch's ``rollout/reward_mean`` below ``reward_collapse`` x its best value so far, for
  ``patience`` epochs in a row (on-policy data modules only);
* ``max_truncated_frac``: ``rollout/truncated_frac`` at or above this (1.0 = every rollout hit the length cap), for
  ``patience`` epochs in a row.

The step's loss is the sum over its micro-batches of the loss Lightning backpropagates (already divided by the
accumulation), averaged over ranks: the global token mean for the project's token-normalised losses.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

ACTIONS = ("warn", "stop")


class DivergenceError(RuntimeError):
    """Training diverged; the message names the optimizer step and the metric. Nothing was exported."""


def nonfinite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if any element of any tensor is NaN or infinite: one float32 sum per tensor (a single read, no
    allocation; a NaN or an infinity anywhere makes it non-finite, and so do finite values large enough to overflow
    it, ~1e38, which is divergence too) and one device sync for all of them. Sharded DTensors are checked on their
    local shard."""
    sums = [_local(t).sum(dtype=torch.float32) for t in tensors if t.numel()]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums)).all())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()


def loss_spike(loss: float, recent: Iterable[float], factor: float, floor: float) -> bool:
    """The spike rule: ``loss`` above ``factor`` x the largest recent loss, once that reference reaches ``floor``."""
    reference = max(recent, default=None)
    return reference is not None and loss > factor * max(reference, floor)


class DivergenceGuard(L.Callback):
    """Stops a diverged run with an error naming the step and the metric (see the module docstring)."""

    def __init__(
        self,
        check_weights: bool = True,
        max_loss: float | None = None,
        loss_spike_factor: float | None = None,
        loss_spike_window: int = 20,
        loss_spike_floor: float = 0.01,
        reward_collapse: float | None = None,
        max_truncated_frac: float | None = None,
        patience: int = 1,
        action: str = "stop",
    ) -> None:
        """
        Args:
            check_weights: also check every trainable weight after each optimizer step (one pass over the weights).
            max_loss: flag a step whose loss exceeds this; null = off.
            loss_spike_factor: flag a step whose loss exceeds this factor x the largest of the previous
                ``loss_spike_window`` step losses; null = off.
            loss_spike_window: optimizer steps the spike rule looks back on.
            loss_spike_floor: the spike rule's reference loss is at least this (losses that start near 0).
            reward_collapse: flag an epoch whose ``rollout/reward_mean`` is below this fraction of the best epoch
                so far (e.g. 0.5: halved); null = off.
            max_truncated_frac: flag an epoch whose ``rollout/truncated_frac`` is at least this (1.0: every
                rollout at the length cap); null = off.
            patience: epochs in a row the reward or truncation rule must hold before it fires.
            action: "warn" (log and go on) or "stop" (raise DivergenceError: no export) for the optional rules;
                non-finite values always stop.
        """
        if action not in ACTIONS:
            raise ValueError(f"`DivergenceGuard.action` must be one of {ACTIONS}, got {action!r}")
        for flag, value, low in (("loss_spike_window", loss_spike_window, 1), ("patience", patience, 1)):
            if value < low:
                raise ValueError(f"`DivergenceGuard.{flag}` must be >= {low}, got {value}")
        for flag, value in (("max_loss", max_loss), ("loss_spike_factor", loss_spike_factor),
                            ("reward_collapse", reward_collapse), ("max_truncated_frac", max_truncated_frac)):
            if value is not None and not value > 0:
                raise ValueError(f"`DivergenceGuard.{flag}` must be > 0 or null, got {value}")
        self.check_weights, self.max_loss, self.action, self.patience = check_weights, max_loss, action, patience
        self.loss_spike_factor, self.loss_spike_floor = loss_spike_factor, loss_spike_floor
        self.reward_collapse, self.max_truncated_frac = reward_collapse, max_truncated_frac
        self.recent: deque[float] = deque(maxlen=loss_spike_window)
        self.best_reward: float | None = None
        self.strikes = {"reward": 0, "truncated": 0}
        self._loss_sum, self._loss_bad = 0.0, False
        self._step, self._hooks = 0, []

    # ---------------------------------------------------------------------------------------- non-finite
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        scaler = _grad_scaler(trainer)
        if scaler is not None:
            value = value / scaler.get_scale()
        self._loss_bad = self._loss_bad or not bool(torch.isfinite(value))
        self._loss_sum += float(value) if torch.isfinite(value) else 0.0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in _trainable(pl_module) if p.grad is not None]
        grad_bad = _grad_scaler(trainer) is None and nonfinite(grads)
        flags = torch.tensor([float(self._loss_bad), float(grad_bad), self._loss_sum], dtype=torch.float64,
                             device=pl_module.device)
        loss_bad, grad_bad, loss_sum = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        step = self._step = trainer.global_step + 1  # the optimizer step being taken (1 = the first)
        self._loss_sum, self._loss_bad = 0.0, False
        if loss_bad:
            self._fail(trainer, f"the loss (train/loss) is not finite at optimizer step {step}")
        if grad_bad:
            self._fail(trainer, f"the gradient norm is not finite at optimizer step {step} (before the update: the "
                                "weights are still the previous step's)")
        self._check_loss(trainer, loss_sum / trainer.world_size, step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.check_weights:  # right after each step, before any other hook or rollout reads the new weights
            self._hooks = [opt.register_step_post_hook(lambda *_: self._check_weights(trainer, pl_module))
                           for opt in trainer.optimizers]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _check_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad = torch.tensor([float(nonfinite(_trainable(pl_module)))], dtype=torch.float64, device=pl_module.device)
        if trainer.strategy.reduce(bad, reduce_op="sum").item():
            self._fail(trainer, f"a trainable weight is not finite after optimizer step {self._step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
        if isinstance(exception, DivergenceError):  # the current state is not a good one: do not save it
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.save_on_exception = False

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        kept = [p for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                for p in (cb.last_model_path, cb.best_model_path) if p]
        where = (f"the last good checkpoint is kept: {kept[0]}" if kept else "no checkpoint was saved before it")
        raise DivergenceError(f"training diverged: {what} (epoch {trainer.current_epoch}); nothing was exported, "
                              f"{where}. Lower `--model.optim.lr` or clip gradients (`--trainer.gradient_clip_val`).")

    # ------------------------------------------------------------------------------------------ optional
    def _check_loss(self, trainer: L.Trainer, loss: float, step: int) -> None:
        if self.max_loss is not None and loss > self.max_loss:
            self._flag(trainer, f"train/loss = {loss:.4g} at optimizer step {step} exceeds "
                                f"`DivergenceGuard.max_loss` = {self.max_loss:g}")
        if self.loss_spike_factor is not None and loss_spike(loss, self.recent, self.loss_spike_factor,
                                                             self.loss_spike_floor):
            self._flag(trainer, f"train/loss = {loss:.4g} at optimizer step {step} is more than "
                                f"{self.loss_spike_factor:g} x the largest of the last {len(self.recent)} steps "
                                f"({max(self.recent):.4g})")
        self.recent.append(loss)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reward_collapse is None and self.max_truncated_frac is None:
            return
        from sdzero_pl.contracts import RolloutData

        data = trainer.datamodule
        if not isinstance(data, RolloutData):
            raise TypeError(f"`DivergenceGuard.reward_collapse` / `max_truncated_frac` need a data module that "
                            f"generates rollouts, got {type(data).__name__}")
        stats = data.rollout_stats
        if not stats:
            return
        values = torch.tensor([stats["rollout/reward_mean"], stats["rollout/truncated_frac"]], dtype=torch.float64,
                              device=pl_module.device)
        reward, truncated = (trainer.strategy.reduce(values, reduce_op="sum") / trainer.world_size).tolist()
        epoch = trainer.current_epoch
        if self.reward_collapse is not None:
            collapsed = self.best_reward is not None and self.best_reward > 0 and \
                reward < self.reward_collapse * self.best_reward
            if self._strike("reward", collapsed):
                self._flag(trainer, f"rollout/reward_mean = {reward:.3g} in epoch {epoch} is below "
                                    f"{self.reward_collapse:g} x its best ({self.best_reward:.3g}) for "
                                    f"{self.patience} epoch(s)")
            self.best_reward = reward if self.best_reward is None else max(self.best_reward, reward)
        if self.max_truncated_frac is not None and self._strike("truncated", truncated >= self.max_truncated_frac):
            self._flag(trainer, f"rollout/truncated_frac = {truncated:.3g} in epoch {epoch}: rollouts at the length "
                                f"cap for {self.patience} epoch(s) (`DivergenceGuard.max_truncated_frac` = "
                                f"{self.max_truncated_frac:g})")

    def _strike(self, rule: str, hit: bool) -> bool:
        self.strikes[rule] = self.strikes[rule] + 1 if hit else 0
        return self.strikes[rule] >= self.patience

    def _flag(self, trainer: L.Trainer, what: str) -> None:
        if self.action == "stop":
            self._fail(trainer, what)
        rank_zero_warn(f"DivergenceGuard: {what}")

    # --------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "best_reward": self.best_reward, "strikes": dict(self.strikes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent.extend(state_dict["recent"])
        self.best_reward, self.strikes = state_dict["best_reward"], dict(state_dict["strikes"])


def _trainable(pl_module: L.LightningModule) -> list[torch.Tensor]:
    return [p for p in pl_module.parameters() if p.requires_grad]


def _grad_scaler(trainer: L.Trainer):
    """The precision plugin's GradScaler (``16-mixed``), or None."""
    from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision

    plugin = trainer.precision_plugin
    return plugin.scaler if isinstance(plugin, (MixedPrecision, FSDPPrecision)) else None


def guard_callbacks(pl_module: L.LightningModule) -> list[L.Callback]:
    """What a training module's ``configure_callbacks`` returns: a default :class:`DivergenceGuard`, unless the
    trainer already has one (the user's, with its optional rules)."""
    trainer = pl_module.trainer
    if any(isinstance(callback, DivergenceGuard) for callback in trainer.callbacks):
        return []
    return [DivergenceGuard()]
