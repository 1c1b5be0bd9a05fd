"""Pure update rules of dynamic sparse training at element and block granularity: tensors in, tensors out.

Every rule works elementwise on tensors of any shape; the drivers in
:mod:`sparsekern.methods.dst.drivers` apply the same rules to *block scores* (block
norms laid out on the block grid), so element, block and coarser granularities
share one implementation.

Conventions shared by every rule:
- ``mask`` is bool, same shape as ``weight``; weights outside the mask are ignored.
- ``n_drop = floor(active * drop_fraction)`` of the active entries with the
  smallest |weight| leave the mask, and as many enter it (nnz preserved).
- Entries that just left are eligible to come back. An entry that was active
  before and after keeps its weight; newly activated entries start at zero.
- Ties are broken deterministically: among equal scores the lower flat index
  (row-major) is dropped first and grown first.
"""
import math

import torch

from ..pruning.masks import topk_mask



def _check_pair(weight, mask):
    if not isinstance(weight, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"weight and mask must be tensors, got {type(weight).__name__} and {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if weight.shape != mask.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but mask has shape {tuple(mask.shape)}")


def _check_fraction(drop_fraction):
    if not isinstance(drop_fraction, (int, float)) or not 0.0 <= float(drop_fraction) <= 1.0:
        raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
    return float(drop_fraction)


def n_to_drop(active, drop_fraction):
    """floor(active * drop_fraction), robust to float round-off (0.3 * 10 is 3, not 2)."""
    return int(math.floor(active * drop_fraction + 1e-9))


def _smallest(score, eligible, k):
    """Flat indices of the k smallest ``score`` among ``eligible`` (ties: lower index first).

    Only eligible entries are ranked, so a NaN score can never pull an ineligible entry in
    (NaN ranks last here)."""
    where = eligible.reshape(-1).nonzero().squeeze(1)
    return where[torch.sort(score.reshape(-1)[where].double(), stable=True).indices[:k]]


def _largest(score, eligible, k):
    """Flat indices of the k largest ``score`` among ``eligible`` (ties: lower index first; NaN
    ranks last)."""
    where = eligible.reshape(-1).nonzero().squeeze(1)
    values = score.reshape(-1)[where].double()
    values = values.masked_fill(values.isnan(), -math.inf)  # nan_to_num would also clamp the infinities
    return where[torch.sort(values, descending=True, stable=True).indices[:k]]


def _largest_within(score, eligible, sizes, budget):
    """Flat indices of eligible entries taken by decreasing ``score`` (as :func:`_largest`)
    while their ``sizes`` (one per entry) fit in ``budget``: an entry too large is passed
    over, a smaller one further down may still fit."""
    order = _largest(score, eligible, int(eligible.sum()))
    taken, left, smallest = [], int(budget), int(sizes.min()) if sizes.numel() else 0
    for index, size in zip(order.tolist(), sizes.reshape(-1)[order].tolist()):
        if left < smallest:
            break
        if size <= left:
            taken.append(index)
            left -= size
    return torch.tensor(taken, dtype=torch.long, device=eligible.device)


def _regrow_budget(masks, kept, cell_sizes, target):
    """(weights per cell of each layer, weights to regrow): ``target`` (default: the stored
    weights before the drop) minus what the kept cells hold."""
    sizes = [1] * len(masks) if cell_sizes is None else [int(c) for c in cell_sizes]
    if len(sizes) != len(masks) or min(sizes, default=1) < 1:
        raise ValueError(f"cell_sizes needs one positive int per layer, got {cell_sizes!r}")
    before = sum(int(m.sum()) * c for m, c in zip(masks, sizes))
    target = before if target is None else int(target)
    return sizes, max(0, target - sum(int(k.sum()) * c for k, c in zip(kept, sizes)))


def drop_and_grow(mask, drop_score, grow_score, n_drop, n_grow):
    """The mask after removing the ``n_drop`` active entries of smallest ``drop_score``
    and adding the ``n_grow`` entries of largest ``grow_score`` among the others.

    Shapes: all three tensors alike; returns a new bool mask of that shape.
    """
    flat = mask.reshape(-1)
    active = int(flat.sum())
    if not 0 <= n_drop <= active:
        raise ValueError(f"cannot drop {n_drop} of {active} active entries")
    kept = flat.clone()
    kept[_smallest(drop_score.reshape(-1), flat, n_drop)] = False
    free = int((~kept).sum())
    if not 0 <= n_grow <= free:
        raise ValueError(f"cannot grow {n_grow} entries: only {free} are free")
    new = kept.clone()
    new[_largest(grow_score.reshape(-1), ~kept, n_grow)] = True
    return new.view(mask.shape)


def _new_weight(weight, mask, new_mask):
    """Survivors keep their value; everything else (dropped, grown) is zero."""
    return torch.where(new_mask & mask, weight, torch.zeros_like(weight))


