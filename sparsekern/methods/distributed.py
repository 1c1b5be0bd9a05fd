"""Structure changes under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards every parameter along dim 0: a block-sparse layer's ``values``
(nnz, br, bc, ...) by blocks, a 2:4 layer's (out, in/2) by rows, the low-rank
factors by rows. The layout metadata (``block_mask``, 2:4 ``indices``) are
buffers, which FSDP2 leaves replicated. A step that changes a structure (a DST
mask update, a DLRT rank change) needs whole tensors and gives parameters new
shapes, which FSDP2's per-parameter sharding metadata cannot follow by itself.

The mechanism, :func:`gathered`: on entry every sharded parameter of the
model (or only of the layers a driver changes), with its gradient, and every
optimizer state tensor shaped like it are all-gathered and installed as plain
full tensors, the optimizer re-keyed to them; the driver then runs unchanged
(its score all-reduce, seeded generator and index tie-breaks make every rank
decide the same structure, exactly as under DDP); on exit every parameter is
sharded again at its new shape, each rank slicing its own rows (no
communication), the optimizer state carried by the driver sharded with it.
Ranks are checked to agree on every shape and layout buffer. Gradients are
dropped on exit (the optimizer has used them). :func:`structure_step` wraps a
driver's ``step()`` so that only update steps pay for this, and only for the
sparse layers.

Peak memory during an update is the sparse layers' values, gradients and
optimizer state in full on every rank (what DDP holds all the time), every ΔT
steps; DLRT, which changes its factors at every step, gathers every step.
"""
import hashlib
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor

__all__ = ["gathered", "structure_step", "fsdp_params"]


def fsdp_params(model):
    """The FSDP2 parameter records (one per sharded parameter) of ``model``, in module order."""
    records = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                records += [(group, fp) for fp in group.fsdp_params]
    return records


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local_chunk(tensor, fp):
    """The rows of the full ``tensor`` that FSDP2 keeps on this rank for the parameter ``fp``."""
    world, rank = fp.mesh_info.shard_mesh_size, fp.mesh_info.shard_mesh_rank
    chunks = torch.chunk(tensor, world, dim=0)
    local = chunks[rank] if rank < len(chunks) else tensor[:0]
    return fp.to_sharded_dtensor(local.contiguous())


def _remap_optimizer(optimizer, mapping, convert, records=False):
    """Point ``optimizer`` at new parameter objects: ``mapping`` old -> new parameter, or old ->
    FSDP2 record (``records``; the new parameter is its sharded one). State values go through
    ``convert(value, target)``, target being the new parameter or the record."""
    if optimizer is None:
        return
    new_param = (lambda t: t.sharded_param) if records else (lambda t: t)
    for group in optimizer.param_groups:
        group["params"] = [new_param(mapping[p]) if p in mapping else p for p in group["params"]]
    for old in [p for p in optimizer.state if p in mapping]:
        target = mapping[old]
        optimizer.state[new_param(target)] = {k: convert(v, target) for k, v in optimizer.state.pop(old).items()}


def _check_idle(records):
    for group, _ in records:
        if not group.is_sharded:
            raise RuntimeError("gathered() needs every FSDP2 module resharded: call it between iterations "
                               "(after optimizer.step()), not inside a forward or backward")
        if isinstance(group.offload_policy, CPUOffloadPolicy):
            raise NotImplementedError("gathered() does not support FSDP2 CPU offloading")


def _structure_key(fp):
    """What must agree across ranks after a change: the parameter's shape and a digest of its
    module's own buffers (block masks, 2:4 indices), which decide the layout of the values."""
    module = fp._module_info.module
    digest = hashlib.sha1()
    for buffer in module.buffers(recurse=False):
        digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    return tuple(getattr(module, fp._module_info.param_name).shape), digest.hexdigest()


def _check_ranks_agree(records, names):
    if not (records and dist.is_initialized() and dist.get_world_size() > 1):
        return
    keys = [_structure_key(fp) for _, fp in records]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, keys)
    for i, (_, fp) in enumerate(records):
        if len({e[i] for e in every}) > 1:
            same_layout = len({e[i][1] for e in every}) == 1
            raise RuntimeError(f"ranks disagree on the new structure of {names[fp]} (shapes "
                               f"{[e[i][0] for e in every]}, layout buffers equal: {same_layout}); the "
                               "structure decision must be identical on every rank (same seed, scores all-reduced)")


