"""``PartiallyTrainableConv2d``: the convolution counterpart of ``PartiallyTrainableLinear`` (freezing).

The full dense kernel is a buffer; the trainable part is a zero-initialised ``SparseConv2d``
of block deltas (output x input channel blocks with all their taps; see partially_trainable.py):

    y = conv(x, W_frozen) + conv(x, Δ) + b,   Δ block-sparse on the trainable set T.

The backward pass computes dX densely (through W_frozen, plus the sparse Δ part) and the weight
gradient only on T, so frozen blocks cost no dW work and no optimizer memory.
"""
import torch.nn.functional as F
from torch import nn

from .conv2d import SparseConv2d
from .dense_export import dense_conv2d
from .parameter import carry_requires_grad
from .partially_trainable import PartiallyTrainable


class PartiallyTrainableConv2d(PartiallyTrainable):
    """An ``nn.Conv2d`` with a frozen dense kernel and trainable block deltas on ``block_mask``.

    Args:
        conv: the ``nn.Conv2d`` (its kernel is copied into a buffer, its bias stays trainable).
        block_mask: bool (ceil(out / bs), ceil(in / groups / bs)) grid of the trainable blocks.
        block_size: channels per block side.
    """

    def __init__(self, conv, block_mask, *, block_size=32):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"PartiallyTrainableConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight.detach()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        delta = SparseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, bias=False, block_size=block_size, density=0.0,
                             padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        self._init_parts(weight, conv.bias, delta, block_mask)
        carry_requires_grad(conv, self)

    def to_dense(self):
        """The ``nn.Conv2d`` this layer stands for (effective kernel and bias, same device and dtype)."""
        return dense_conv2d(self, self.groups)

    def forward(self, x):
        return F.conv2d(x, self.frozen_weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups) + self.delta(x)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
                f"trainable={self.trainable_fraction:.4f}")
