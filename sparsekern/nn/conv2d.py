"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is block-sparse over channels.

The weight (out_channels, in_channels / groups, kh, kw) is cut into blocks of
``block_size`` output x ``block_size`` input channels, each holding all kh x kw taps; only
stored blocks exist, as a ``values`` parameter (nnz, bs, bs, kh, kw) plus a ``block_mask``
buffer over the block grid (ceil(out_channels / bs), ceil(in_channels / groups / bs)).
Channel counts that are not multiples of the block size are padded up internally (edge
blocks carry zero channels that stay zero). With groups > 1 the block columns index the
input channels *within* a group and every group holds whole block rows, so
out_channels / groups must be a multiple of block_size (a clear error otherwise).
"""
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..formats.bsr import BlockLayout
from ..kernels.conv import ConvGeometry, block_norms, dense_conv_weight, gather_blocks
from ..ops.conv2d import sparse_conv2d
from ..ops.probe import BlockProbe
from .autocast import autocast_dtype, cast, outside_autocast
from .block_structure import DTYPES as _DTYPES
from .block_structure import BlockStructured, check_density, check_from_dense, top_block_mask, warn_if_crippled
from .bsr_linear import _check_features
from .dense_export import dense_conv2d
from .parameter import carry_requires_grad


def _positive_pair(name, value):
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return tuple(pair)


def _explicit_padding(padding, kernel_size, stride, dilation):
    """(top, bottom, left, right) for nn.Conv2d's ``padding`` argument (int, pair, "same", "valid")."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
        sides = []
        for k, d in zip(kernel_size, dilation):  # as F.conv2d: the odd extra on the bottom / right
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    pair = _pair(padding)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pair):
        raise ValueError(f"padding must be 'same', 'valid', a non-negative int or a pair of them, got {padding!r}")
    return pair[0], pair[0], pair[1], pair[1]


class SparseConv2d(BlockStructured):
    """nn.Conv2d with a block-sparse weight; forward, dX and dW touch stored blocks only
    (where that beats dense F.conv2d; see docs/conv.md).

    Args: as nn.Conv2d (``padding_mode`` "zeros" only), plus
        block_size: channels per block side (each block holds all kh x kw taps).
        density: fraction of blocks stored, chosen uniformly at random.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 *, block_size=32, density=1.0, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                            ("block_size", block_size)):
            _check_features(name, value)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if groups > 1 and (out_channels // groups) % block_size:
            raise ValueError(f"with groups={groups}, out_channels / groups = {out_channels // groups} must be a "
                             f"multiple of block_size={block_size} so that no output block row spans two groups; "
                             "choose a block_size that divides it")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"SparseConv2d supports dtypes {_DTYPES}, got {dtype}")
        check_density(density)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _positive_pair("kernel_size", kernel_size)
        self.stride = _positive_pair("stride", stride)
        self.dilation = _positive_pair("dilation", dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.block_size = block_size
        self.geometry = ConvGeometry(in_channels, out_channels, groups, self.kernel_size, self.stride,
                                     _explicit_padding(padding, self.kernel_size, self.stride, self.dilation),
                                     self.dilation, block_size)
        self._init_blocks(density, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        # Optional BlockProbe whose values receive the weight gradient on its blocks at the next
        # backward (see sparse_conv2d): how DST methods get gradient scores and shadow gradients.
        self.grad_probe = None
        self.reset_parameters()
        if density > 0:
            warn_if_crippled(self.block_mask, f"SparseConv2d({in_channels}, {out_channels}, "
                                              f"kernel_size={self.kernel_size}, groups={groups}, "
                                              f"block_size={block_size}, density={density})")

    def _block_structure(self):
        return ((self.out_channels, self.in_channels // self.groups), self.geometry.padded_shape,
                (self.block_size, self.block_size), self.kernel_size)

    def _default_bound(self):
        return 1.0 / math.sqrt(self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1])

    @classmethod
    def from_dense(cls, conv, *, block_size=32, density=None, block_mask=None):
        """Convert an ``nn.Conv2d``. Keeps ``block_mask`` if given, else the blocks of largest
        Frobenius norm (over all taps) at ``density``, else every block holding a nonzero (exact)."""
        check_from_dense(conv, nn.Conv2d, density, block_mask)
        weight = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, block_size=block_size, density=0.0,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        norms = block_norms(weight, layer.geometry)
        if block_mask is None:
            block_mask = norms > 0 if density is None else top_block_mask(norms, density)
        layout = BlockLayout.from_block_mask(block_mask.to(weight.device), layer.geometry.padded_shape,
                                             (block_size, block_size))
        layer._adopt(layout, gather_blocks(weight, layout, layer.geometry))
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return carry_requires_grad(conv, layer)

    @property
    def padded_shape(self):
        """(rows, cols) of the blocked weight matrix: channels padded up to whole blocks."""
        return self.geometry.padded_shape

    def dense_weight(self):
        """The dense (out_channels, in_channels / groups, kh, kw) weight, zero outside stored blocks."""
        return dense_conv_weight(self.values, self.layout(), self.geometry)

    def to_dense(self):
        """The ``nn.Conv2d`` this layer stands for (same configuration, device and dtype)."""
        return dense_conv2d(self, self.groups)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"SparseConv2d expects a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        values, bias, probe = self.values, self.bias, self.grad_probe
        dtype = autocast_dtype(x, values.dtype)
        if dtype is not None:
            x, values, bias = cast(x, dtype), cast(values, dtype), cast(bias, dtype)
            probe = None if probe is None else BlockProbe(cast(probe.values, dtype), probe.layout)
            with outside_autocast(x):
                y = sparse_conv2d(x, values, self.layout(), self.geometry, bias, grad_probe=probe)
        else:
            y = sparse_conv2d(x, values, self.layout(), self.geometry, bias, grad_probe=probe)
        return y.squeeze(0) if unbatched else y

    _shape_metadata, _shape_description = "conv_shape", "SparseConv2d of (out, in, kh, kw, groups)"

    def _shape_key(self):
        return (self.out_channels, self.in_channels, *self.kernel_size, self.groups)

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + (f", bias={self.bias is not None}, block_size={self.block_size}, "
                       f"density={self.density:.4f} ({self.nnz_blocks} blocks)")
