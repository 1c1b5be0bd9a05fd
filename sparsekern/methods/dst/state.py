"""Structure changes with their optimizer state: values and per-weight state follow their weights.

Block layers (:func:`restructure`): ``set_block_mask`` keeps the ``values``
Parameter's identity, and every optimizer state tensor shaped like the values
(SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``)
is carried block by block: surviving blocks keep their state, regrown blocks
start at zero. 2:4 layers (:func:`restructure_semi`): ``set_mask`` returns the
slot map and the state moves with :func:`carry`. Scalar state (Adam's ``step``)
is kept.
"""
import torch

from ...formats.bsr import BlockLayout
from ...nn.parameter import replace_data_
from ...nn.semi_linear import carry


def gather_blocks(sources, target, like):
    """Rows of ``target`` (a BlockLayout) taken from disjoint ``sources`` [(tensor, layout)];
    blocks found in no source are zero. O(nnz log nnz), never dense."""
    out = like.new_zeros((target.nnz_blocks, *like.shape[1:]))
    for tensor, layout in sources:
        pos = layout.positions_of(target)
        hit = (pos >= 0).nonzero().squeeze(1)
        out.index_copy_(0, hit, tensor.index_select(0, pos[hit]).to(out.dtype))
    return out


def _block_state(optimizer, param):
    """The optimizer's per-block state tensors for ``param`` (shaped like it), and its scalars."""
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
        t, s = _block_state(optimizer, param)
        for key, value in t.items():
            tensors.setdefault(key, []).append((value, layout))
        for key, value in s.items():
            scalars.setdefault(key, value)
    state = {k: gather_blocks(v, target, v[0][0]) for k, v in tensors.items()}
    state.update(scalars)
    return state


def restructure(layer, optimizer, block_mask, sources=None, state_sources=None):
    """Give ``layer`` the structure ``block_mask``: values and optimizer state of
    surviving blocks are carried (from ``sources`` if given, else from the layer),
    new blocks start at zero with zero optimizer state."""
    old = layer.layout()
    target = BlockLayout.from_block_mask(block_mask.to(old.device), layer.padded_shape, layer.block_size)
    state_sources = state_sources or [(optimizer, layer.values, old)]
    values = None if sources is None else gather_blocks(sources, target, layer.values.detach())
    state = new_state(state_sources, target)
    layer.set_block_mask(target.block_mask)  # carries the layer's own surviving blocks
    if values is not None:
        replace_data_(layer.values, values)
    if state:
        optimizer.state[layer.values] = state
    else:
        optimizer.state.pop(layer.values, None)


def restructure_semi(layer, optimizer, new_mask):
    """Give the static SemiSparseLinear ``layer`` the 2:4 structure ``new_mask``, carrying
    values and the optimizer's per-weight state (zero for regrown weights)."""
    state = optimizer.state.get(layer.values, {})
    tensors = [k for k, v in state.items()
               if torch.is_tensor(v) and v.dim() >= 1 and tuple(v.shape) == tuple(layer.values.shape)]
    slots = layer.set_mask(new_mask)
    for key in tensors:
        state[key] = carry(state[key], slots)
