"""DST at 2:4 granularity: the parts of the drivers that act on static
:class:`sparsekern.SemiSparseLinear` layers.

- **Scores without a dense update.** A layer's dense gradient dYᵀX splits into
  its kept positions (the ``values`` gradient the normal backward computes
  anyway) and the others: the complement of a 2:4 mask is itself 2:4 (and
  transposable if the mask is), so :class:`SemiProbe` gets the rest with the
  same sampled-dW 2:4 kernel on the complement's indices, from the layer's
  input and output gradient captured by hooks for that one step. Nothing of
  W's dense shape is updated.
- **Structure change.** :func:`restructure_semi` calls ``set_mask`` (``values``
  keeps identity and shape; its slots are refilled) and moves every optimizer
  state tensor shaped like the values the same way: surviving weights keep
  their state, regrown ones start at zero, scalar state (Adam's ``step``) is kept.

On the CPU the slot moves and the dense-gradient merge run in C++
(csrc/semi/dst_update.cpp), with the plain-torch code as the fallback
(the ``semi_carry`` and ``semi_decompress_sum`` kernels).
"""
import torch

from ...kernels import forced_backend
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

    ``grad`` (rows, cols/2) holds it after the backward, laid out on
    ``indices`` (the complement's); :meth:`dense_grad` merges it with the
    layer's own ``values.grad`` into the dense (rows, cols) gradient.
    """

    def __init__(self, layer):
        self.layer, self.grad, self.indices = layer, None, None
        self._handle = layer.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        self.indices = complement_indices(module.indices)
        x = inputs[0].detach().reshape(-1, module.in_features).contiguous()
        backend = forced_backend()  # the hook may run where the forward's forced backend is not set
        output.register_hook(lambda dy: self._backward(dy, x, backend))

    def _backward(self, dy, x, backend):
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()
        grad = semi_kernels.grad_weight(dy, x, self.indices, backend)
        self.grad = grad if self.grad is None else self.grad + grad

    def dense_grad(self, name):
        """The dense (rows, cols) gradient of the last backward: kept part from ``values.grad``."""
        own = self.layer.values.grad
        if self.grad is None or own is None:
            raise RuntimeError(f"no gradient reached the probe of layer {name!r}: run forward and backward "
                               "between two calls of step()")
        return semi_kernels.decompress_sum([own.detach(), self.grad], [self.layer.indices, self.indices],
                                           self.layer.in_features)

    def remove(self):
        self._handle.remove()