@contextmanager
def gathered(model, optimizer=None, modules=None):
    """Run a structure change of the FSDP2-sharded ``model`` on whole tensors, then re-shard.

    Inside, every parameter FSDP2 manages is a plain full ``nn.Parameter`` (gradient included),
    and ``optimizer`` (if given) holds them with full state. A driver may change parameter shapes
    in place (DST ``restructure``) or replace parameters (DLRT rank changes); on exit every
    parameter is sharded at its new shape (dim 0, FSDP2's default placement), ``optimizer`` holds
    the new sharded parameters and state, and gradients are cleared. Collective: every rank must
    enter, in the same order. Also works on a model without FSDP2 modules (does nothing).
    ``modules`` (optional): only the parameters of these modules are gathered and re-sharded (the
    sparse layers a DST driver changes), the rest of the model stays sharded.
    """
    records = fsdp_params(model)
    if modules is not None:
        chosen = {id(m) for m in modules}
        records = [(group, fp) for group, fp in records if id(fp._module_info.module) in chosen]
    _check_idle(records)
    for _, fp in records:
        if fp.fsdp_placement.dim != 0 or fp.is_dtensor:
            raise NotImplementedError(f"gathered() handles FSDP2's default Shard(0) placement of plain "
                                      f"parameters; {fp._module_info.param_name} has {fp.fsdp_placement}"
                                      f"{' and is a DTensor (tensor parallel)' if fp.is_dtensor else ''}")
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = {fp: by_id.get(id(fp.sharded_param), fp._module_info.param_name) for _, fp in records}
    full = _gather(records, optimizer)
    entry = {}
    for _, fp in records:
        entry[fp] = plain = _plain_for(fp, full[fp, "param"])
        plain.grad = full.get((fp, "grad"))
        fp._setattr_on_modules(plain)
    mapping = {fp.sharded_param: (fp, plain) for fp, plain in entry.items()}
    _remap_optimizer(optimizer, {old: plain for old, (_, plain) in mapping.items()},
                     lambda value, plain: value)
    if optimizer is not None:
        for old, (fp, plain) in mapping.items():
            state = optimizer.state.get(plain, {})
            for key in state:
                state[key] = full.get((fp, key), _full(state[key]))
    try:
        yield model
    finally:
        _reshard(records, optimizer, entry, names)


@torch.no_grad()
def _gather(records, optimizer):
    """{(record, "param" | "grad" | optimizer state key): full tensor} for every record's parameter,
    its gradient and its optimizer state tensors shaped like it: one all-gather per process group
    and dtype instead of one per tensor (FSDP2's shards are its rows in order, padded at the end,
    so the gathered padded shards are the full tensor followed by padding)."""
    buckets = {}
    for _, fp in records:
        sharded = fp.sharded_param
        tensors = {"param": sharded, "grad": sharded.grad}
        if optimizer is not None:
            tensors.update(optimizer.state.get(sharded, {}))
        for key, tensor in tensors.items():
            if isinstance(tensor, DTensor) and tuple(tensor.shape) == tuple(sharded.shape):
                group = fp.mesh_info.shard_process_group
                buckets.setdefault((group, tensor.dtype), []).append((fp, key, tensor.to_local().detach()))
    full = {}
    for (group, _), bucket in buckets.items():
        flat = torch.cat([_padded(local, fp.padded_sharded_param_size).reshape(-1) for fp, _, local in bucket])
        world = dist.get_world_size(group)
        out = flat.new_empty(world * flat.numel())
        dist.all_gather_into_tensor(out, flat, group=group)
        out, offset = out.view(world, -1), 0
        for fp, key, _ in bucket:
            padded = fp.padded_sharded_param_size
            n = padded.numel()
            rows = out[:, offset:offset + n].reshape(world * padded[0], *padded[1:])
            full[fp, key] = rows[:fp._orig_size[0]].contiguous()
            offset += n
    return full


