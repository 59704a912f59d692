"""The baselines in LoRA mode (``--model.lora.*``) through a real Trainer on the tiny model: GRPO and RFT still learn
their toy task with adapters only, GRPO's KL reference is the adapters-off base and never moves, and both export the
merged model with the adapter alone beside it."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sdzero_pl.baselines.grpo import GRPOModule
from sdzero_pl.baselines.grpo_data import GroupRolloutDataModule
from sdzero_pl.baselines.rft import RFTDataModule
from sdzero_pl.core.lora import ADAPTER_DIR, LoraArgs, base_forward
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.core.optim import OptimArgs
from sdzero_pl.data.questions import QuestionSource, load_questions
from sdzero_pl.phase1.srt import SRT_OPTIM, SelfReviseSFTModule
from sdzero_pl.rollout import HFRollout
from tests.helpers import StartsWithDigit, assert_only_adapters_changed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LORA = LoraArgs(rank=8, alpha=16.0)
PROBE = torch.tensor([[5, 6, 7, 8, 9]])


def _trainer(tmp_path, epochs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, reload_dataloaders_every_n_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path))


def _assert_export_round_trips(module, export, model_dir):
    module.policy.eval()
    student = module.policy(PROBE).logits.detach()
    merged = AutoModelForCausalLM.from_pretrained(export)
    torch.testing.assert_close(merged(PROBE).logits, student, rtol=1e-5, atol=1e-5)
    adapter = PeftModel.from_pretrained(load_model(model_dir, "float32"), export / ADAPTER_DIR)
    torch.testing.assert_close(adapter(PROBE).logits, student, rtol=1e-5, atol=1e-5)


def _digit_probability(model, tokenizer, questions) -> float:
    from tests.baselines.test_grpo import digit_probability

    return digit_probability(model, tokenizer, questions)


def test_lora_grpo_learns_with_the_adapters_off_base_as_its_kl_reference(tmp_path, tiny_model_dir, questions_file):
    tokenizer, questions = load_tokenizer(tiny_model_dir), load_questions(questions_file, id_field="id")
    start = load_model(tiny_model_dir, "float32")
    module = GRPOModule(tiny_model_dir, dtype="float32", kl_coef=1e-3, lora=LORA, optim=OptimArgs(lr=3e-2),
                        export_dir=str(tmp_path / "export"))
    data = GroupRolloutDataModule(QuestionSource(questions_file, id_field="id", shuffle=True), reward=StartsWithDigit(),
                                  output_dir=str(tmp_path / "grpo_data"), prompts_per_epoch=8, group_size=8,
                                  batch_size=16, rollout=HFRollout(max_new_tokens=2, show_progress=False))
    trainer = _trainer(tmp_path, 4)
    trainer.fit(module, data)
    assert module.ref is None
    before = _digit_probability(start, tokenizer, questions)
    after = _digit_probability(module.policy, tokenizer, questions)
    assert after > 1.2 * before, (before, after)  # adapters only (no LM head): slower than full FT (2x)
    assert float(trainer.callback_metrics["train/kl_epoch"]) > 0
    assert_only_adapters_changed(module.policy, tiny_model_dir)
    reference = base_forward(module.policy, lambda model: model(PROBE).logits.detach())
    torch.testing.assert_close(reference, start(PROBE).logits, rtol=0, atol=0)  # the KL reference never moved
    _assert_export_round_trips(module, tmp_path / "export", tiny_model_dir)


def test_lora_rft_raises_the_likelihood_of_its_kept_samples(tmp_path, tiny_model_dir, questions_file):
    from tests.baselines.test_rft import mean_logp

    module = SelfReviseSFTModule(tiny_model_dir, dtype="float32", lora=LORA, export_dir=str(tmp_path / "export"),
                                 optim=replace(SRT_OPTIM, lr=3e-2, warmup_ratio=0.0, schedule="constant"))
    data = RFTDataModule(QuestionSource(questions_file, id_field="id", num_questions=16), reward=StartsWithDigit(),
                         output_dir=str(tmp_path / "rft_data"), samples_per_question=8, questions_per_chunk=8,
                         batch_size=4, max_length=128, show_progress=False,
                         rollout=HFRollout(max_new_tokens=3, show_progress=False))
    _trainer(tmp_path, 2).fit(module, data)
    examples = data.plan.stages[0]
    before, after = mean_logp(load_model(tiny_model_dir, "float32"), examples), mean_logp(module.policy, examples)
    assert after > before + 0.2, (before, after)  # adapters only (no LM head): full FT gains 1.6 here
    assert_only_adapters_changed(module.policy, tiny_model_dir)
    _assert_export_round_trips(module, tmp_path / "export", tiny_model_dir)


def test_a_separate_reference_with_lora_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--model\.ref_name_or_path.*--model\.lora"):
        GRPOModule(tiny_model_dir, kl_coef=0.1, ref_name_or_path=tiny_model_dir, lora=LORA)
