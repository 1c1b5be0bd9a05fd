"""DST at 2:4 granularity: the parts of the drivers that act on static
:class:`sparsekern.SemiSparseLinear` layers.

- **Scores without a dense update.** A layer's dense gradient dYᵀX splits into
  its kept positions (the ``values`` gradient the normal backward computes
  anyway) and the others: the complement of a 2:4 mask is itself 2:4 (and
  transposable if the mask is), so :class:`SemiProbe` gets the rest with the
  same sampled-dW 2:4 kernel on the complement's indices, inside the layer's
  backward (the probe is an input of ``semi_linear``'s op). Nothing of W's
  dense shape is updated.
- **Structure change.** :func:`restructure_semi` calls ``set_mask`` (``values``
  keeps identity and shape; its slots are refilled) and moves every optimizer
  state tensor shaped like the values the same way: surviving weights keep
  their state, regrown ones start at zero, scalar state (Adam's ``step``) is kept.

On the CPU the slot moves and the dense-gradient merge run in C++
(csrc/semi/dst_update.cpp), with the plain-torch code as the fallback
(the ``semi_carry`` and ``semi_decompress_sum`` kernels).
"""
import torch

from ...formats.semi import SemiStructuredMatrix
from ...kernels import semi as semi_kernels


def _complement_nibble(nibble):
    """Packed positions (lo | hi << 2, lo < hi) of a group's two kept entries -> those of the other
    two; 0 (padding, never a valid pair) stays 0."""
    lo, hi = nibble & 3, nibble >> 2
    if lo >= hi:
        return 0
    rest = [p for p in range(4) if p not in (lo, hi)]
    return rest[0] | rest[1] << 2


# Packed-indices byte (two groups) -> the byte of the complement mask's indices.
_COMPLEMENT = [_complement_nibble(b & 15) | _complement_nibble(b >> 4) << 4 for b in range(256)]


def complement_indices(indices):
    """Packed 2:4 indices of the complement of the mask ``indices`` encode (a 2:4 mask's complement
    is 2:4, and transposable if the mask is): one table lookup per byte."""
    table = torch.tensor(_COMPLEMENT, dtype=torch.uint8, device=indices.device)
    return table[indices.long()]


class SemiProbe:
    """For one step: dYᵀX of a static SemiSparseLinear on the complement of its mask.

    Installs the layer's ``grad_probe`` (zero values on the complement's indices, an input of
    the traced op, so a compiled model computes it too); after the backward
    :meth:`dense_grad` merges its gradient with the layer's own ``values.grad`` into the
    dense (rows, cols) gradient.
    """

    def __init__(self, layer):
        self.layer = layer
        # A plain tensor of the full shape (under FSDP2 the layer's values are a sharded DTensor).
        values = torch.zeros(tuple(layer.values.shape), dtype=layer.values.dtype, device=layer.indices.device,
                             requires_grad=True)
        self.probe = SemiStructuredMatrix(values, complement_indices(layer.indices),
                                          (layer.out_features, layer.in_features))
        layer.grad_probe = self.probe

    def dense_grad(self, name):
        """The dense (rows, cols) gradient of the last backward: kept part from ``values.grad``."""
        own, rest = self.layer.values.grad, self.probe.values.grad
        if rest is None or own is None:
            raise RuntimeError(f"no gradient reached the probe of layer {name!r}: run forward and backward "
                               "between two calls of step()")
        return semi_kernels.decompress_sum([own.detach(), rest], [self.layer.indices, self.probe.indices],
                                           self.layer.in_features)

    def remove(self):
        self.layer.grad_probe = None
