"""Dense-gradient block scores of a :class:`sparsekern.SparseConv2d` layer for one step.

RigL, SNFS and GGR grow where the dense weight gradient is largest. For a convolution
that is, per block of output x input channels, the RMS over the block's channels and
all its taps of dW = the weight gradient of the dense convolution. At an update step the
probe keeps the layer's inputs (forward hook) and output gradients (tensor hook), and
:meth:`ConvScoreProbe.scores` runs the ``conv_grad_weight`` product on every block of
the grid once: one dense-sized dW per update, never a dense weight update.
"""
import torch

from ... import kernels
from ...formats.bsr import BlockLayout
from .scores import block_rms


class ConvScoreProbe:
    """Installs the hooks; :meth:`scores` gives the (R, C) grid after a backward; :meth:`remove`."""

    def __init__(self, layer):
        self.layer = layer
        self.xs, self.dys = [], []
        self._handle = layer.register_forward_hook(self._after)

    def _after(self, module, args, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        call = len(self.xs)
        x = args[0].detach()
        self.xs.append(x.unsqueeze(0) if x.dim() == 3 else x)
        self.dys.append(None)  # filled by the backward

        def keep(dy):
            self.dys[call] = dy.detach().unsqueeze(0) if dy.dim() == 3 else dy.detach()
        output.register_hook(keep)

    def scores(self, name):
        """(R, C) block RMS of the dense weight gradient of the last backward (float32; fp64 stays)."""
        if not self.dys or any(dy is None for dy in self.dys):
            raise RuntimeError(f"no gradient reached the probe of layer {name!r}: run forward and backward "
                               "between two calls of step()")
        layer = self.layer
        geometry = layer.geometry
        full = BlockLayout.from_block_mask(torch.ones_like(layer.block_mask), geometry.padded_shape,
                                           (layer.block_size, layer.block_size))
        dtype = torch.float64 if layer.values.dtype == torch.float64 else torch.float32
        _, grad_weight = kernels.select_kernel("conv_grad_weight", self.xs[0].device, dtype)
        # Several calls in one step: dW sums over all of them.
        grad = None
        for x, dy in zip(self.xs, self.dys):
            part = grad_weight(dy.to(dtype), x.to(dtype), full, geometry)
            grad = part if grad is None else grad + part
        grid = grad.new_zeros(full.grid)
        grid[full.row_indices, full.col_indices] = block_rms(grad)
        return grid

    def remove(self):
        self._handle.remove()