def rigl_update(weight, mask, grad, drop_fraction):
    """RigL (Evci et al. 2020): drop the smallest |w|, grow the largest |dense grad|.

    Args:
        weight: any shape; mask: bool, same shape; grad: the dense gradient, same shape.
        drop_fraction: in [0, 1]; ``floor(active * drop_fraction)`` entries move.

    Returns ``(new_mask, new_weight)``: nnz preserved; new_weight is zero outside
    new_mask and at grown entries (new_mask & ~mask).
    """
    new_mask = rigl_new_mask(weight, mask, grad, drop_fraction)
    return new_mask, _new_weight(weight, mask, new_mask)


def rigl_new_mask(weight, mask, grad, drop_fraction):
    """The mask of :func:`rigl_update` alone (drivers move the weights themselves)."""
    _check_pair(weight, mask)
    if not isinstance(grad, torch.Tensor) or grad.shape != weight.shape:
        raise ValueError(f"grad must be a tensor of the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    n = n_to_drop(int(mask.sum()), _check_fraction(drop_fraction))
    return drop_and_grow(mask, weight.abs(), grad.abs(), n, n)


def set_update(weight, mask, drop_fraction, generator=None):
    """SET (Mocanu et al. 2018): drop the smallest |w|, grow at random among the inactive.

    Same conventions as :func:`rigl_update`; ``generator`` (a torch.Generator on
    the CPU) makes the random regrowth reproducible and identical across ranks.
    """
    new_mask = set_new_mask(weight, mask, drop_fraction, generator)
    return new_mask, _new_weight(weight, mask, new_mask)


def set_new_mask(weight, mask, drop_fraction, generator=None):
    """The mask of :func:`set_update` alone (drivers move the weights themselves)."""
    _check_pair(weight, mask)
    n = n_to_drop(int(mask.sum()), _check_fraction(drop_fraction))
    noise = torch.rand(mask.shape, generator=generator).to(weight.device)
    return drop_and_grow(mask, weight.abs(), noise, n, n)


def allocate(total, weights, capacity):
    """Split the integer ``total`` over layers proportionally to ``weights``, at most
    ``capacity[i]`` each; what a full layer cannot take goes to the others
    (water-filling), remainders by largest fraction then lower index. A weight that is not a
    finite number (NaN momentum) counts as 0.

    Returns a list of ints summing to min(total, sum(capacity)).
    """
    n = len(weights)
    out = [0] * n
    left = min(int(total), sum(capacity))
    open_ = [i for i in range(n) if capacity[i] > 0]
    while left > 0 and open_:
        w = [max(float(weights[i]), 0.0) if math.isfinite(float(weights[i])) else 0.0 for i in open_]
        if sum(w) == 0:
            w = [1.0] * len(open_)
        share = [left * wi / sum(w) for wi in w]
        room = [capacity[i] - out[i] for i in open_]
        take = [min(int(math.floor(s)), r) for s, r in zip(share, room)]
        # Largest remainders get one more, while they have room.
        order = sorted(range(len(open_)), key=lambda j: (-(share[j] - math.floor(share[j])), open_[j]))
        extra = left - sum(take)
        for j in order:
            if extra == 0:
                break
            if take[j] < room[j]:
                take[j] += 1
                extra -= 1
        for j, i in enumerate(open_):
            out[i] += take[j]
        left -= sum(take)
        open_ = [i for i in open_ if out[i] < capacity[i]]
    return out


def snfs_update(weights, masks, momenta, drop_fraction, grow_scores=None, *, cell_sizes=None, target=None):
    """Sparse momentum / SNFS (Dettmers & Zettlemoyer 2019) over a list of layers.

    Each layer drops ``floor(active * drop_fraction)`` entries of smallest |w|.
    The dropped total is redistributed over layers in proportion to each layer's
    mean |momentum| over its active entries (capped by free room), then each
    layer grows its share at the largest ``grow_scores`` (default |momentum|)
    among its non-kept entries. Total nnz is preserved; layer nnz may change.
    ``cell_sizes`` / ``target``: count the budget in weights (see :func:`snfs_new_masks`).

    Returns a list of ``(new_mask, new_weight)``, one per layer.
    """
    new_masks = snfs_new_masks(weights, masks, momenta, drop_fraction, grow_scores, cell_sizes=cell_sizes,
                               target=target)
    return [(n, _new_weight(w, m, n)) for w, m, n in zip(weights, masks, new_masks)]


def snfs_new_masks(weights, masks, momenta, drop_fraction, grow_scores=None, *, cell_sizes=None, target=None):
    """The masks of :func:`snfs_update` alone (drivers move the weights themselves).

    ``cell_sizes`` (one int per layer, default 1): the weights one mask entry stands for (a
    block of a linear layer, or of a convolution with all its taps). The regrown budget is
    counted in weights: ``target`` stored weights after the update (default: as many as
    before), so layers whose blocks differ in size exchange weights, not blocks; where
    block sizes differ it is met to within one block."""
    fraction = _check_fraction(drop_fraction)
    grow_scores = momenta if grow_scores is None else grow_scores
    if not len(weights) == len(masks) == len(momenta) == len(grow_scores):
        raise ValueError("weights, masks, momenta and grow_scores need one entry per layer")
    kept = []
    for w, m in zip(weights, masks):
        _check_pair(w, m)
        kept.append(drop_and_grow(m, w.abs(), w.abs(), n_to_drop(int(m.sum()), fraction), 0))
    sizes, budget = _regrow_budget(masks, kept, cell_sizes, target)
    importance = [float(mo.abs()[m].mean()) if bool(m.any()) else 0.0 for mo, m in zip(momenta, masks)]
    free = [int((~k).sum()) for k in kept]
    if len(set(sizes)) == 1:
        shares = allocate(budget // sizes[0], importance, free)
    else:  # split the weights, whole blocks per layer, then what is left block by block by importance
        shares = [w // c for w, c in zip(allocate(budget, importance, [f * c for f, c in zip(free, sizes)]), sizes)]
        left = budget - sum(n * c for n, c in zip(shares, sizes))
        for i in sorted(range(len(sizes)), key=lambda i: (-importance[i] if math.isfinite(importance[i]) else 0, i)):
            extra = min(left // sizes[i], free[i] - shares[i])
            shares[i] += extra
            left -= extra * sizes[i]
    return [drop_and_grow(k, w.abs(), g.abs(), 0, s) for w, k, s, g in zip(weights, kept, shares, grow_scores)]


def ggr_update(weights, masks, grads, drop_fraction, min_active=1, *, cell_sizes=None, target=None):
    """Global gradient-based redistribution (GGR, after Parger et al. 2022).

    Drop: each layer drops ``floor(active * drop_fraction)`` entries of smallest
    |w| (as RigL), but never below ``min_active`` active entries.
    Grow: the dropped total is regrown *globally*: the entries of largest |grad|
    over every layer's non-kept entries together (just-dropped ones eligible).
    Layers whose gradients are larger gain density, the others lose it; total
    nnz is preserved. ``grads`` must be comparable across layers (the drivers
    pass block RMS scores). ``cell_sizes`` / ``target``: count the budget in weights (see
    :func:`snfs_new_masks`).

    Returns a list of ``(new_mask, new_weight)``, one per layer.
    """
    new_masks = ggr_new_masks(weights, masks, grads, drop_fraction, min_active, cell_sizes=cell_sizes,
                              target=target)
    return [(n, _new_weight(w, m, n)) for w, m, n in zip(weights, masks, new_masks)]


def ggr_new_masks(weights, masks, grads, drop_fraction, min_active=1, *, cell_sizes=None, target=None):
    """The masks of :func:`ggr_update` alone (drivers move the weights themselves).
    ``cell_sizes`` and ``target``: as :func:`snfs_new_masks` (the regrown budget in weights)."""
    fraction = _check_fraction(drop_fraction)
    if not len(weights) == len(masks) == len(grads):
        raise ValueError("weights, masks and grads need one entry per layer")
    kept = []
    for w, m in zip(weights, masks):
        _check_pair(w, m)
        active = int(m.sum())
        kept.append(drop_and_grow(m, w.abs(), w.abs(), min(n_to_drop(active, fraction), max(0, active - min_active)), 0))
    sizes, budget = _regrow_budget(masks, kept, cell_sizes, target)
    free = torch.cat([(~k).reshape(-1) for k in kept])
    scores = torch.cat([g.abs().reshape(-1).double().to(free.device) for g in grads])
    grown = torch.zeros_like(free)
    if len(set(sizes)) == 1:
        grown[_largest(scores, free, budget // sizes[0])] = True
    else:
        per_entry = torch.cat([torch.full((k.numel(),), c, dtype=torch.long) for k, c in zip(kept, sizes)])
        grown[_largest_within(scores, free, per_entry.to(free.device), budget)] = True
    out, start = [], 0
    for k in kept:
        out.append(k | grown[start:start + k.numel()].view(k.shape))
        start += k.numel()
    return out


def topkast_masks(weight, forward_density, backward_density):
    """Top-KAST (Jayakumar et al. 2020): forward set A = top-D by |w|, backward set
    B = top-(D+M) by |w|, so A ⊆ B. Returns ``(forward_mask, backward_mask)``."""
    if not 0.0 <= forward_density <= backward_density <= 1.0:
        raise ValueError(f"need 0 <= forward_density <= backward_density <= 1, got "
                         f"{forward_density} and {backward_density}")
    n = weight.numel()
    forward = topk_mask(weight.abs(), int(round(forward_density * n)))
    backward = topk_mask(weight.abs(), int(round(backward_density * n)))
    return forward, backward


def topkast_penalty_grad(weight, forward_mask, forward_density, scale):
    """Gradient of Top-KAST's exploration penalty: ``scale * w`` on A and
    ``scale * w / D`` on B \\ A, so exploration weights must earn their place."""
    factor = torch.where(forward_mask, torch.ones_like(weight), torch.full_like(weight, 1.0 / max(forward_density, 1e-12)))
    return scale * factor * weight


def dpf_mask(dense_weight, density):
    """DPF (Lin et al. 2020): the mask is the top-``density`` |w| of the dense weight."""
    return topk_mask(dense_weight.abs(), int(round(density * dense_weight.numel())))
