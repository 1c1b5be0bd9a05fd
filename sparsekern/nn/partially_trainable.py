"""``PartiallyTrainable``: what the frozen-weight-plus-block-deltas layers share (freezing).

The full dense weight is a *buffer* (no gradient, no optimizer state); the trainable part
is a zero-initialised block-sparse ``delta`` layer of the same shape, so frozen blocks cost
no weight-gradient work and no optimizer memory. Subclasses: ``PartiallyTrainableLinear``,
``PartiallyTrainableConv2d``.
"""
from torch import nn


class PartiallyTrainable(nn.Module):
    """Base: a ``frozen_weight`` buffer, a block-sparse ``delta`` layer and an optional ``bias``."""

    def _init_parts(self, weight, bias, delta, block_mask):
        self.register_buffer("frozen_weight", weight.detach().clone())
        self.delta = delta
        self.delta.set_block_mask(block_mask)  # new blocks start at zero: Δ = 0
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def block_mask(self):
        return self.delta.block_mask

    @property
    def trainable_fraction(self):
        return self.delta.density

    def dense_weight(self):
        """The weight the forward uses: frozen part plus the trained deltas."""
        return self.frozen_weight + self.delta.dense_weight()
