"""LoRA mode of every training module (``--model.lora.*``): the policy trains low-rank adapters on frozen base weights.

SD-Zero with ONE copy of the weights (README "LoRA"): at the start of Phase 2 the student is the SRT model plus a
zero adapter (B = 0), so the frozen teacher is exactly the same module with its adapters switched off
(:func:`base_forward`); no second model is loaded. Teacher synchronisation folds each adapter into its base weight,
``W <- W + s * B @ A``, and zeroes B (:func:`merge_adapters_`): the new teacher (adapters off) is the current
student, and the student itself is unchanged. A is kept, so no random draw happens and every rank stays identical
(ReLoRA, Lialin et al. 2023, re-draws A and prunes the optimizer state; here the AdamW moments are kept, as the full
fine-tune's hard copy keeps them).

Adapters come from ``peft`` (``inject_adapter_in_model``: the model stays a plain Hugging Face model, so sharding,
``hidden_states`` and HF ``generate`` work on it unchanged), in float32 (float64 for a float64 model) whatever the
base dtype: an AdamW update of 5e-6 vanishes in bf16. Whatever leaves the trainer (the vLLM weight push, the HF
export) is merged on the way out (:func:`hf_named_tensors`), one layer at a time; the export also writes the adapter
alone in PEFT's format (:func:`write_adapter`).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; the only one the project uses
ADAPTER_DIR = "adapter"  # the adapter alone, inside the HF export
_LORA_NAME = re.compile(r"^(?P<prefix>.+)\.(?:(?P<base>base_layer)\.(?P<kind>weight|bias)|lora_(?P<ab>[AB])\.default\.weight)$")


@dataclass(frozen=True)
class LoraArgs:
    """LoRA adapters on the policy (``--model.lora.*``; null = full fine-tune, the default)."""

    rank: int = 16
    """adapter rank r."""
    alpha: float = 32.0
    """scaling numerator: the adapter adds ``alpha / rank * B @ A`` (``alpha / sqrt(rank)`` with ``rslora``)."""
    dropout: float = 0.0
    """dropout on the adapter's input (training only; the teacher pass never sees it)."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """module names to adapt (e.g. [q_proj, k_proj, v_proj, o_proj]), a regex, or "all-linear" (every linear layer
    of the decoder; the LM head is never adapted: the distillation loss reads its weight directly)."""
    rslora: bool = False
    """rank-stabilised scaling ``alpha / sqrt(rank)`` (Kalajdzievski 2023) instead of ``alpha / rank``."""
    seed: int = 0
    """seed of the adapters' random A (B starts at zero); a fixed seed gives every rank the same adapters."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"`--model.lora.rank` must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"`--model.lora.alpha` must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`--model.lora.dropout` must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError(f"`--model.lora.target_modules` must name at least one module, got {self.target_modules!r}")
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        head = [n for n in names if n in ("lm_head", "embed_tokens")]
        if head:
            raise ValueError(f"`--model.lora.target_modules` must not adapt {head}: the LM head and the embeddings "
                             "stay plain weights (the distillation loss multiplies with the head's weight directly)")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    @classmethod
    def hold(cls, module, value: LoraArgs | dict | None) -> LoraArgs | None:
        """``value`` as LoraArgs (rebuilt from its dict form: LightningCLI's and a checkpoint's hyper-parameters) or
        None, recorded in ``module.hparams["lora"]`` as plain types (checkpoints load with ``weights_only=True``)."""
        if value is None:
            module.hparams["lora"] = None
            return None
        lora = value if isinstance(value, cls) else cls(**value)
        record = asdict(lora)
        if not isinstance(lora.target_modules, str):
            record["target_modules"] = list(lora.target_modules)
        module.hparams["lora"] = record
        return lora

    def peft_config(self):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_rslora=self.rslora, bias="none", task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------- adapters
