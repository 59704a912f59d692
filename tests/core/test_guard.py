"""The divergence guard: a NaN loss, gradient or weight injected at a chosen step stops training with an error that
names the step and the metric, exports nothing and keeps the last good checkpoint; the optional rules warn or
stop; a full disk during a real fit leaves no truncated checkpoint."""

from __future__ import annotations

import errno

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sdzero_pl.core import artifacts
from sdzero_pl.core.artifacts import AtomicCheckpointIO
from sdzero_pl.core.guard import DivergenceError, DivergenceGuard, loss_spike, nonfinite
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
from sdzero_pl.rollout import HFRollout

pytestmark = pytest.mark.usefixtures("one_thread")


class Injected(SelfDistillModule):
    """Phase 2 with a fault injected at optimizer step ``at`` (1 = the first): "loss" (NaN loss), "grad" (a finite
    loss whose gradient is NaN) or "weight" (a weight set to NaN by the optimizer step)."""

    def __init__(self, *args, fault: str, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault, self.at = fault, at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step + 1 == self.at:
            if self.fault == "loss":
                return loss * float("nan")
            if self.fault == "grad":
                weight = next(self.policy.parameters())
                return loss + 0.0 * (weight - weight.detach()).abs().sqrt().sum()  # value + 0, gradient inf * 0
        return loss

    def on_fit_start(self) -> None:  # registered before the guard's own hook, so it runs first
        def poison(optimizer, *args):
            if self.fault == "weight" and self.trainer.global_step + 1 == self.at:
                with torch.no_grad():
                    next(self.policy.parameters()).view(-1)[0] = float("nan")
        for optimizer in self.trainer.optimizers:
            optimizer.register_step_post_hook(poison)


def _fit(tmp_path, model_dir, questions, module, callbacks=(), epochs=3, checkpoint=True, rollout=None,
         save_on_exception=True):
    data = OnPolicyDataModule(QuestionSource(questions, id_field="id"), prompts_per_epoch=4, batch_size=4,
                              max_teacher_len=96, rollout=rollout or HFRollout(max_new_tokens=12, show_progress=False))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                            save_on_exception=save_on_exception)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_checkpointing=checkpoint, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[*callbacks, *([saver] if checkpoint else [])])
    trainer.fit(module, data)
    return trainer


def _module(model_dir, tmp_path, **kwargs):
    return Injected(model_dir, dtype="float32", top_k=8, optim=OptimArgs(lr=1e-2), export_dir=str(tmp_path / "export"),
                    **kwargs)


@pytest.mark.parametrize("fault, metric", [("loss", "the loss (train/loss) is not finite at optimizer step 2"),
                                           ("grad", "the gradient norm is not finite at optimizer step 2"),
                                           ("weight", "a trainable weight is not finite after optimizer step 2")])
def test_a_nan_at_a_chosen_step_stops_naming_step_and_metric_exports_nothing_keeps_the_good_checkpoint(
        tiny_model_dir, questions_file, tmp_path, fault, metric):
    module = _module(tiny_model_dir, tmp_path, fault=fault, at=2)
    with pytest.raises(DivergenceError, match="training diverged") as error:
        _fit(tmp_path, tiny_model_dir, questions_file, module)
    assert metric in str(error.value)
    assert "nothing was exported" in str(error.value) and "step=1.ckpt" in str(error.value)
    assert not (tmp_path / "export").exists()
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=1.ckpt"], saved  # the diverged state was not saved, even with save_on_exception
    state = torch.load(tmp_path / "ckpt" / saved[0], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_every_training_module_installs_the_guard_and_atomic_checkpoints(tiny_model_dir, questions_file, tmp_path):
    module = _module(tiny_model_dir, tmp_path, fault="none", at=0)
    trainer = _fit(tmp_path, tiny_model_dir, questions_file, module, epochs=1)
    assert sum(isinstance(c, DivergenceGuard) for c in trainer.callbacks) == 1
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (tmp_path / "export" / "config.json").is_file()  # a healthy run exports as before
    own = DivergenceGuard(max_loss=1e9)  # a configured guard is kept, not doubled
    trainer = _fit(tmp_path / "b", tiny_model_dir, questions_file, _module(tiny_model_dir, tmp_path / "b", fault="none",
                                                                          at=0), callbacks=[own], epochs=1)
    assert [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)] == [own]


def test_a_full_disk_during_a_fit_leaves_the_previous_checkpoint_and_no_truncated_one(
        tiny_model_dir, questions_file, tmp_path, monkeypatch):
    saves = []
    real = artifacts.save_torch

    def fills_the_disk(obj, handle):  # the second checkpoint meets a full disk half way
        saves.append(1)
        if len(saves) == 2:
            handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, handle)

    monkeypatch.setattr(artifacts, "save_torch", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        _fit(tmp_path, tiny_model_dir, questions_file, _module(tiny_model_dir, tmp_path, fault="none", at=0),
             save_on_exception=False)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)["global_step"] == 1
    assert not (tmp_path / "export").exists()


def test_the_optional_rules_warn_or_stop(tiny_model_dir, questions_file, tmp_path):
    # every rollout hits a 2-token cap: "all truncated" stops the run at the first epoch
    guard = DivergenceGuard(max_truncated_frac=1.0, action="stop")
    with pytest.raises(DivergenceError, match=r"rollout/truncated_frac = 1 in epoch 0"):
        _fit(tmp_path, tiny_model_dir, questions_file, _module(tiny_model_dir, tmp_path, fault="none", at=0),
             callbacks=[guard], checkpoint=False, rollout=HFRollout(max_new_tokens=2, show_progress=False))
    assert not (tmp_path / "export").exists()
    warn = DivergenceGuard(max_loss=1e-12, action="warn")  # any real loss exceeds it: warned, training goes on
    with pytest.warns(UserWarning, match=r"train/loss = .* at optimizer step 1 exceeds `DivergenceGuard.max_loss`"):
        _fit(tmp_path / "w", tiny_model_dir, questions_file, _module(tiny_model_dir, tmp_path / "w", fault="none",
                                                                     at=0), callbacks=[warn], epochs=1, checkpoint=False)
    assert (tmp_path / "w" / "export" / "config.json").is_file()


def test_guard_rules_and_arguments():
    assert nonfinite([torch.ones(2), torch.tensor([1.0, float("inf")])])
    assert not nonfinite([torch.ones(2), torch.zeros(0)]) and not nonfinite([])
    assert loss_spike(2704.0, [0.0007, 0.0009], factor=100, floor=0.01)  # the lr=10 run of the issue
    assert not loss_spike(0.01, [0.0007, 0.0009], factor=100, floor=0.01)  # learning near 0 is not a spike
    assert not loss_spike(5.0, [], factor=100, floor=0.01)
    with pytest.raises(ValueError, match="`DivergenceGuard.action` must be one of"):
        DivergenceGuard(action="panic")
    with pytest.raises(ValueError, match="`DivergenceGuard.max_loss` must be > 0 or null, got 0"):
        DivergenceGuard(max_loss=0)
