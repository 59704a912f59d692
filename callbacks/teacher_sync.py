"""Teacher synchronization ("iterative self-evolution", docs/method.md "Phase 2"; paper Fig. 5).

Distillation also improves the model's revision ability, so the frozen teacher can be replaced by the current
student: a hard copy every ``every_n_steps`` optimizer steps, and/or when a monitored metric stops improving
for ``patience`` epochs. The module must provide ``sync_teacher()`` (:class:`TeacherHolder`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L

from sdzero_pl.contracts import require


@runtime_checkable
class TeacherHolder(Protocol):
    """A module with a frozen teacher that can be replaced by the current student."""

    def sync_teacher(self) -> None: ...


class TeacherSync(L.Callback):
    """Copies the student into the teacher on a step schedule or on a plateau of a monitored metric."""

    def __init__(
        self,
        every_n_steps: int = 0,
        monitor: str | None = None,
        mode: str = "max",
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        """
        Args:
            every_n_steps: sync every N optimizer steps; 0 = never (the default).
            monitor: a logged metric (e.g. "rollout/reward_mean"); sync when it has not improved for ``patience``
                epochs. None = no plateau syncs.
            mode: "max" if larger is better for ``monitor``, "min" otherwise.
            patience: epochs without improvement before a plateau sync.
            min_delta: smallest change that counts as an improvement.
        """
        if every_n_steps < 0:
            raise ValueError(f"`every_n_steps` must be >= 0, got {every_n_steps}")
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")
        if patience < 1:
            raise ValueError(f"`patience` must be >= 1, got {patience}")
        self.every_n_steps = every_n_steps
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.syncs = 0
        self.best: float | None = None
        self.wait = 0
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, TeacherHolder, "callbacks.TeacherSync")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step != self._last_step and step % self.every_n_steps == 0:
            self._sync(pl_module, on_step=True)
        self._last_step = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is None:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"TeacherSync monitors {self.monitor!r}, which is not logged; logged: {sorted(trainer.callback_metrics)}"
            )
        value = float(trainer.callback_metrics[self.monitor])
        improved = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        )
        if improved:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._sync(pl_module, on_step=False)
            self.wait = 0
            self.best = None  # a new teacher starts a new round: measure its plateau afresh

    def _sync(self, pl_module: L.LightningModule, on_step: bool) -> None:
        pl_module.sync_teacher()
        self.syncs += 1
        pl_module.log("teacher/syncs", float(self.syncs), on_step=on_step, on_epoch=not on_step, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "best": self.best, "wait": self.wait, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.syncs = state_dict["syncs"]
        self.best = state_dict["best"]
        self.wait = state_dict["wait"]
        self._last_step = state_dict["last_step"]
