"""Reference 2:4 DST products in plain torch: the oracle of the C++ ones and the fallback.

Any device and dtype. The rule's conventions (nnz preserved, ties to the lower
flat index or position, tile totals in float64) are those of
:func:`sparsekern.methods.dst.semi_rules.semi_drop_and_grow`.
"""
import math

import torch

from ...formats.semi import decompress, kept_positions, pack_indices, unpack_columns
from ...formats.semi_prune import check_2to4_mask
from ...formats.semi_prune import transposable_patterns
from ..registry import register_kernel

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


def _smallest_mask(score, eligible, k):
    """Bool mask of the k smallest ``score`` among ``eligible`` (ties: lower flat index first;
    every NaN ranks after every number, as in the C++ kernel), in O(n): a k-th value, no sort."""
    out = torch.zeros(eligible.numel(), dtype=torch.bool, device=eligible.device)
    if k > 0:
        where = eligible.reshape(-1).nonzero().squeeze(1)
        values = score.reshape(-1)[where]
        nan = values.isnan()
        numbers = int((~nan).sum())
        if k > numbers:  # every number goes, then the first NaNs
            take = ~nan | (nan & (nan.cumsum(0) <= k - numbers))
        else:
            threshold = values[~nan].kthvalue(k).values
            below, tied = values < threshold, values == threshold
            take = below | (tied & (tied.cumsum(0) <= k - int(below.sum())))
        out[where[take]] = True
    return out.view(eligible.shape)


def _grow_in_rows(kept, score):
    """(groups, 4): each group regrows 2 - kept of its free positions, largest ``score`` first
    (ties: lower position). Every pair of positions is decided by one comparison, as in the C++
    kernel, so a NaN (never larger) still leaves exactly two kept."""
    free, s = (~kept).unbind(1), score.unbind(1)
    need = 2 - kept.sum(1, dtype=torch.uint8)
    grown = []
    for i in range(4):
        # free entries ahead of entry i: a later one if strictly larger, an earlier one unless i is
        ahead = sum((free[j] & (~(s[i] > s[j]) if j < i else (s[j] > s[i]))).to(torch.uint8)
                    for j in range(4) if j != i)
        grown.append(free[i] & (ahead < need))
    return kept | torch.stack(grown, 1)


def _grow_in_tiles(kept, old, score):
    """(tiles, 16): each tile takes the transposable pattern containing its survivors with the
    largest total ``score`` over its new cells, summed in float64 cell by cell as the C++ kernel
    does (ties: first in transposable_patterns(); a NaN or -inf total never wins, and a tile
    where none wins keeps its ``old`` pattern)."""
    patterns = transposable_patterns(kept.device)                          # (90, 16)
    cells = patterns.nonzero()[:, 1].view(-1, 8)                            # (90, 8) ascending
    outside = (~patterns).T.to(torch.float32)
    best = []
    for k, o, g in zip(kept.split(_TILES_PER_CHUNK), old.split(_TILES_PER_CHUNK), score.split(_TILES_PER_CHUNK)):
        fresh = torch.where(k, torch.zeros((), dtype=torch.float64), g.double())
        gain = fresh[:, cells[:, 0]]
        for j in range(1, 8):
            gain = gain + fresh[:, cells[:, j]]
        gain = gain.masked_fill_(gain.isnan() | ((k.to(torch.float32) @ outside) > 0), -math.inf)
        choice = gain.argmax(1)                                             # the first maximal on ties
        won = gain.gather(1, choice[:, None]).squeeze(1) > -math.inf
        best.append(torch.where(won[:, None], patterns[choice], o))
    return torch.cat(best) if best else kept


def semi_drop_grow(mask, drop, grow, n_drop, transposable, absolute, with_weight):
    active = mask.numel() // 2  # an exact 2:4 mask keeps half
    if not 0 <= n_drop <= active:
        raise ValueError(f"cannot drop {n_drop} of {active} active entries")
    check_2to4_mask(mask, transposable)
    drop_score, grow_score = (drop.abs(), grow.abs()) if absolute else (drop, grow)
    kept = mask & ~_smallest_mask(drop_score, mask, n_drop)
    kept_groups, grow_groups = _to_groups(kept, transposable), _to_groups(grow_score, transposable)
    if transposable:
        regrown = _grow_in_tiles(kept_groups, _to_groups(mask, True), grow_groups)
    else:
        regrown = _grow_in_rows(kept_groups, grow_groups)
    new_mask = _from_groups(regrown, mask.shape, transposable)
    if not with_weight:
        return new_mask, None
    return new_mask, torch.where(mask & new_mask, drop, torch.zeros((), dtype=drop.dtype, device=drop.device))


def _slot_map(old_indices, new_positions, cols):
    """int64 (rows, cols/2): for each new kept weight (``new_positions``, in-group positions of a
    2:4 layout) the flat slot of the same weight under ``old_indices``, or -1. Groups of four
    keep two weights each in both layouts, so this compares two against two per group."""
    rows, groups = new_positions.shape[0], cols // 4
    old = (unpack_columns(old_indices, cols) % 4).view(rows, groups, 2)
    new = new_positions.view(rows, groups, 2)
    first = torch.arange(0, rows * (cols // 2), 2, device=new.device).view(rows, groups, 1)  # old slot 0
    none = torch.full((), -1, dtype=torch.int64, device=new.device)
    slots = torch.where(new == old[..., :1], first, torch.where(new == old[..., 1:], first + 1, none))
    return slots.view(rows, cols // 2)


def semi_restructure(mask, old_indices, transposable):
    check_2to4_mask(mask, transposable)
    positions = kept_positions(mask)
    indices_t = pack_indices(kept_positions(mask.T.contiguous())) if transposable else None
    return _slot_map(old_indices, positions, mask.shape[1]), pack_indices(positions), indices_t


def semi_carry(tensor, slots):
    moved = tensor.reshape(-1)[slots.clamp_min(0)].view_as(slots)
    return torch.where(slots >= 0, moved, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def semi_decompress_sum(values, indices, cols):
    dense = decompress(values[0], indices[0], cols)
    for v, i in zip(values[1:], indices[1:]):
        dense = dense + decompress(v, i, cols)
    return dense


def semi_gather_kept(dense, indices):
    return dense.gather(1, unpack_columns(indices, dense.shape[1]))


register_kernel("semi_drop_grow", "reference", semi_drop_grow)
register_kernel("semi_restructure", "reference", semi_restructure)
register_kernel("semi_carry", "reference", semi_carry)
register_kernel("semi_decompress_sum", "reference", semi_decompress_sum)
register_kernel("semi_gather_kept", "reference", semi_gather_kept)