def attach_lora(model: nn.Module, lora: LoraArgs) -> nn.Module:
    """Inject zero-initialised adapters (B = 0) into ``model`` in place and freeze everything else: the adapted model
    computes exactly what ``model`` did. The adapters' A is drawn from ``lora.seed`` (the global RNG is untouched)."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        try:
            model = inject_adapter_in_model(lora.peft_config(), model, adapter_name=ADAPTER)
        except ValueError as error:  # e.g. target modules that match nothing
            raise ValueError(f"`--model.lora.target_modules` {lora.target_modules!r}: {error}") from None
    layers = lora_layers(model)
    head = model.get_output_embeddings()
    if not layers or not isinstance(head, nn.Linear):
        raise ValueError(f"`--model.lora.target_modules` {lora.target_modules!r} must adapt decoder layers only, "
                         f"and at least one")
    base_dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    adapter_dtype = torch.promote_types(base_dtype, torch.float32)  # float32 for bf16 / fp16 bases
    for layer in layers:
        for kind in ("lora_A", "lora_B"):
            getattr(layer, kind)[ADAPTER].to(adapter_dtype)
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers of ``model`` (any wrapper around it); empty when it has none."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module | None) -> bool:
    return model is not None and bool(lora_layers(model))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (LoRA: the adapters; full fine-tune: all)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model: every adapter disabled (peft's ``enable_adapters``, as ``PeftModel.disable_adapter`` does)
    for the duration, then enabled again."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def base_forward(model: nn.Module, fn: Callable, *args):
    """``fn(model, *args)`` as the frozen base computes it: adapters off, eval mode (as the full fine-tune's frozen
    teacher or reference always is), the model's own mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with adapters_off(model):
            return fn(model, *args)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ merging
def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s * B @ A`` in the adapter's precision, rounded once to W's dtype. (out, in), (r, in), (out, r)."""
    delta = (lora_b @ lora_a.to(lora_b.dtype)) * scaling  # (out, in)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


@torch.no_grad()
def merge_adapters_(role: nn.Module) -> int:
    """Fold every adapter into its base weight and zero its B, in place (the LoRA teacher sync): afterwards the base
    (adapters off) computes what the adapted model computed before, and the adapted model is unchanged. Works on
    plain / DDP models, FSDP2 shards (each rank updates its rows of W with its rows of B and the gathered A: W and B
    are both sharded on their output dimension) and FSDP1 (one unit gathered at a time, written back). Collective
    under sharding: every rank must call it. Returns the number of merged layers."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [m for m in role.modules() if isinstance(m, FSDP)]
    if not units:
        layers = lora_layers(role)
        for layer in layers:
            _merge_layer(layer)
        return len(layers)
    with FSDP.summon_full_params(role, recurse=False, writeback=False):
        pass  # lazy initialisation from the real root, before any unit is gathered on its own
    merged = 0
    for unit in units:  # FSDP1: a unit's own parameters gathered, merged, written back to the shards
        nested = {id(m) for other in unit.modules() if other is not unit and isinstance(other, FSDP)
                  for m in other.modules()}
        owned = [m for m in lora_layers(unit) if id(m) not in nested]
        if owned:
            with FSDP.summon_full_params(unit, recurse=False, writeback=True):
                for layer in owned:
                    _merge_layer(layer)
            merged += len(owned)
    return merged


def _merge_layer(layer: nn.Module) -> None:
    from torch.distributed.tensor import DTensor, Shard

    weight, lora_a, lora_b = layer.base_layer.weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    scaling = layer.scaling[ADAPTER]
    if isinstance(weight, DTensor):
        for tensor in (weight, lora_b):
            assert tensor.placements == (Shard(0),), f"FSDP2 shards on dim 0, got {tensor.placements}"
        local = weight.to_local()
        local.copy_(merged_weight(local, lora_a.full_tensor(), lora_b.to_local(), scaling))
        lora_b.to_local().zero_()
    else:
        weight.copy_(merged_weight(weight, lora_a, lora_b, scaling))
        lora_b.zero_()


