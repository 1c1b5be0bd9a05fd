"""Batching rules for the custom ops under torch.func.vmap.

The kernels take one problem per call (a token matrix, an image batch) and a block
structure shared by every sample. A row-wise op (each output row depends only on the same
row of its first argument: the forwards and input gradients) whose other arguments are not
mapped folds the mapped dimension into its rows and runs once; anything else (a weight
gradient, which sums over the rows, or mapped weights) runs once per sample and stacks the
outputs. So per-sample gradients (vmap of grad) cost one forward and one input gradient for
the whole batch and one weight gradient per sample, as they must.
"""
import functools

import torch


def register_batching_rule(op, per_row, special=None):
    """Give the custom op ``op`` its vmap rule; ``per_row``: it is row-wise in its first argument;
    ``special(batch, in_dims, *args)``: an op's own rule for the cases it returns a result for
    ((outputs, out_dims)), None for the rest."""
    torch.library.register_vmap(op, functools.partial(_batched, op, per_row, special))


def _batched(op, per_row, special, info, in_dims, *args):
    if special is not None:
        result = special(info.batch_size, in_dims, *args)
        if result is not None:
            return result
    if per_row and in_dims[0] is not None and all(unmapped(dim) for dim in in_dims[1:]):
        return _folded(op, info.batch_size, in_dims[0], args)
    return _per_sample(op, info.batch_size, in_dims, args)


def _folded(op, batch, dim, args):
    rows = args[0].movedim(dim, 0)
    n = rows.shape[1]
    outputs = op(rows.reshape(batch * n, *rows.shape[2:]), *args[1:])

    def unfold(t):
        return t.reshape(batch, n, *t.shape[1:])
    if isinstance(outputs, tuple):
        return tuple(unfold(t) for t in outputs), (0,) * len(outputs)
    return unfold(outputs), 0


def _per_sample(op, batch, in_dims, args):
    if batch == 0:
        raise RuntimeError(f"{op._name} under torch.func.vmap needs a mapped dimension of size >= 1")
    outputs = [op(*(_sample(arg, dim, i) for arg, dim in zip(args, in_dims))) for i in range(batch)]
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
    return torch.stack(outputs), 0


def unmapped(dim):
    """Whether an argument's vmap dimension (None, or a list of them for a list) maps nothing."""
    return dim is None or isinstance(dim, (list, tuple)) and all(unmapped(d) for d in dim)


def _sample(arg, dim, i):
    """Sample ``i`` of an argument mapped along ``dim`` (None: unmapped); a list maps per element."""
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(_sample(a, d, i) for a, d in zip(arg, dim))
    return arg.select(dim, i)
