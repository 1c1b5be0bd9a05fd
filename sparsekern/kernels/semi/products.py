"""The 2:4 products that layers and methods call directly, one function each.

Each picks its backend for the tensors it is given (a forced
:func:`sparsekern.use_backend` included, so tests switch implementations with it)
and runs it. The matmul products are dispatched by the op layer instead, which
also carries the forward's backend into the backward.
"""
import functools

import torch

from ..registry import select_kernel


def _dtype(tensors):
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def grad_weight(dy, x, indices, backend=None):
    """(dyᵀ x) at the kept positions that ``indices`` encode, (rows, cols/2). ``backend``: the
    one chosen when the forward ran (a backward hook may run where no backend is forced)."""
    return select_kernel("semi_grad_weight", dy.device, dy.dtype, backend)[1](dy, x, indices)


def drop_grow(mask, drop, grow, n_drop, transposable, absolute=False, with_weight=False):
    """The 2:4 drop-and-grow rule: ``(new_mask, new_weight)`` (new_weight None unless
    ``with_weight``); see :mod:`sparsekern.kernels.semi`."""
    fn = select_kernel("semi_drop_grow", mask.device, _dtype((drop, grow)))[1]
    # A NaN grow score ranks last (as -inf, or as 0 among magnitudes): compared pairwise, NaN
    # would make the in-group ranking cyclic and a group could regrow fewer than it lost.
    grow = grow.masked_fill(grow.isnan(), 0.0 if absolute else float("-inf"))
    return fn(mask, drop, grow, n_drop, transposable, absolute, with_weight)


def restructure(mask, old_indices, transposable):
    """``(slots, indices, indices_t)`` of the new 2:4 ``mask``; see :mod:`sparsekern.kernels.semi`."""
    return select_kernel("semi_restructure", mask.device, mask.dtype)[1](mask, old_indices, transposable)


def carry(tensor, slots):
    """``tensor`` moved by a slot map: ``tensor.flatten()[slots]``, zero where ``slots`` < 0."""
    return select_kernel("semi_carry", tensor.device, tensor.dtype)[1](tensor, slots)


def decompress_sum(values, indices, cols):
    """The dense (rows, cols) sum of the 2:4-compressed matrices ``zip(values, indices)``."""
    return select_kernel("semi_decompress_sum", values[0].device, _dtype(values))[1](values, indices, cols)
