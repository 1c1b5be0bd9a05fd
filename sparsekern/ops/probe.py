"""Gradient probes: blocks whose weight gradient a backward computes besides the weight's own.

The dynamic-sparse-training methods read dense-gradient scores (a probe on every block) or
train blocks outside the forward set (Top-KAST's and DPF's shadow blocks) this way. A probe
enters the forward as a zero perturbation of the weight: its values are never read.
"""
import torch


class BlockProbe:
    """Probe blocks of a convolution: ``values`` (nnz, bs, bs, kh, kw), a leaf requiring grad,
    on ``layout`` (a BlockLayout of the layer's padded shape). The linear op takes a
    BlockSparseMatrix instead (the same two fields)."""

    def __init__(self, values, layout):
        expected = (layout.nnz_blocks, *layout.block_size)
        if tuple(values.shape[:3]) != expected:
            raise ValueError(f"probe values have shape {tuple(values.shape)}, the layout needs {expected} first")
        self.values, self.layout = values, layout


def own_positions(probe, layout):
    """Index in ``probe`` of each block of ``layout`` if the probe holds them all, else None.

    One host sync per (probe, layout) pair, cached on the probe; a compiled graph skips the
    sharing (the weight's gradient is then computed on its own)."""
    if torch.compiler.is_compiling():
        return None
    cached = getattr(probe, "_own_positions", None)
    if cached is not None and cached[0] is layout:
        return cached[1]
    positions = probe.layout.positions_of(layout)
    positions = positions if bool((positions >= 0).all()) else None
    probe._own_positions = (layout, positions)
    return positions
