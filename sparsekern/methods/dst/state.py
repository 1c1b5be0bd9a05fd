"""Structure changes with their optimizer state: values and per-weight state follow their weights.

Every sparse layer exposes one structure protocol: ``mask`` (the structure the
methods act on: a block grid, or the 2:4 element mask), ``restructure(mask)``
(installs it, keeping the ``values`` Parameter's identity, and returns a slot
map: where each new weight was before, or -1) and ``carry(tensor, slots)``
(moves a tensor shaped like the old values). :func:`restructure` moves every
optimizer state tensor shaped like the values (SGD ``momentum_buffer``, Adam
``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``) with it: surviving weights keep
their state, regrown ones start at zero. Scalar state (Adam's ``step``) is kept.
"""
import torch

from ...formats.bsr import BlockLayout


def gather_blocks(sources, target, like):
    """Rows of ``target`` (a BlockLayout) taken from disjoint ``sources`` [(tensor, layout)];
    blocks found in no source are zero. O(nnz log nnz), never dense."""
    out = like.new_zeros((target.nnz_blocks, *like.shape[1:]))
    for tensor, layout in sources:
        pos = layout.positions_of(target)
        hit = (pos >= 0).nonzero().squeeze(1)
        out.index_copy_(0, hit, tensor.index_select(0, pos[hit]).to(out.dtype))
    return out


def _per_weight_state(optimizer, param):
    """The optimizer's state tensors for ``param`` shaped like it (moved with its weights), and the rest."""
    state = optimizer.state.get(param, {})
    tensors = {k: v for k, v in state.items()
               if torch.is_tensor(v) and v.dim() >= 1 and tuple(v.shape) == tuple(param.shape)}
    scalars = {k: v for k, v in state.items() if k not in tensors}
    return tensors, scalars


def new_state(sources, target):
    """Optimizer state for a parameter on layout ``target`` from [(optimizer, param, layout)].

    Must be called before the source parameters change shape.
    """
    tensors, scalars = {}, {}
    for optimizer, param, layout in sources:
        t, s = _per_weight_state(optimizer, param)
        for key, value in t.items():
            tensors.setdefault(key, []).append((value, layout))
        for key, value in s.items():  # a copy: two optimizers must not step one shared counter
            scalars.setdefault(key, value.clone() if torch.is_tensor(value) else value)
    state = {k: gather_blocks(v, target, v[0][0]) for k, v in tensors.items()}
    state.update(scalars)
    return state


def restructure(layer, optimizer, mask):
    """Give ``layer`` (a SparseLinear or a static SemiSparseLinear) the structure ``mask``:
    surviving weights keep their values and optimizer state, new ones start at zero with
    zero state; scalar state (Adam's ``step``) is kept. The layout is built once, by the layer."""
    tensors, _ = _per_weight_state(optimizer, layer.values)
    slots = layer.restructure(mask)
    state = optimizer.state.get(layer.values)
    for key, value in tensors.items():
        state[key] = layer.carry(value, slots)


def restructure_from(layer, optimizer, block_mask, sources, state_sources):
    """Give the SparseLinear ``layer`` the structure ``block_mask`` with values and optimizer
    state gathered from several disjoint block sources (a layer's forward blocks and a driver's
    shadow blocks): ``sources`` [(values, layout)], ``state_sources`` [(optimizer, param, layout)]."""
    target = BlockLayout.from_block_mask(block_mask.to(layer.block_mask.device), layer.padded_shape,
                                         layer.block_size)
    values = gather_blocks(sources, target, layer.values.detach())
    state = new_state(state_sources, target)
    layer.restructure(target, values=values)
    if state:
        optimizer.state[layer.values] = state
    else:
        optimizer.state.pop(layer.values, None)
