"""SelfDistillModule + OnPolicyDataModule through a real Trainer on the tiny model."""

import csv
import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from callbacks import TeacherSync
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.data.batching import Batching
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
from sdzero_pl.rollout import HFRollout
from tests.helpers import LongTailRollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CountingRollout(HFRollout):
    """HF rollouts that count generate calls (the data of one epoch must be generated once)."""

    calls = 0

    def generate(self, *args, **kwargs):
        CountingRollout.calls += 1
        return super().generate(*args, **kwargs)


def _fit(tmp_path, model_dir, questions, *, epochs=2, batch_size=4, accumulate=1, dtype="float32", callbacks=(),
         rollout=None, ckpt_path=None, lr=1e-2, prompts=8, logger=False, batching=Batching(), max_teacher_len=128,
         data_kwargs=None, log_every_n_steps=50, **module_kwargs):
    module = SelfDistillModule(model_dir, dtype=dtype, top_k=8, optim=OptimArgs(lr=lr),
                               export_dir=str(tmp_path / "export"), **module_kwargs)
    data = OnPolicyDataModule(QuestionSource(questions, id_field="id", shuffle=True), prompts_per_epoch=prompts,
                              batch_size=batch_size, batching=batching, max_teacher_len=max_teacher_len,
                              rollout=rollout or HFRollout(max_new_tokens=16, show_progress=False),
                              **(data_kwargs or {}))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=list(callbacks),
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_two_steps_change_the_student_and_not_the_teacher(tmp_path, tiny_model_dir, questions_file):
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=2)
    assert trainer.global_step == 4
    before = dict(start.named_parameters())
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    for name, param in module.teacher.named_parameters():
        assert torch.equal(param, before[name]) and not param.requires_grad
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    for key in ("train/kl_forward_epoch", "train/kl_reverse_epoch", "rollout/reward_mean", "rollout/len_mean",
                "rollout/truncated_frac", "teacher/topk_mass_epoch", "time/generate_s"):
        assert key in trainer.callback_metrics, key
    ledger = json.loads((tmp_path / "export" / "budget.json").read_text())
    assert ledger["phases"]["phase2/rollout"]["generations"] == 2 * 8  # 2 epochs x 8 prompts, one sample each
    assert ledger["phases"]["phase2/rollout"]["tokens"] > 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, param in exported.named_parameters():
        torch.testing.assert_close(param, dict(module.policy.named_parameters())[name])


class AskAgain(L.Callback):
    """Asks for the dataloader at the extra moments Lightning and users do."""

    def on_train_start(self, trainer, pl_module):
        assert trainer.estimated_stepping_batches > 0

    def on_train_batch_start(self, trainer, *args):
        trainer.datamodule.train_dataloader()


def test_each_epoch_generates_exactly_once(tmp_path, tiny_model_dir, questions_file):
    CountingRollout.calls = 0
    _fit(tmp_path, tiny_model_dir, questions_file, epochs=3, callbacks=[AskAgain()],
         rollout=CountingRollout(max_new_tokens=8, show_progress=False))
    assert CountingRollout.calls == 3


def test_microbatch_split_does_not_change_the_update_float64(tmp_path, tiny_model_dir, questions_file):
    whole, _ = _fit(tmp_path / "a", tiny_model_dir, questions_file, epochs=1, batch_size=4, accumulate=1,
                    dtype="float64", prompts=4)
    split, _ = _fit(tmp_path / "b", tiny_model_dir, questions_file, epochs=1, batch_size=1, accumulate=4,
                    dtype="float64", prompts=4)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).named_parameters())
    for (name, a), (_, b) in zip(whole.policy.named_parameters(), split.policy.named_parameters()):
        assert not torch.equal(a, start[name])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class MicroBatchShapes(L.Callback):
    """The (rows, teacher length) of every micro-batch, and the trainer's accumulation while it trained."""

    def __init__(self):
        self.shapes, self.accumulate = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["teacher_ids"].shape))
        self.accumulate.append(trainer.accumulate_grad_batches)


