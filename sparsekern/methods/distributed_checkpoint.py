"""Checkpoints of sparse training with ``torch.distributed.checkpoint`` (DCP).

:func:`save` writes the model (sharded or not), the optimizer and the method's
state (a DST driver's step count, generator and shadow blocks; DLRT's steps and
moments) to a DCP directory; :func:`load` resumes from it on any world size.

A checkpoint's parameter shapes are the structure at save time (stored blocks,
ranks), which a freshly built model does not have, and DCP loads into tensors
of the right shape. So the structure (block masks, low-rank ranks) is saved as
well, as a small replicated entry: :func:`load` reads it first, gives the model
that structure (inside :func:`~sparsekern.methods.distributed.gathered` for an
FSDP2 model), and then lets DCP load values and optimizer state in place and
reshard them for the current world size. On the same world size the resumed
run is bit-exact; across world sizes the values are exact and the following
steps differ only by the reduction order of the gradients.
"""
import io
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from ..nn.block_structure import BlockStructured
from ..nn.lowrank_factors import LowRankFactors
from .distributed import gathered

__all__ = ["save", "load", "structure_of", "adopt_structure"]


def structure_of(model):
    """{module name: ("blocks", bool block grid) or ("rank", r)} for the layers whose parameter
    shapes depend on their structure (2:4 layers keep their shapes: their indices are buffers)."""
    structure = {}
    for name, module in model.named_modules():
        if isinstance(module, BlockStructured):
            structure[name] = ("blocks", module.block_mask.detach().cpu().clone())
        elif isinstance(module, LowRankFactors):
            structure[name] = ("rank", module.rank)
    return structure


def adopt_structure(model, structure, optimizer=None):
    """Give ``model`` the ``structure`` of :func:`structure_of` (values of changed layers are
    placeholders until loaded); works on FSDP2 models (collective there)."""
    modules = dict(model.named_modules())
    missing = sorted(set(structure) - set(modules))
    if missing:
        raise ValueError(f"the checkpoint's structure names layers the model does not have: {missing}")
    with gathered(model, optimizer):
        for name, (kind, value) in structure.items():
            module = modules[name]
            if kind == "blocks":
                if tuple(value.shape) != tuple(module.block_mask.shape):
                    raise ValueError(f"{name}: saved block grid {tuple(value.shape)}, the layer has "
                                     f"{tuple(module.block_mask.shape)}")
                if not torch.equal(value.to(module.block_mask.device), module.block_mask):
                    module.restructure(value)
                    if optimizer is not None:
                        optimizer.state.pop(module.values, None)  # loaded afterwards
            elif value != module.rank:
                like = dict(device=module.S.device, dtype=module.S.dtype)
                module.set_factors(torch.zeros(module.U.shape[0], value, **like), torch.zeros(value, value, **like),
                                   torch.zeros(module.V.shape[0], value, **like))


def _packed(obj):
    """``obj`` as one opaque DCP entry (DCP would otherwise flatten nested dicts into tensors that
    must be pre-allocated at load)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _dcp(function, state, path):
    if dist.is_available() and dist.is_initialized():
        return function(state, checkpoint_id=path)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        return function(state, checkpoint_id=path, no_dist=True)


def _unpacked(value):
    if isinstance(value, io.BytesIO):
        value.seek(0)
        return torch.load(value, weights_only=False)
    return value  # DCP's loader already unpickled it


def save(path, model, optimizer=None, driver=None):
    """Save ``model``, ``optimizer`` (optional) and ``driver`` (a DST driver or DLRT; optional) to
    the DCP directory ``path``. Collective: every rank calls it."""
    state = {"model": model.state_dict(), "structure": _packed(structure_of(model))}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if driver is not None:
        state["driver"] = _packed(driver.state_dict())
    _dcp(dcp.save, state, path)


def load(path, model, optimizer=None, driver=None):
    """Resume from :func:`save`'s ``path`` into ``model`` (built as for the saved run, sharded or
    not, on any world size), ``optimizer`` (built on the model's current parameters) and
    ``driver`` (built on them). Collective: every rank calls it."""
    head = {"structure": _packed(None)}
    if driver is not None:
        head["driver"] = _packed(None)
    _dcp(dcp.load, head, path)
    adopt_structure(model, _unpacked(head["structure"]), optimizer)
    # In place: the model's load hooks would restructure its (sharded) values once more.
    _dcp(dcp.load, {"model": model.state_dict()}, path)
    if optimizer is not None:
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        _dcp(dcp.load, optim_state, path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state["optimizer"])
    if driver is not None:
        driver.load_state_dict(_unpacked(head["driver"]))
