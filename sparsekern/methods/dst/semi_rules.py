"""Pure update rules of dynamic sparse training at 2:4 granularity: the result is 2:4 again.

Conventions as in :mod:`sparsekern.methods.dst.rules` (nnz preserved, survivors keep
their weight, ties to the lower flat index). The drop is global over the tensor; the
regrowth happens inside each group of four (or 4x4 tile if transposable), so every
group regrows exactly what it lost.
"""
import math

import torch

from ...formats.semi_prune import check_2to4_shape, transposable_patterns
from ...nn import semi_linear as _semi_layer
from .rules import _check_fraction, _check_pair, _new_weight, n_to_drop

# Two implementations of one rule: the C++ kernel of sparsekern._C_semi (CPU, float32/float64:
# a few passes over the layer) and the plain-torch code below (any device and dtype; the fallback
# when the extension is missing, and the oracle of the tests). Both sum tile totals in float64.

_TILES_PER_CHUNK = 65536


def _to_groups(t, transposable):
    """(rows, cols) -> (groups, 4) row groups of four, or (tiles, 16) 4x4 tiles (row-major inside)."""
    rows, cols = t.shape
    if not transposable:
        return t.reshape(rows * cols // 4, 4)
    return t.reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16)


def _from_groups(g, shape, transposable):
    rows, cols = shape
    if not transposable:
        return g.reshape(rows, cols)
    return g.reshape(rows // 4, cols // 4, 4, 4).transpose(1, 2).reshape(rows, cols)


def _check_semi_mask(mask, transposable):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    check_2to4_shape(mask.shape, transposable)
    groups = _to_groups(mask, transposable)
    ok = (groups.view(-1, 4, 4).sum(1) == 2).all() & (groups.view(-1, 4, 4).sum(2) == 2).all() if transposable \
        else (groups.sum(1) == 2).all()
    if not bool(ok):
        what = "transposable 2:4 (2 per row and column of every 4x4 tile)" if transposable else "2:4 (2 of every 4)"
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not exactly {what}")


def _smallest_mask(score, eligible, k):
    """Bool mask of the k smallest ``score`` among ``eligible`` (ties: lower flat index first).

    Same choice as :func:`_smallest`, in O(n) (a k-th value instead of a sort).
    """
    out = torch.zeros(eligible.numel(), dtype=torch.bool, device=eligible.device)
    if k > 0:
        where = eligible.reshape(-1).nonzero().squeeze(1)
        values = score.reshape(-1)[where]
        threshold = values.kthvalue(k).values
        below, tied = values < threshold, values == threshold
        take = below | (tied & (tied.cumsum(0) <= k - int(below.sum())))
        out[where[take]] = True
    return out.view(eligible.shape)


def _grow_in_rows(kept, score):
    """(groups, 4): each group regrows 2 - kept of its free positions, largest ``score`` first
    (ties: lower position)."""
    free, s = (~kept).unbind(1), score.unbind(1)
    need = 2 - kept.sum(1, dtype=torch.uint8)
    grown = []
    for i in range(4):
        # free entries ahead of entry i: larger score, or equal score at a lower position
        ahead = sum((free[j] & ((s[j] >= s[i]) if j < i else (s[j] > s[i]))).to(torch.uint8)
                    for j in range(4) if j != i)
        grown.append(free[i] & (ahead < need))
    return kept | torch.stack(grown, 1)


def _grow_in_tiles(kept, score):
    """(tiles, 16): each tile takes the transposable pattern containing its survivors with the
    largest total ``score`` over its new entries, summed in float64 (ties: first in
    transposable_patterns())."""
    patterns = transposable_patterns(kept.device)                         # (90, 16)
    members, outside = patterns.T.double(), (~patterns).T.double()
    best = []
    for k, g in zip(kept.split(_TILES_PER_CHUNK), score.split(_TILES_PER_CHUNK)):
        lost = k.double() @ outside                                        # survivors a pattern lacks
        gain = torch.where(k, torch.zeros((), dtype=torch.float64), g.double()) @ members
        best.append(gain.masked_fill_(lost > 0, -math.inf).argmax(1))      # first maximal on ties
    return patterns[torch.cat(best)] if best else kept


def _semi_rule_torch(mask, drop_score, grow_score, n_drop, transposable):
    """The new mask of :func:`semi_drop_and_grow` in plain torch (the fallback and the oracle)."""
    kept = mask & ~_smallest_mask(drop_score, mask, n_drop)
    grow = _grow_in_tiles if transposable else _grow_in_rows
    new = grow(_to_groups(kept, transposable), _to_groups(grow_score, transposable))
    return _from_groups(new, mask.shape, transposable)


def _semi_rule(mask, drop, grow, n_drop, transposable, absolute=False, with_weight=False):
    """``(new_mask, new_weight)`` of the 2:4 rule on scores ``|drop|``, ``|grow|`` (or the scores
    themselves if not ``absolute``); new_weight (only if ``with_weight``, else None) is ``drop``
    where kept before and after, else zero. The C++ kernel where it applies, else plain torch."""
    for name, score in (("drop_score", drop), ("grow_score", grow)):
        if not isinstance(score, torch.Tensor) or score.shape != mask.shape:
            raise ValueError(f"{name} must be a tensor of the mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}")
    ext = _semi_layer._dst_extension(mask, drop, grow)
    floats = (torch.float32, torch.float64)
    if ext is not None and drop.dtype in floats and grow.dtype in floats and 0 <= n_drop <= mask.numel() // 2:
        if drop.dtype != grow.dtype:  # float32 -> float64 is exact: same order, same decisions
            drop_in, grow_in = drop.double(), grow.double()
        else:
            drop_in, grow_in = drop, grow
        status, new_mask, new_weight = ext.dst_drop_grow(drop_in.contiguous(), mask.contiguous(),
                                                         grow_in.contiguous(), n_drop, transposable, absolute,
                                                         with_weight)
        if status:
            _check_semi_mask(mask, transposable)  # raises the error naming the mask
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not exactly 2:4")
        return new_mask, new_weight.to(drop.dtype) if with_weight else None
    _check_semi_mask(mask, transposable)
    active = mask.numel() // 2  # exactly two of every four
    if not 0 <= n_drop <= active:
        raise ValueError(f"cannot drop {n_drop} of {active} active entries")
    if absolute:
        drop_score, grow_score = drop.abs(), grow.abs()
    else:
        drop_score, grow_score = drop, grow
    new_mask = _semi_rule_torch(mask, drop_score, grow_score, n_drop, transposable)
    return new_mask, _new_weight(drop, mask, new_mask) if with_weight else None


def semi_drop_and_grow(mask, drop_score, grow_score, n_drop, *, transposable=False):
    """Drop and grow inside a 2:4 structure: the result is 2:4 again (transposable if asked).

    Drop: the ``n_drop`` kept entries of smallest ``drop_score`` over the whole
    tensor leave (ties: lower flat index first), exactly as :func:`drop_and_grow`.
    Grow, so that every group regrows exactly as many entries as it lost
    (just-dropped entries are eligible):

    - row groups of four (not transposable): a group that lost d entries regrows
      the d largest ``grow_score`` among its 2 + d non-kept positions (ties:
      lower position);
    - 4x4 tiles (transposable): among the 90 transposable patterns that contain
      the tile's surviving entries (the old pattern always does), the one of
      largest total ``grow_score`` over its new entries, summed in float64 (ties:
      the first in :func:`sparsekern.formats.semi_prune.transposable_patterns`' order).

    nnz and the (transposable) 2:4 pattern are preserved. mask: bool (rows, cols)
    with exactly two True in every group of four along rows (and per column of
    every 4x4 tile if transposable); scores alike. Returns the new bool mask.
    O(numel): a k-th value for the drop, a fixed amount of work per group; on CPU
    with float32/float64 scores a C++ kernel (a few passes over the layer).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    check_2to4_shape(mask.shape, transposable)
    return _semi_rule(mask, drop_score, grow_score, n_drop, transposable)[0]


def _semi_update(weight, mask, grow, drop_fraction, transposable):
    """Drop ``floor(active * drop_fraction)`` smallest |w|, regrow in the groups by |grow|."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    check_2to4_shape(mask.shape, transposable)
    n = n_to_drop(mask.numel() // 2, _check_fraction(drop_fraction))  # a 2:4 mask keeps half
    return _semi_rule(mask, weight, grow, n, transposable, absolute=True, with_weight=True)


def semi_rigl_update(weight, mask, grad, drop_fraction, *, transposable=False):
    """RigL at 2:4 granularity: drop ``floor(active * drop_fraction)`` smallest |w| over
    the tensor, regrow inside each group by |grad| (:func:`semi_drop_and_grow`).
    Returns ``(new_mask, new_weight)`` with the conventions of :func:`rigl_update`."""
    _check_pair(weight, mask)
    if not isinstance(grad, torch.Tensor) or grad.shape != weight.shape:
        raise ValueError(f"grad must be a tensor of the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    return _semi_update(weight, mask, grad, drop_fraction, transposable)


def semi_set_update(weight, mask, drop_fraction, generator=None, *, transposable=False):
    """SET at 2:4 granularity: drop as :func:`semi_rigl_update`, regrow inside each group
    by uniform random scores from ``generator`` (the best-scoring candidate pattern)."""
    _check_pair(weight, mask)
    noise = torch.rand(mask.shape, generator=generator).to(weight.device)
    return _semi_update(weight, mask, noise, drop_fraction, transposable)