def test_length_aware_batching_gives_the_fixed_count_update_float64(tmp_path, tiny_model_dir, questions_file):
    kwargs = dict(epochs=2, batch_size=2, accumulate=3, dtype="float64", prompts=12, max_teacher_len=256,
                  rollout=LongTailRollout(max_new_tokens=48, temperature=1.0, show_progress=False))
    fixed, fixed_trainer = _fit(tmp_path / "a", tiny_model_dir, questions_file, **kwargs)
    shapes = MicroBatchShapes()
    aware, trainer = _fit(tmp_path / "b", tiny_model_dir, questions_file, batching=Batching("tokens", 400),
                          callbacks=[shapes], **kwargs)
    assert trainer.global_step == fixed_trainer.global_step == 4  # 12 prompts / (2 x 3) = 2 steps per epoch
    stats = trainer.datamodule.rollout_stats
    assert stats["train/padding_frac"] < fixed_trainer.datamodule.rollout_stats["train/padding_frac"]
    assert len({rows for rows, _ in shapes.shapes}) > 1  # micro-batches of different sizes
    assert all(rows == 1 or rows * length <= 400 for rows, length in shapes.shapes)
    assert shapes.accumulate[-1] == int(stats["train/micro_batches_per_step"])  # set for each epoch
    assert trainer.accumulate_grad_batches == 3  # the user's again after the fit
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).named_parameters())
    for (name, a), (_, b) in zip(fixed.policy.named_parameters(), aware.policy.named_parameters()):
        assert not torch.equal(a, start[name])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def test_padding_and_prompt_tokens_do_not_change_the_loss(tmp_path, tiny_model_dir, questions_file):
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=1, dtype="float64", prompts=4)
    batch = trainer.datamodule._epoch_data.batches[0]
    base = module.distill_loss(batch)[0].detach()
    edited = {k: v.clone() for k, v in batch.items()}
    for role in ("student", "teacher"):
        pads = edited[f"{role}_attention_mask"] == 0
        edited[f"{role}_ids"][pads] = 7  # different padding ids
    assert torch.equal(module.distill_loss(edited)[0].detach(), base)
    # a token outside the loss (the teacher's first copy) may change the loss; a padded row of zeros may not
    wider = {k: torch.cat([v, torch.zeros_like(v[:, :3])], dim=1) if v.dim() == 2 else v for k, v in batch.items()}
    torch.testing.assert_close(module.distill_loss(wider)[0].detach(), base)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_identical_student_and_teacher_on_the_same_context_give_exactly_zero(tmp_path, tiny_model_dir,
                                                                             questions_file, dtype):
    # the teacher is synced to the student after every step and reads the student's own context ("question")
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=1, dtype=dtype, drift_every_n_steps=1,
                           callbacks=[TeacherSync(every_n_steps=1)], data_kwargs={"teacher_context": "question"})
    module.policy.eval()  # the teacher runs in eval mode; the student's dropout is 0 anyway
    for batch in trainer.datamodule._epoch_data.batches:
        loss, metrics, _ = module.distill_loss(batch)
        assert float(loss) == 0.0 and float(metrics["train/kl_forward"]) == 0.0, dtype
        assert float(metrics["train/kl_reverse"]) == 0.0
        tolerance = 2e-2 if dtype == "bfloat16" else 1e-5  # the ids come from the full head in the weights' dtype
        assert float(metrics["student/topk_mass"]) == pytest.approx(float(metrics["teacher/topk_mass"]),
                                                                     abs=tolerance)


def test_the_drift_monitor_logs_every_n_steps_and_the_tail_term_trains(tmp_path, tiny_model_dir, questions_file):
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "csv")
    _, trainer = _fit(tmp_path / "a", tiny_model_dir, questions_file, epochs=2, batch_size=4, drift_every_n_steps=2,
                      logger=logger, log_every_n_steps=1)
    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    mass = {int(r["step"]): float(r["student/topk_mass_step"]) for r in rows if r.get("student/topk_mass_step")}
    assert sorted(mass) == [0, 1, 2, 3] and all(0.0 < m <= 1.0 for m in mass.values())
    # measured at optimizer steps 0 and 2; in between Lightning repeats the latest value
    assert mass[0] == mass[1] != mass[2] == mass[3]
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    tailed, trainer = _fit(tmp_path / "b", tiny_model_dir, questions_file, epochs=1, tail=True, drift_every_n_steps=0)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert "student/topk_mass_epoch" in trainer.callback_metrics  # the tail term computes it anyway
    assert all(not torch.equal(p, start[n]) for n, p in tailed.policy.named_parameters())


def test_teacher_sync_copies_the_student_every_n_steps(tmp_path, tiny_model_dir, questions_file):
    sync = TeacherSync(every_n_steps=1)
    module, _ = _fit(tmp_path, tiny_model_dir, questions_file, epochs=1, callbacks=[sync])
    assert sync.syncs == 2
    student = dict(module.policy.named_parameters())
    for name, param in module.teacher.named_parameters():
        assert torch.equal(param, student[name]) and not param.requires_grad


