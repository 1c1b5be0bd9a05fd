"""``ConvGeometry``: the shape of one block-sparse convolution, shared by every conv kernel.

The weight (out_channels, in_channels / groups, kh, kw) is cut into blocks of
``block_size`` output x ``block_size`` input channels, each holding all kh x kw taps:
``values`` (nnz, bs, bs, kh, kw) on a ``BlockLayout`` of shape (RB * bs, CB * bs) with
RB = ceil(out_channels / bs) and CB = ceil(in_channels / groups / bs). Block column c
means input channels [c * bs, (c + 1) * bs) *within a group*: every group shares the
column grid. With groups > 1, block row r belongs to group r * bs // (out_channels /
groups), which is why each group must hold a whole number of block rows. Channels past
out_channels or past a group's in_channels are padding: zero, and they stay zero.
Padding is explicit per side (top, bottom, left, right), so "same" with an even kernel
needs no extra copy.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple   # (kh, kw)
    stride: tuple        # (sh, sw)
    padding: tuple       # (top, bottom, left, right)
    dilation: tuple      # (dh, dw)
    block_size: int

    @property
    def in_per_group(self):
        return self.in_channels // self.groups

    @property
    def out_per_group(self):
        return self.out_channels // self.groups

    @property
    def grid(self):
        """(RB, CB): the block grid of the weight."""
        bs = self.block_size
        return -(-self.out_channels // bs), -(-self.in_per_group // bs)

    @property
    def padded_shape(self):
        """(RB * bs, CB * bs): the shape of the layout over the weight's (out, in / groups) channels."""
        rb, cb = self.grid
        return rb * self.block_size, cb * self.block_size

    @property
    def symmetric_padding(self):
        """(ph, pw) when top == bottom and left == right, else None."""
        t, b, l, r = self.padding
        return (t, l) if t == b and l == r else None

    def output_size(self, height, width):
        (kh, kw), (sh, sw), (t, b, l, r), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (height + t + b - dh * (kh - 1) - 1) // sh + 1, (width + l + r - dw * (kw - 1) - 1) // sw + 1

    def as_list(self):
        """The int list the compiled ops take: [C, O, G, KH, KW, sh, sw, pt, pb, pl, pr, dh, dw, bo, bi]."""
        return [self.in_channels, self.out_channels, self.groups, *self.kernel_size, *self.stride, *self.padding,
                *self.dilation, self.block_size, self.block_size]

    @classmethod
    def from_list(cls, values):
        c, o, g, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, bo, _ = (int(v) for v in values)
        return cls(c, o, g, (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw), bo)


def output_memory_format(x):
    """The memory format F.conv2d gives its output for input ``x``: channels-last for a
    channels-last input (one that is not also plain contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
