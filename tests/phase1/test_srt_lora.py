"""SRT (Phase 1) in LoRA mode: only adapters train, and the export is the merged model (what Phase 2 starts from),
with the hand-off record and the adapter alone in PEFT's format beside it."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sdzero_pl.core.lora import ADAPTER_DIR, LoraArgs
from sdzero_pl.core.models import load_model, load_tokenizer
from sdzero_pl.data.questions import QuestionSource
from sdzero_pl.phase1.data import TraceDataModule
from sdzero_pl.phase1.handoff import HANDOFF_FILE
from sdzero_pl.phase1.srt import SRT_OPTIM, SelfReviseSFTModule
from tests.helpers import assert_only_adapters_changed
from tests.phase1.test_srt import handcrafted_traces, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PROBE = torch.tensor([[5, 6, 7, 8, 9]])


def test_lora_srt_trains_the_adapters_only_and_exports_merged_model_handoff_and_adapter(tmp_path, tiny_model_dir,
                                                                                      questions_file):
    traces = write_jsonl(tmp_path / "hand.jsonl", handcrafted_traces(load_tokenizer(tiny_model_dir), 6))
    module = SelfReviseSFTModule(tiny_model_dir, dtype="float32", lora=LoraArgs(rank=4, dropout=0.1),
                                 optim=replace(SRT_OPTIM, lr=3e-2, warmup_ratio=0.0), export_dir=str(tmp_path / "hf"))
    data = TraceDataModule(QuestionSource(questions_file, id_field="id", num_questions=0), extra_traces_file=traces,
                           output_dir=str(tmp_path / "srt_data"), batch_size=2, max_length=256)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, max_epochs=3, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_only_adapters_changed(module.policy, tiny_model_dir)
    module.policy.eval()
    student = module.policy(PROBE).logits.detach()
    assert not torch.allclose(student, load_model(tiny_model_dir, "float32")(PROBE).logits)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(merged(PROBE).logits, student, rtol=1e-5, atol=1e-5)
    adapter = PeftModel.from_pretrained(load_model(tiny_model_dir, "float32"), tmp_path / "hf" / ADAPTER_DIR)
    torch.testing.assert_close(adapter(PROBE).logits, student, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "hf" / HANDOFF_FILE).is_file()