def hf_named_tensors(role: nn.Module, buffers: bool = False,
                     adapter: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`~sdzero_pl.core.sharding.full_named_tensors` as the plain HF checkpoint names them: each LoRA layer
    yields its merged weight ``W + s * B @ A`` under the base name (``...q_proj.weight``; a base bias as
    ``...q_proj.bias``), one layer at a time. Without adapters: the role's own tensors. ``adapter``: filled with
    each layer's A and B (CPU copies) under PEFT's names (``base_model.model.<layer>.lora_A.weight``). Collective
    under sharding (every rank consumes the iterator fully, in order)."""
    from sdzero_pl.core.sharding import clean_name, full_named_tensors, hf_model

    layers = {id(layer) for layer in lora_layers(role)}
    scales = {clean_name(name): module.scaling[ADAPTER] for name, module in hf_model(role).named_modules()
              if id(module) in layers}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in full_named_tensors(role, buffers):
        match = _LORA_NAME.match(name)
        if match is None or match["prefix"] not in scales:
            yield name, tensor
            continue
        prefix = match["prefix"]
        if match["base"] and match["kind"] == "bias":
            yield f"{prefix}.bias", tensor
            continue
        part = "W" if match["base"] else match["ab"]
        if adapter is not None and part != "W":
            adapter[f"base_model.model.{prefix}.lora_{part}.weight"] = tensor.detach().to("cpu", copy=True)
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == 3:  # FSDP1: all three live in one unit, valid until the iterator leaves it
            del pending[prefix]
            yield f"{prefix}.weight", merged_weight(parts["W"], parts["A"], parts["B"], scales[prefix])
    assert not pending, f"LoRA layers with missing tensors: {sorted(pending)}"


def gather_merged_state(role: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """The merged HF state dict and the adapter (PEFT names) on CPU, on global rank 0 only ((None, None) elsewhere);
    other ranks hold one gathered tensor at a time while they are assembled."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state, adapter = ({}, {}) if rank0 else (None, None)
    for name, tensor in hf_named_tensors(role, buffers=True, adapter=adapter):
        if rank0:
            state[name] = tensor.detach().to("cpu", copy=True)
    return state, adapter


def write_adapter(directory: str | Path, role: nn.Module, adapter: dict[str, torch.Tensor], base: str) -> Path:
    """The adapter alone in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
    ``PeftModel.from_pretrained(<base model>, directory)``; ``base`` is recorded as its ``base_model_name_or_path``."""
    from safetensors.torch import save_file

    from sdzero_pl.core.sharding import hf_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(hf_model(role).peft_config[ADAPTER])
    config.base_model_name_or_path = base
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return directory


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    return sum(p.numel() for p in trainable(model)), sum(p.numel() for p in model.parameters())


def lora_summary(model: nn.Module) -> str:
    train, total = parameter_counts(model)
    return (f"LoRA: {len(lora_layers(model))} adapted layers, {train:,} trainable parameters of {total:,} "
            f"({train / total:.2%}); the teacher / reference is the same model with its adapters off")



def lora_export(role: nn.Module, base: str, merges: int = 0) -> tuple[dict | None, Callable[[Path], None]]:
    """What :func:`~sdzero_pl.core.models.export_hf` needs to export a LoRA policy (collective: every rank calls it):
    the merged HF state dict (rank 0; None elsewhere) and ``extra(directory)``, which writes the adapter alone into
    the export's ``adapter/`` folder, for the model ``base`` it applies to. After ``merges`` teacher syncs the
    base weights are no longer ``base``'s, so no adapter is written then (the merged model holds everything)."""
    from lightning.pytorch.utilities import rank_zero_warn

    state, adapter = gather_merged_state(role)

    def extra(directory: Path) -> None:
        if merges:
            rank_zero_warn(f"the adapter alone is not exported: after {merges} teacher sync(s) it applies to the "
                           f"synced base weights, not to {base!r}; the merged model holds the trained weights")
            return
        write_adapter(Path(directory) / ADAPTER_DIR, role, adapter, base)

    return state, extra
