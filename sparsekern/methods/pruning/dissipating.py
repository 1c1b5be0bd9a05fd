"""Dissipating gradients: prune the weights that barely moved from their initial value.

From "What to prune and what not to prune at initialization" (Haroon, arXiv
2209.02201): after the first epochs, a weight whose value stays within a small
fraction of its initial value received gradients that dissipated; it is pruned.
Our version works at block granularity on SparseLinear and SparseConv2d layers (a
convolution's block: output x input channels with all their taps): a block's score is
its relative change ||W_t - W_0|| / ||W_0|| since the snapshot, and the blocks that
moved least are removed (the same fraction in every layer, or globally, or below
a tolerance).
Starting from a denser sparse network (e.g. a K-starts winner at 2-4x the target
density) keeps the early epochs on the sparse kernels too: that is the
combination of the two methods.
"""
import torch

from ...nn.block_structure import BlockStructured
from ..dst.state import restructure
from .masks import global_topk_masks, topk_mask


def relative_change(initial, current, eps=1e-12):
    """Per stored block: ||current - initial|| / ||initial|| over the block (values (nnz, br, bc, *taps))."""
    if initial.shape != current.shape:
        raise ValueError(f"initial {tuple(initial.shape)} and current {tuple(current.shape)} differ in shape")
    change = (current.detach() - initial).flatten(1).float().norm(dim=1)
    return change / initial.flatten(1).float().norm(dim=1).clamp_min(eps)


class DissipatingGradients:
    """Snapshot a sparse model's weights now, prune its least-moved blocks later.

    Usage: ``dg = DissipatingGradients(model)``; train the first epochs;
    ``dg.prune(density=0.02, optimizer=opt)`` (fraction of all blocks of the model's
    SparseLinear and SparseConv2d layers, each layer shrunk by the same factor) or
    ``dg.prune(tolerance=0.05, optimizer=opt)`` (drop every block whose relative change is
    <= 5%). The surviving blocks keep their values and their state in ``opt``.
    """

    def __init__(self, model):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BlockStructured)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no SparseLinear or SparseConv2d layer; sparsify it first")
        self.initial = [(m.values.detach().clone(), m.layout()) for _, m in self.layers]

    def scores(self):
        """{layer name: (RB, CB) block grid of relative change; -1 where no block is stored}."""
        out = {}
        for (name, layer), (initial, layout) in zip(self.layers, self.initial):
            if layer.layout() is not layout:
                raise RuntimeError(f"layer {name!r} changed structure since the snapshot")
            grid = torch.full(layout.grid, -1.0, device=initial.device)
            grid[layout.row_indices, layout.col_indices] = relative_change(initial, layer.values)
            out[name] = grid
        return out

    def prune(self, *, density=None, tolerance=None, scope="layer", optimizer=None):
        """Keep the most-moved blocks. With ``density`` (fraction of all blocks of the
        block-sparse layers): ``scope="layer"`` shrinks every layer by the same factor,
        keeping its least-moved blocks out (the allocation, e.g. ERK, is preserved);
        ``scope="global"`` ranks all blocks together, which can empty whole layers, since
        under Adam a layer with a larger init scale moves less *relatively*. With
        ``tolerance``: drop every block whose relative change is <= tolerance. ``optimizer``:
        its per-weight state (momentum, Adam moments) follows the surviving blocks; without
        it, rebuild the optimizer (the ``values`` parameters change shape).
        Returns {layer name: new density}."""
        if (density is None) == (tolerance is None):
            raise ValueError("give exactly one of density or tolerance")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        scores = self.scores()
        names = list(scores)
        if tolerance is not None:
            masks = {n: scores[n] > tolerance for n in names}
        else:
            cells = sum(g.numel() for g in scores.values())
            stored = [int((scores[n] >= 0).sum()) for n in names]
            keep = min(int(round(density * cells)), sum(stored))
            if scope == "global":
                masks = dict(zip(names, global_topk_masks([scores[n] for n in names], keep)))
            else:
                factor = keep / max(1, sum(stored))
                masks = {n: topk_mask(scores[n], int(round(factor * k))) for n, k in zip(names, stored)}
        for name, layer in self.layers:
            if optimizer is None:
                layer.set_block_mask(masks[name])
            else:
                restructure(layer, optimizer, masks[name])
        self.initial = [(m.values.detach().clone(), m.layout()) for _, m in self.layers]
        return {name: layer.density for name, layer in self.layers}
