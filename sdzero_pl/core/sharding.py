"""Sharding the student and the teacher (FSDP1 / FSDP2), and reading full weights back one tensor at a time.

Strategies by flag (Phase 2, docs/method.md "Phase 2"; the paper trains with FSDP full shard):

* ``--trainer.strategy=ddp``: nothing here; each rank holds both models.
* ``--trainer.strategy=fsdp`` (Lightning's FSDPStrategy = FSDP1, GPU only): :func:`wrap_fsdp1`.
* ``ModelParallelStrategy`` (FSDP2, ``fully_shard``; also runs on CPU): :func:`shard_fsdp2`.

Each role (student, teacher) is sharded on its own, the same way, so the teacher sync stays shard-local::

    RoleRoot (no parameters; the FSDP root) -> Role (one unit: embeddings, final norm, LM head) -> decoder layers

Why the wrappers: the distillation loss never calls the model's own forward (it takes the decoder's hidden states
and multiplies them with the LM head weight at the teacher's top-k ids only). Code that touches root-level
parameters must therefore run inside ONE forward of the unit that owns them: ``root(fn, *args)`` runs
``fn(hf_model, *args)`` as that forward (and :meth:`RoleRoot.generate` runs HF ``generate`` the same way). The
parameter-free root exists because FSDP keeps a root's gathered parameters after a forward (FSDP1 even reuses
that buffer unchanged in the next forward, so a teacher sync would go unseen); a non-root unit reshards normally.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_DELEGATED = ("config", "generation_config", "name_or_path")  # HF attributes readers of a role may ask for


# ------------------------------------------------------------------------------------------------- wrappers
class Role(nn.Module):
    """``Role(model)(fn, *args) == fn(model, *args)``, as one forward of this module (an FSDP unit)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def _generate(model: PreTrainedModel, *args, **kwargs):
    return model.generate(*args, **kwargs)


class RoleRoot(nn.Module):
    """The parameter-free FSDP root of one role. Looks like the HF model to readers of its attributes
    (``config``, ``generation_config``, ``name_or_path``), so rollout backends bind to it unchanged."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.role = Role(model)

    def forward(self, fn: Callable, *args, **kwargs):
        return self.role(fn, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """HF ``generate`` inside one forward of the root (FSDP2 hooks fire on ``self(...)``)."""
        return self(_generate, *args, **kwargs)

    def __getattr__(self, name: str):
        if name in _DELEGATED:
            return getattr(hf_model(self), name)
        return super().__getattr__(name)


def hf_model(module: nn.Module) -> PreTrainedModel:
    """The HF model inside a role's wrappers (or the module itself if it is not wrapped)."""
    while not isinstance(module, PreTrainedModel):
        inner = module._modules
        if "_fsdp_wrapped_module" in inner:
            module = inner["_fsdp_wrapped_module"]
        elif "role" in inner:
            module = inner["role"]
        elif "model" in inner:
            module = inner["model"]
        else:
            raise TypeError(f"{type(module).__name__} holds no Hugging Face model")
    return module


def decoder_layer_classes(model: PreTrainedModel) -> set[type[nn.Module]]:
    """The model's decoder-layer classes (HF's ``_no_split_modules``): one FSDP unit each."""
    names = set(model._no_split_modules or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__}: no decoder layer class found from _no_split_modules={names}")
    return classes


