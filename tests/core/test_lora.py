"""LoRA pieces (sdzero_pl/core/lora.py) on the tiny model in float64: zero adapters change nothing, the adapters-off
model is the base, merging (teacher sync, vLLM push, export) gives the adapted model's function, and the adapter
alone loads with PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from sdzero_pl.core.lora import (
    ADAPTER, LoraArgs, adapters_off, attach_lora, base_forward, gather_merged_state, hf_named_tensors, lora_layers,
    merge_adapters_, merged_weight, trainable, write_adapter
)
from sdzero_pl.core.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _logits(model) -> torch.Tensor:
    return model(IDS).logits


def _adapted(model_dir: str, dtype: str = "float64", **lora) -> torch.nn.Module:
    """A LoRA model whose adapters are non-zero (as after training)."""
    model = attach_lora(load_model(model_dir, dtype), LoraArgs(rank=4, **lora))
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kwargs, flag", [({"rank": 0}, "lora.rank"), ({"alpha": 0.0}, "lora.alpha"),
                                           ({"dropout": 1.0}, "lora.dropout"),
                                           ({"target_modules": ("q_proj", "lm_head")}, "lora.target_modules"),
                                           ({"target_modules": ()}, "lora.target_modules")])
def test_bad_lora_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        LoraArgs(**kwargs)


def test_target_modules_that_match_nothing_name_the_flag(tiny_model_dir):
    with pytest.raises(ValueError, match=r"--model\.lora\.target_modules.*no_such_proj"):
        attach_lora(load_model(tiny_model_dir, "float32"), LoraArgs(target_modules=("no_such_proj",)))


def test_zero_adapters_change_nothing_and_only_they_train(tiny_model_dir):
    base = load_model(tiny_model_dir, "float64")
    rng = torch.get_rng_state()
    model = attach_lora(load_model(tiny_model_dir, "float64"), LoraArgs(rank=4, target_modules=("q_proj", "v_proj")))
    assert torch.equal(torch.get_rng_state(), rng)  # A is drawn from lora.seed, not the global stream
    assert torch.equal(_logits(model), _logits(base))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[4] for n in names} == {"q_proj", "v_proj"}
    again = attach_lora(load_model(tiny_model_dir, "float64"), LoraArgs(rank=4, target_modules=("q_proj", "v_proj")))
    for a, b in zip(trainable(model), trainable(again)):
        assert torch.equal(a, b)  # the same seed, the same adapters (every rank builds the same ones)


def test_adapters_are_float32_on_a_bf16_base(tiny_model_dir):
    model = attach_lora(load_model(tiny_model_dir, "bfloat16"), LoraArgs(rank=4))
    assert {p.dtype for p in trainable(model)} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert _logits(model).dtype == torch.bfloat16


def test_adapters_off_is_the_base_and_restores_training_state(tiny_model_dir):
    base, model = load_model(tiny_model_dir, "float64"), _adapted(tiny_model_dir)
    model.train()
    adapted = _logits(model)
    assert not torch.allclose(adapted, _logits(base))
    with adapters_off(model):
        torch.testing.assert_close(_logits(model), _logits(base), rtol=0, atol=0)
    seen = base_forward(model, lambda m: (m.training, _logits(m)))
    assert seen[0] is False and torch.equal(seen[1], _logits(base))
    assert model.training and all(p.requires_grad for p in trainable(model)) and len(trainable(model)) > 0
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0)


def test_merged_tensors_carry_the_plain_hf_names_and_the_adapted_function(tiny_model_dir):
    model = _adapted(tiny_model_dir)
    plain = load_model(tiny_model_dir, "float64")
    merged = dict(hf_named_tensors(model))
    assert list(merged) == [n for n, _ in plain.named_parameters()]  # tied head once, as in the checkpoint
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-12)


def test_merged_weight_rounds_once_to_the_base_dtype():
    weight, a, b = torch.randn(6, 5).bfloat16(), torch.randn(2, 5), torch.randn(6, 2)
    expected = (weight.float() + 0.5 * (b @ a)).bfloat16()
    assert torch.equal(merged_weight(weight, a, b, 0.5), expected) and merged_weight(weight, a, b, 0.5).dtype == weight.dtype


def test_merging_makes_the_base_the_adapted_model_and_leaves_the_adapted_model_as_it_was(tiny_model_dir):
    model = _adapted(tiny_model_dir)
    before = _logits(model)
    assert merge_adapters_(model) == len(lora_layers(model))
    with adapters_off(model):
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-12)  # the new teacher = the student
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-12)
    assert all(float(layer.lora_B[ADAPTER].weight.detach().abs().max()) == 0.0 for layer in lora_layers(model))
    assert all(float(layer.lora_A[ADAPTER].weight.detach().abs().max()) > 0.0 for layer in lora_layers(model))  # A kept


def test_the_adapter_alone_loads_with_peft_onto_the_base(tiny_model_dir, tmp_path):
    model = _adapted(tiny_model_dir, alpha=8.0, rslora=True)
    state, adapter = gather_merged_state(model)
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter) and len(adapter) == 28
    write_adapter(tmp_path / "adapter", model, adapter, tiny_model_dir)
    loaded = PeftModel.from_pretrained(load_model(tiny_model_dir, "float64"), tmp_path / "adapter")
    assert loaded.peft_config["default"].base_model_name_or_path == tiny_model_dir
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-12)
    torch.testing.assert_close(_logits(loaded.merge_and_unload()), _logits(model), rtol=0, atol=1e-12)
    plain = load_model(tiny_model_dir, "float64")
    plain.load_state_dict(state, strict=False)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-12)


def test_lora_args_are_recorded_as_plain_types():
    class Holder:
        hparams: dict = {}

    holder = Holder()
    lora = LoraArgs.hold(holder, {"rank": 4, "target_modules": ["q_proj"]})
    assert lora == LoraArgs(rank=4, target_modules=["q_proj"]) and lora.scaling == 32.0 / 4
    assert holder.hparams["lora"]["target_modules"] == ["q_proj"] and LoraArgs.hold(holder, None) is None
    assert holder.hparams["lora"] is None
