"""Gradient probes: blocks whose weight gradient a backward computes besides the weight's own.

The dynamic-sparse-training methods read dense-gradient scores (a probe on every block) or
train blocks outside the forward set (Top-KAST's and DPF's shadow blocks) this way. A probe
enters the forward as a zero perturbation of the weight: its values are never read.
"""
import weakref

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


# probe layout -> (weak reference to the weight's layout, positions or None). Keyed on the
# layouts, not on the probe object: layers under autocast wrap the same probe layout in a new
# matrix on every call, and a layout is rebuilt only when a structure changes.
_positions = weakref.WeakKeyDictionary()


def own_positions(probe, layout):
    """Index in ``probe`` of each block of ``layout`` if the probe holds them all, else None.

    Decided once per (probe layout, weight layout) pair, i.e. once per structure change, and
    kept as host state: the calls in between read no device value. A probe on every block of
    the grid holds them all without looking. A compiled graph skips the sharing (the weight's
    gradient is then computed on its own)."""
    if torch.compiler.is_compiling():
        return None
    cached = _positions.get(probe.layout)
    if cached is not None and cached[0]() is layout:
        return cached[1]
    positions = probe.layout.positions_of(layout)
    grid = probe.layout.grid
    if probe.layout.nnz_blocks != grid[0] * grid[1] and not bool((positions >= 0).all()):
        positions = None
    _positions[probe.layout] = (weakref.ref(layout), positions)
    return positions