def test_plateau_sync_fires_when_the_metric_stops_improving(tmp_path, tiny_model_dir, questions_file):
    sync = TeacherSync(monitor="train/loss_epoch", mode="max", patience=1, min_delta=1e9)
    _fit(tmp_path, tiny_model_dir, questions_file, epochs=3, callbacks=[sync])
    assert sync.syncs == 1  # epoch 1 "did not improve" by 1e9 -> sync; epoch 2 starts a new round


def test_removing_other_callbacks_does_not_change_the_weights(tmp_path, tiny_model_dir, questions_file):
    plain, _ = _fit(tmp_path / "a", tiny_model_dir, questions_file, epochs=2)
    extra = [TeacherSync(every_n_steps=0), L.pytorch.callbacks.LearningRateMonitor(), L.pytorch.callbacks.Timer()]
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path / "tb")
    with_callbacks, _ = _fit(tmp_path / "b", tiny_model_dir, questions_file, epochs=2, callbacks=extra, logger=logger)
    for (_, a), (_, b) in zip(plain.policy.named_parameters(), with_callbacks.policy.named_parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batching", [Batching(), Batching("tokens", 100)], ids=["count", "tokens"])
def test_resume_restores_student_teacher_optimizer_and_data_position(tmp_path, tiny_model_dir, questions_file,
                                                                     batching):
    rollout = dict(max_new_tokens=16, show_progress=False)
    straight, _ = _fit(tmp_path / "a", tiny_model_dir, questions_file, epochs=2, batching=batching,
                       rollout=LongTailRollout(**rollout), callbacks=[TeacherSync(every_n_steps=3)])
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = SelfDistillModule(tiny_model_dir, dtype="float32", top_k=8, optim=OptimArgs(lr=1e-2),
                               export_dir=str(tmp_path / "e1"))
    data = OnPolicyDataModule(QuestionSource(questions_file, id_field="id", shuffle=True), prompts_per_epoch=8,
                              batch_size=4, batching=batching, max_teacher_len=128, rollout=LongTailRollout(**rollout))
    first = L.Trainer(accelerator="cpu", max_epochs=1, reload_dataloaders_every_n_epochs=1, logger=False,
                      enable_progress_bar=False, callbacks=[ckpt_cb, TeacherSync(every_n_steps=3)])
    first.fit(module, data)
    resumed, trainer = _fit(tmp_path / "b", tiny_model_dir, questions_file, epochs=2, batching=batching,
                            rollout=LongTailRollout(**rollout), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                            callbacks=[TeacherSync(every_n_steps=3)])
    assert trainer.global_step == 4
    for role in ("policy", "teacher"):
        for (name, a), (_, b) in zip(getattr(straight, role).named_parameters(), getattr(resumed, role).named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{role}.{name}")


def test_a_resumed_run_exports_where_the_run_it_resumes_exports(tmp_path, tiny_model_dir, questions_file):
    def fit(root, epochs, ckpt_path=None):
        module = SelfDistillModule(tiny_model_dir, dtype="float32", top_k=8, optim=OptimArgs(lr=1e-2))
        data = OnPolicyDataModule(QuestionSource(questions_file, id_field="id"), prompts_per_epoch=4, batch_size=4,
                                  max_teacher_len=96, rollout=HFRollout(max_new_tokens=8, show_progress=False))
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, reload_dataloaders_every_n_epochs=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(module, data, ckpt_path=ckpt_path)

    fit(tmp_path / "first", 1)
    first = json.loads((tmp_path / "first" / "hf_model" / "budget.json").read_text())
    fit(tmp_path / "elsewhere", 2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # another default_root_dir
    assert not (tmp_path / "elsewhere" / "hf_model").exists()
    resumed = json.loads((tmp_path / "first" / "hf_model" / "budget.json").read_text())
    assert (first["total"]["generations"], resumed["total"]["generations"]) == (4, 8)


@pytest.mark.parametrize("kwargs, flag", [({"top_k": 0}, "top_k"), ({"divergence": "js"}, "divergence"),
                                           ({"drift_every_n_steps": -1}, "drift_every_n_steps"),
                                           ({"optim": {"schedule": "step"}}, "optim.schedule"),
                                           ({"dtype": "int8"}, "dtype")])
def test_bad_flags_name_the_flag_and_value(tiny_model_dir, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        kwargs = {k: OptimArgs(**v) if k == "optim" else v for k, v in kwargs.items()}
        module = SelfDistillModule(tiny_model_dir, **kwargs)
        module.configure_model()


def test_on_policy_data_needs_reloading_every_epoch(tmp_path, tiny_model_dir, questions_file):
    module = SelfDistillModule(tiny_model_dir, dtype="float32")
    data = OnPolicyDataModule(QuestionSource(questions_file), rollout=HFRollout(max_new_tokens=4, show_progress=False))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(module, data)
