"""Masks from scores: top-k at element, block or 2:4 granularity, global or layer-wise.

Pure functions. A *granularity* is a block size (rows, cols): (1, 1) is unstructured
(correct, but the kernels are then no faster than dense), (b, b) is block-sparse.
Conv weights (out, in, kh, kw) are scored as the (out, in*kh*kw) matrix whose blocks are
br output channels x bc input channels with all their kh*kw taps (bc*kh*kw columns): the
blocks ``SparseConv2d`` stores, so the block grid of a conv weight is (out/br, in/bc).
A block's score is the L2 norm of its element scores (``reduce="norm"``), or their
sum for signed scores such as GraSP (``reduce="sum"``). Edge blocks of a matrix
whose dims are not multiples of the block are scaled to a whole block's worth.
"""
import math

import torch
import torch.nn.functional as F

from ...formats.bsr import _as_block_size


def _as_matrix(score):
    if score.dim() < 2:
        raise ValueError(f"scores must have >= 2 dims (out, in, ...), got shape {tuple(score.shape)}")
    return score.reshape(score.shape[0], -1)


def _matrix_block(shape, block_size):
    """The block of ``_as_matrix(weight)`` that one block of a weight of ``shape`` covers:
    (br, bc) for a matrix, (br, bc * kh * kw) for a conv kernel (every tap of bc channels)."""
    br, bc = _as_block_size(block_size)
    return br, bc * math.prod(shape[2:])


def block_grid(shape, block_size):
    """Block grid of a weight of ``shape`` (padded up to whole blocks)."""
    (br, bc), rows, cols = _matrix_block(shape, block_size), shape[0], math.prod(shape[1:])
    return math.ceil(rows / br), math.ceil(cols / bc)


def block_scores(score, block_size, reduce="norm"):
    """(RB, CB) scores of the blocks of ``score``: norm (or sum) of element scores per block.

    Edge blocks that stick out of a non-multiple shape hold fewer real elements; their
    score is scaled to a whole block's worth (by sqrt(full/real) for the norm, full/real
    for the sum) so that padding does not make them look less important.
    """
    if reduce not in ("norm", "sum"):
        raise ValueError(f"reduce must be 'norm' or 'sum', got {reduce!r}")
    matrix, (br, bc) = _as_matrix(score), _matrix_block(score.shape, block_size)
    (rows, cols), (rb, cb) = matrix.shape, block_grid(score.shape, block_size)
    if rows % br or cols % bc:
        matrix = F.pad(matrix, (0, cb * bc - cols, 0, rb * br - rows))
    blocks = matrix.reshape(rb, br, cb, bc)
    out = blocks.sum((1, 3)) if reduce == "sum" else blocks.pow(2).sum((1, 3))
    if rows % br or cols % bc:
        real_rows = torch.full((rb,), br, dtype=out.dtype, device=out.device)
        real_rows[-1] = rows - (rb - 1) * br
        real_cols = torch.full((cb,), bc, dtype=out.dtype, device=out.device)
        real_cols[-1] = cols - (cb - 1) * bc
        out = out * ((br * bc) / torch.outer(real_rows, real_cols))
    return out if reduce == "sum" else out.sqrt()


def expand_block_mask(block_mask, block_size, shape):
    """Element mask of ``shape`` from a (RB, CB) block mask (padding cut off)."""
    br, bc = _matrix_block(shape, block_size)
    rows, cols = shape[0], math.prod(shape[1:])
    full = block_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return full[:rows, :cols].reshape(shape)


def _count(amount, total, what):
    """An int count, or a float fraction of ``total`` rounded to the nearest int."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{what} must be an int count or a float fraction, got {type(amount).__name__}")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"{what} as a fraction must be in [0, 1], got {amount}")
        return int(round(amount * total))
    if not 0 <= amount <= total:
        raise ValueError(f"{what} count must be in [0, {total}], got {amount}")
    return amount


def topk_mask(score, keep):
    """Bool mask of ``score``'s shape keeping its ``keep`` largest entries (int count, or float
    fraction of the entries, rounded to the nearest int). Ties: the lower flat index is kept
    first, so the result never depends on the sort's whims. O(n): a k-th value, no sort."""
    flat = score.reshape(-1)
    k = _count(keep, flat.numel(), "keep")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        above, tied = flat > threshold, flat == threshold
        mask = above | (tied & (tied.cumsum(0) <= k - int(above.sum())))
    return mask.view(score.shape)


def global_topk_masks(scores, keep):
    """Masks keeping the ``keep`` (int, or float fraction) largest entries across all ``scores``."""
    scores = list(scores)
    flat = torch.cat([s.flatten().to(torch.float64) for s in scores])
    joint = topk_mask(flat, keep)
    return [m.view(s.shape) for m, s in zip(joint.split([s.numel() for s in scores]), scores)]


def layerwise_topk_masks(scores, densities):
    """Per-layer masks: layer i keeps the fraction ``densities[i]`` of its largest entries."""
    scores, densities = list(scores), list(densities)
    if len(scores) != len(densities):
        raise ValueError(f"{len(scores)} score tensors but {len(densities)} densities")
    return [topk_mask(s, float(d)) for s, d in zip(scores, densities)]


def global_magnitude_mask(tensors, amount):
    """Bool keep-masks pruning the ``amount`` (int count or float fraction) smallest |w| of all tensors together."""
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    pruned = _count(amount, total, "amount")
    return global_topk_masks([t.detach().abs() for t in tensors], total - pruned)


def nm_mask(score, n=2, m=4):
    """N:M mask (2:4 by default): in every group of ``m`` consecutive inputs keep the ``n`` largest."""
    matrix = _as_matrix(score)
    if not 0 < n <= m or matrix.shape[1] % m:
        raise ValueError(f"{n}:{m} sparsity needs 0 < n <= m and an input dim divisible by {m}; "
                         f"scores have shape {tuple(score.shape)}")
    groups = matrix.reshape(matrix.shape[0], -1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    return mask.reshape(score.shape)
