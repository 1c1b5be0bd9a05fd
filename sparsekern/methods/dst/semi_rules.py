"""Pure update rules of dynamic sparse training at 2:4 granularity: the result is 2:4 again.

Conventions as in :mod:`sparsekern.methods.dst.rules` (nnz preserved, survivors keep
their weight, ties to the lower flat index). The drop is global over the tensor; the
regrowth happens inside each group of four (or 4x4 tile if transposable), so every
group regrows exactly what it lost.
"""
import torch

from ...formats.semi_prune import check_2to4_shape
from ...kernels import semi as semi_kernels
from .rules import _check_fraction, _check_pair, n_to_drop


def _semi_rule(mask, drop, grow, n_drop, transposable, absolute=False, with_weight=False):
    """``(new_mask, new_weight)`` of the 2:4 rule on scores ``|drop|``, ``|grow|`` (or the scores
    themselves if not ``absolute``); new_weight (only if ``with_weight``, else None) is ``drop``
    where kept before and after, else zero. The ``semi_drop_grow`` kernel: C++ on the CPU for
    float32/float64 scores, plain torch elsewhere (both check the mask and ``n_drop``)."""
    for name, score in (("drop_score", drop), ("grow_score", grow)):
        if not isinstance(score, torch.Tensor) or score.shape != mask.shape:
            raise ValueError(f"{name} must be a tensor of the mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}")
    return semi_kernels.drop_grow(mask, drop, grow, n_drop, transposable, absolute, with_weight)


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
