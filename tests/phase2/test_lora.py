"""Phase 2 in LoRA mode (one copy of the weights) through a real Trainer on the tiny model: the zero-adapter loss is
the full model's, only adapters train, the teacher is the adapters-off base and changes only at a sync, where it
becomes the student exactly, resume restores base + adapter + optimizer, and the export round-trips."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from callbacks import TeacherSync
from perf.phase2_step import plan_batches, stub_trainer, synthetic_examples
from sdzero_pl.core.lora import ADAPTER, ADAPTER_DIR, LoraArgs, base_forward, lora_layers
from sdzero_pl.core.models import load_model
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.data.batching import Batching
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase2.distill import SelfDistillModule
from sdzero_pl.phase2.onpolicy import OnPolicyDataModule
from sdzero_pl.rollout import HFRollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LORA = LoraArgs(rank=4, alpha=8.0)
PROBE = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def _fit(tmp_path, model_dir, questions, *, epochs=2, dtype="float32", callbacks=(), ckpt_path=None, lora=LORA,
         lr=1e-2, **trainer_kwargs):
    module = SelfDistillModule(model_dir, dtype=dtype, top_k=8, optim=OptimArgs(lr=lr), lora=lora,
                               export_dir=str(tmp_path / "export"))
    data = OnPolicyDataModule(QuestionSource(questions, id_field="id", shuffle=True), prompts_per_epoch=8,
                              batch_size=4, max_teacher_len=128,
                              rollout=HFRollout(max_new_tokens=16, show_progress=False))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=list(callbacks),
                        **{"enable_checkpointing": False, **trainer_kwargs})
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def _teacher_logits(module) -> torch.Tensor:
    return module.score("teacher", lambda model, ids: model(ids).logits.detach().clone(), PROBE)


def _student_logits(module) -> torch.Tensor:
    module.policy.eval()
    try:
        return module.policy(PROBE).logits.detach().clone()
    finally:
        module.policy.train()


def _module(model_dir, lora, batch_count=2):
    module = SelfDistillModule(model_dir, dtype="float64", top_k=8, lora=lora)
    module.configure_model()
    module.trainer = stub_trainer(accumulate=batch_count)
    return module


def test_with_zero_adapters_the_lora_loss_is_the_full_model_loss_and_its_gradient_the_projection(tiny_model_dir):
    examples = synthetic_examples([12, 5, 9, 3], vocab=100, prompt_len=6, control_len=4)
    batches, _, _ = plan_batches(examples, batch_size=2, accumulate=2, batching=Batching())
    full, lora = _module(tiny_model_dir, None), _module(tiny_model_dir, LORA)
    assert lora.teacher is None and full.teacher is not None
    for batch in batches:
        full_loss, full_metrics, _ = full.distill_loss(batch)
        lora_loss, lora_metrics, _ = lora.distill_loss(batch)
        torch.testing.assert_close(lora_loss, full_loss, rtol=0, atol=1e-12)
        for key in ("train/kl_forward", "train/kl_reverse", "teacher/topk_mass"):
            torch.testing.assert_close(lora_metrics[key], full_metrics[key], rtol=0, atol=1e-12)
        full_loss.backward()
        lora_loss.backward()
    # d loss / d B = s * (d loss / d W) @ A^T at B = 0 (and d loss / d A = 0): LoRA sees the full gradient, projected
    full_params = dict(full.policy.named_parameters())
    for name, layer in lora.policy.named_modules():
        if layer in lora_layers(lora.policy):
            grad_w = full_params[f"{name}.weight"].grad
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            torch.testing.assert_close(b.grad, layer.scaling[ADAPTER] * grad_w @ a.T, rtol=1e-9, atol=1e-12)
            assert float(a.grad.abs().max()) == 0.0 and float(b.grad.abs().max()) > 0.0


def test_a_lora_fit_changes_only_the_adapters_and_exports_the_merged_model_and_the_adapter(tmp_path, tiny_model_dir,
                                                                                            questions_file):
    start = dict(load_model(tiny_model_dir, "float32").named_parameters())
    start_logits = load_model(tiny_model_dir, "float32")(PROBE).logits
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=2)
    assert trainer.global_step == 4 and module.teacher is None
    changed, frozen = [], []
    for name, param in module.policy.named_parameters():
        (changed if param.requires_grad else frozen).append(name)
        if not param.requires_grad:
            assert torch.equal(param, start[name.replace(".base_layer", "")]), name
    assert frozen and len(changed) == 2 * len(lora_layers(module.policy))
    assert all(float(layer.lora_B[ADAPTER].weight.detach().abs().max()) > 0 for layer in lora_layers(module.policy))
    torch.testing.assert_close(_teacher_logits(module), start_logits, rtol=0, atol=0)  # the teacher never moved
    student = _student_logits(module)
    assert not torch.allclose(student, start_logits)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert {n for n, _ in exported.named_parameters()} == set(start)  # a plain HF model, no adapter names
    torch.testing.assert_close(exported(PROBE).logits, student, rtol=1e-5, atol=1e-5)
    adapter = PeftModel.from_pretrained(load_model(tiny_model_dir, "float32"), tmp_path / "export" / ADAPTER_DIR)
    torch.testing.assert_close(adapter(PROBE).logits, student, rtol=1e-5, atol=1e-5)


class TeacherProbe(L.Callback):
    """The teacher's logits on a fixed probe before every training batch, with the syncs done so far."""

    def __init__(self, sync: TeacherSync):
        self.sync, self.seen = sync, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((self.sync.syncs, _teacher_logits(pl_module)))