# ---------------------------------------------------------------------------------------------------- FSDP1
def wrap_fsdp1(model: PreTrainedModel, strategy) -> nn.Module:
    """FSDP1 under Lightning's FSDPStrategy: each decoder layer a unit, the rest of the model one unit, a
    parameter-free root on top. Mixed precision, sharding strategy, CPU offload and device come from the strategy
    (``--trainer.precision=bf16-mixed`` gives bf16 compute with float32 sharded master weights)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs = {k: v for k, v in strategy.kwargs.items() if k != "auto_wrap_policy"}
    kwargs.update(mixed_precision=strategy.mixed_precision_config, sharding_strategy=strategy.sharding_strategy,
                  cpu_offload=strategy.cpu_offload, device_id=strategy.root_device.index)
    if not kwargs.get("use_orig_params", False):
        raise ValueError("the FSDP strategy must keep `use_orig_params=True` (the teacher sync and the optimizer "
                         "address the original parameters)")
    model._is_fsdp_managed_module = True  # HF generate then keeps all ranks stepping together (synced_gpus)
    root = RoleRoot(model)
    root.role = FSDP(root.role, auto_wrap_policy=ModuleWrapPolicy(decoder_layer_classes(model)), **kwargs)
    root = FSDP(root, **kwargs)
    root.generate = functools.partial(root, _generate)  # through the FSDP root, not the bare RoleRoot
    return root


# ---------------------------------------------------------------------------------------------------- FSDP2
def shard_fsdp2(model: PreTrainedModel, device_mesh, precision: str) -> nn.Module:
    """FSDP2 (``fully_shard``) under ModelParallelStrategy: the same units as :func:`wrap_fsdp1`, sharded over the
    mesh's data-parallel dimension (tensor parallelism is not supported: it must be 1)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() != 1:
        raise ValueError("tensor parallelism is not supported: set "
                         "`--trainer.strategy.init_args.tensor_parallel_size=1`, got "
                         f"{device_mesh['tensor_parallel'].size()}")
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    kwargs = {"mesh": mesh}
    if precision.startswith("bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layer_classes(model)
    for module in list(model.modules()):
        if type(module) in layers:
            fully_shard(module, **kwargs)
    model._is_fsdp_managed_module = True
    root = RoleRoot(model)
    fully_shard(root.role, **kwargs)
    fully_shard(root, **kwargs)
    return root


# --------------------------------------------------------------------------------------- full tensors back
def clean_name(name: str) -> str:
    """A parameter name without FSDP1 / activation-checkpointing wrapper segments (the HF checkpoint name)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp1_units(role: nn.Module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP, [m for m in role.modules() if isinstance(m, FSDP)]


def full_named_tensors(role: nn.Module, buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter (and, if ``buffers``, persistent buffer) of the role's HF model under its HF name, full size,
    ONE tensor at a time: never a second full copy of the model on any rank.

    Plain / DDP models yield their own tensors. FSDP2 gathers each DTensor as it is reached (a collective: every
    rank must consume the iterator fully, in order). FSDP1 gathers one unit at a time (a decoder layer, then the
    rest), and a yielded tensor is valid until the iterator moves past that unit's last tensor. Tied weights
    appear once (under the embedding's name), as in the HF checkpoint."""
    model = hf_model(role)
    FSDP, units = _fsdp1_units(role) if _is_fsdp1(role) else (None, [])
    if units:
        yield from _fsdp1_tensors(FSDP, role, model, units)
    else:
        for name, param in model.named_parameters():
            yield name, _full(param)
    if buffers:
        for module_name, module in model.named_modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    yield clean_name(f"{module_name}.{name}" if module_name else name), _full(buffer)


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return any(isinstance(m, FSDP) for m in module.modules())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _fsdp1_tensors(FSDP, role, model, units) -> Iterator[tuple[str, torch.Tensor]]:
    with FSDP.summon_full_params(role, recurse=False, writeback=False):
        pass  # lazy initialisation from the real root, before any unit is gathered on its own
    paths = {name: module for name, module in model.named_modules() if isinstance(module, FSDP)}
    outer = next(u for u in units if u is not role and all(u is not m for m in paths.values()))  # the Role unit
    groups: dict[int, tuple[nn.Module, list[str]]] = {}
    for raw, _ in model.named_parameters():
        owner = max((p for p in paths if raw.startswith(p + ".")), key=len, default=None)
        unit = paths[owner] if owner is not None else outer
        groups.setdefault(id(unit), (unit, []))[1].append(raw)
    for unit, names in groups.values():
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for raw in names:
                yield clean_name(raw), model.get_parameter(raw).detach()


def gather_state_dict(role: nn.Module) -> dict[str, torch.Tensor] | None:
    """The role's full HF state dict on CPU, on global rank 0 only (None elsewhere); other ranks hold one gathered
    tensor at a time while it is assembled."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = {} if rank0 else None
    for name, tensor in full_named_tensors(role, buffers=True):
        if rank0:
            state[name] = tensor.detach().to("cpu", copy=True)
    return state