def _padded(local, size):
    if tuple(local.shape) == tuple(size):
        return local
    padded = local.new_zeros(size)
    padded[:local.shape[0]] = local
    return padded


def _plain_for(fp, full):
    """The plain Parameter standing for ``fp`` while gathered: the same object at every entry (its
    data dropped in between), so that whatever a driver keys by parameter object stays valid."""
    plain = getattr(fp, "_sparsekern_plain", None)
    if plain is None:
        plain = fp._sparsekern_plain = nn.Parameter(full, requires_grad=fp.sharded_param.requires_grad)
    else:
        plain.data = full
    return plain


def _reshard(records, optimizer, entry, names):
    _check_ranks_agree(records, names)
    mapping = {}
    for group, fp in records:
        info = fp._module_info
        current = getattr(info.module, info.param_name)
        if current.requires_grad and current.numel() == 0:
            raise RuntimeError(f"{names[fp]} has no element left (a layer without "
                               "stored blocks): FSDP2 cannot reduce-scatter an empty gradient; keep at least "
                               "one block per layer (higher density or smaller blocks)")
        fp._init_sharded_param(current.detach(), fp.device, None, fp.mesh_info)
        fp.sharded_param.requires_grad_(current.requires_grad)
        if fp.post_forward_mesh_info is not None:
            fp._init_sharded_post_forward_param_metadata(fp.sharded_param)
        fp._init_extensions()
        fp.all_gather_outputs = []  # sized for the old shape
        if hasattr(fp, "_unsharded_param"):
            del fp._unsharded_param
        fp.init_dtype_attrs(group.mp_policy)
        # The optimizer holds the object installed on entry; a driver may also have replaced it (DLRT).
        mapping[entry[fp]] = mapping[current] = fp
        current.grad = None
        entry[fp].data = entry[fp].data.new_empty(0)  # keep the object (see _plain_for), not its memory

    def convert(value, fp):
        if torch.is_tensor(value) and value.dim() >= 1 and tuple(value.shape) == tuple(fp._orig_size):
            return _local_chunk(value.detach(), fp)
        return value
    _remap_optimizer(optimizer, mapping, convert, records=True)


_checked = weakref.WeakSet()  # drivers whose FSDP2 setup passed _check_precision


def _check_precision(driver, model, modules):
    """The score probes of RigL/SNFS/GGR and the shadow drivers are built in the parameters'
    dtype; FSDP2 mixed precision runs the layers in ``param_dtype``, which the probes' ops refuse."""
    if driver in _checked:
        return
    if getattr(driver, "needs_scores", False) or hasattr(driver, "shadow"):
        chosen = {id(m) for m in modules}
        for group, fp in fsdp_params(model):
            dtype = group.mp_policy.param_dtype
            if id(fp._module_info.module) in chosen and dtype is not None and dtype != fp.sharded_param.dtype:
                raise NotImplementedError(
                    f"{type(driver).__name__} probes dense gradients in the parameters' dtype "
                    f"({fp.sharded_param.dtype}), but FSDP2's MixedPrecisionPolicy runs its layers in {dtype}; "
                    "use SET, or keep param_dtype=None on the sparse layers")
    _checked.add(driver)


def structure_step(driver, model, optimizer=None):
    """``driver.step()`` for an FSDP2 model: inside :func:`gathered` on the steps that change the
    structure (a DST driver's update steps; every step of DLRT, whose integrator needs whole
    factors), directly otherwise. Returns what ``step()`` returns."""
    # A DST driver changes its sparse layers only; DLRT steps every parameter of the model.
    layers = getattr(driver, "semi_layers", None)
    modules = None if layers is None else [m for _, m in driver.layers + layers]
    if modules is not None:
        _check_precision(driver, model, modules)
    schedule = getattr(driver, "schedule", None)
    if schedule is not None and not schedule.is_update_step(driver.t + 1):
        return driver.step()
    if optimizer is None:  # a DST driver's optimizer; DLRT is its own (its ``optimizer`` names the rule)
        optimizer = getattr(driver, "optimizer", None)
    with gathered(model, optimizer if isinstance(optimizer, torch.optim.Optimizer) else None, modules):
        return driver.step()