def test_the_teacher_changes_only_at_a_sync_and_then_equals_the_student(tmp_path, tiny_model_dir, questions_file):
    sync = TeacherSync(every_n_steps=2)
    probe = TeacherProbe(sync)
    module, trainer = _fit(tmp_path, tiny_model_dir, questions_file, epochs=3, dtype="float64", callbacks=[probe, sync])
    assert trainer.global_step == 6 and sync.syncs == 3 and module.teacher_syncs == 3
    rounds: dict[int, list[torch.Tensor]] = {}
    for syncs, logits in probe.seen:
        rounds.setdefault(syncs, []).append(logits)
    assert sorted(rounds) == [0, 1, 2]
    for logits in rounds.values():  # between syncs the adapters-off base is frozen
        assert all(torch.equal(x, logits[0]) for x in logits)
    assert not torch.allclose(rounds[0][0], rounds[1][0]) and not torch.allclose(rounds[1][0], rounds[2][0])
    # the sync itself: the new teacher (adapters off) is the student before the sync, float64
    student = _student_logits(module)
    module.sync_teacher()
    torch.testing.assert_close(_teacher_logits(module), student, rtol=0, atol=1e-12)
    torch.testing.assert_close(_student_logits(module), student, rtol=0, atol=1e-12)
    assert all(float(layer.lora_B[ADAPTER].weight.detach().abs().max()) == 0 for layer in lora_layers(module.policy))
    # after syncs the adapter no longer applies to the start model: only the merged model is exported
    assert not (tmp_path / "export" / ADAPTER_DIR).exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float64)
    torch.testing.assert_close(exported(PROBE).logits, student, rtol=0, atol=1e-10)


def test_resume_restores_base_adapter_and_optimizer(tmp_path, tiny_model_dir, questions_file):
    straight, _ = _fit(tmp_path / "a", tiny_model_dir, questions_file, epochs=2,
                       callbacks=[TeacherSync(every_n_steps=3)])
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "b", tiny_model_dir, questions_file, epochs=1, callbacks=[ckpt, TeacherSync(every_n_steps=3)],
         enable_checkpointing=True)
    resumed, trainer = _fit(tmp_path / "c", tiny_model_dir, questions_file, epochs=2,
                            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), callbacks=[TeacherSync(every_n_steps=3)])
    assert trainer.global_step == 4 and resumed.teacher_syncs == straight.teacher_syncs == 1
    for (name, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)  # base (synced at step 3) and adapters


def test_a_separate_teacher_with_lora_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--model\.teacher_name_or_path.*--model\.lora"):
        SelfDistillModule(tiny_model_dir, teacher_name_or_path=tiny_model_dir, lora=LORA)


def test_teacher_pass_runs_the_base_in_eval_mode_and_leaves_the_student_training(tiny_model_dir):
    module = _module(tiny_model_dir, LoraArgs(rank=4, dropout=0.5))
    module.policy.train()
    modes = module.score("teacher", lambda model: {m.training for m in model.modules()})
    assert modes == {False} and module.policy.training
    assert base_forward(module.policy, lambda model: model.training) is False
