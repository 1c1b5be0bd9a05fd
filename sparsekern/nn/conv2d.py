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
import re
import warnings

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..formats.bsr import BlockLayout, carry_blocks
from ..kernels.conv import ConvGeometry, block_norms, dense_conv_weight, gather_blocks
from ..ops.conv2d import sparse_conv2d
from .autocast import autocast_dtype, cast, outside_autocast
from .bsr_linear import _blocks_to_keep, _check_density, _check_features, _warn_if_crippled
from .parameter import replace_data_

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


class SparseConv2d(nn.Module):
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
        _check_density(density)
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
        grid = self.geometry.grid
        cells = grid[0] * grid[1]
        keep = torch.randperm(cells)[:_blocks_to_keep(density, cells)]
        block_mask = torch.zeros(cells, dtype=torch.bool)
        block_mask[keep] = True
        self.register_buffer("block_mask", block_mask.view(grid).to(device))
        self._layout = BlockLayout.from_block_mask(self.block_mask, self.geometry.padded_shape, (block_size,) * 2)
        self.values = nn.Parameter(torch.empty(self._layout.nnz_blocks, block_size, block_size, *self.kernel_size,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        if density > 0:
            _warn_crippled_conv(self, density)

    def _fan_in(self):
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self):
        """nn.Conv2d's initialisation (U(±1/sqrt(fan_in)) for weight and bias) on the stored blocks."""
        bound = 1.0 / math.sqrt(self._fan_in())
        self.reset_values(bound)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def reset_values(self, bound=None, blocks=None):
        """Draw U(±bound) on the stored blocks (nn.Conv2d's bound 1/sqrt(fan_in) by default), or only
        on the blocks at indices ``blocks``; the bias is left alone (as SparseLinear.reset_values)."""
        bound = 1.0 / math.sqrt(self._fan_in()) if bound is None else float(bound)
        with torch.no_grad():
            if blocks is None:
                self.values.uniform_(-bound, bound)
            else:
                self.values[blocks] = torch.empty_like(self.values[blocks]).uniform_(-bound, bound)
            self._zero_padding()

    @classmethod
    def from_dense(cls, conv, *, block_size=32, density=None, block_mask=None):
        """Convert an ``nn.Conv2d``. Keeps ``block_mask`` if given, else the blocks of largest
        Frobenius norm (over all taps) at ``density``, else every block holding a nonzero (exact)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if density is not None and block_mask is not None:
            raise ValueError("give either density or block_mask, not both")
        weight = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, block_size=block_size, density=0.0,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
        norms = block_norms(weight, layer.geometry)
        if block_mask is None:
            block_mask = norms > 0
            if density is not None:
                keep = torch.topk(norms.flatten(), _blocks_to_keep(density, norms.numel())).indices
                block_mask = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
                block_mask[keep] = True
                block_mask = block_mask.view(norms.shape)
        layout = BlockLayout.from_block_mask(block_mask.to(weight.device), layer.geometry.padded_shape,
                                             (block_size, block_size))
        layer._adopt(layout, gather_blocks(weight, layout, layer.geometry))
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    @property
    def density(self):
        return self._layout.density

    @property
    def nnz_blocks(self):
        return self._layout.nnz_blocks

    @property
    def mask(self):
        """The structure the methods act on: the bool block grid (alias of ``block_mask``)."""
        return self.block_mask

    def layout(self):
        """The block structure (rebuilt if the module moved to another device)."""
        if self._layout.device != self.block_mask.device:
            self._layout = self._layout.to(self.block_mask.device)
        return self._layout

    def dense_weight(self):
        """The dense (out_channels, in_channels / groups, kh, kw) weight, zero outside stored blocks."""
        return dense_conv_weight(self.values, self.layout(), self.geometry)

    def to_dense(self):
        """The ``nn.Conv2d`` this layer stands for (same configuration, device and dtype)."""
        weight = self.dense_weight().detach()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def set_block_mask(self, block_mask):
        """Change the structure: surviving blocks keep their values, new blocks start at zero
        (the ``values`` parameter keeps its identity; its ``.grad`` is cleared)."""
        self.restructure(block_mask)

    def restructure(self, structure, values=None):
        """Install ``structure`` (a bool block grid, or a BlockLayout of this layer's padded
        shape and block size); returns the slot map (int64 (new nnz,): each new block's index
        in the old ``values``, or -1 for a new block), as SparseLinear.restructure.
        ``values`` (new nnz, bs, bs, kh, kw) if given, else survivors keep theirs, new blocks are zero."""
        shape, block = self.geometry.padded_shape, (self.block_size, self.block_size)
        if isinstance(structure, BlockLayout):
            if structure.shape != shape or structure.block_size != block:
                raise ValueError(f"layout of shape {structure.shape} and block size {structure.block_size} does "
                                 f"not fit this layer ({shape}, {block})")
            layout = structure.to(self.block_mask.device)
        else:
            layout = BlockLayout.from_block_mask(structure.to(self.block_mask.device), shape, block)
        slots = self.layout().positions_of(layout)
        expected = (layout.nnz_blocks, *block, *self.kernel_size)
        if values is None:
            values = self.carry(self.values.detach(), slots)
        elif tuple(values.shape) != expected:
            raise ValueError(f"values has shape {tuple(values.shape)}, the layout needs {expected}")
        self._adopt(layout, values)
        return slots

    @staticmethod
    def carry(tensor, slots):
        """``tensor`` shaped like the old ``values`` moved by :meth:`restructure`'s slot map
        (zero for new blocks)."""
        return carry_blocks(tensor, slots)

    def _adopt(self, layout, values):
        self.block_mask = layout.block_mask
        self._layout = layout
        replace_data_(self.values, values.to(self.values.dtype))

    def _zero_padding(self):
        """Zero the channels of edge blocks past out_channels / past a group's in_channels."""
        layout, bs, (rows, cols) = self._layout, self.block_size, self.geometry.grid
        pad_rows = rows * bs - self.out_channels
        pad_cols = cols * bs - self.in_channels // self.groups
        if pad_rows:
            self.values.data[layout.row_indices == rows - 1, bs - pad_rows:] = 0
        if pad_cols:
            self.values.data[layout.col_indices == cols - 1, :, bs - pad_cols:] = 0

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"SparseConv2d expects a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        values, bias = self.values, self.bias
        dtype = autocast_dtype(x, values.dtype)
        if dtype is not None:
            x, values, bias = cast(x, dtype), cast(values, dtype), cast(bias, dtype)
            with outside_autocast(x):
                y = sparse_conv2d(x, values, self.layout(), self.geometry, bias)
        else:
            y = sparse_conv2d(x, values, self.layout(), self.geometry, bias)
        return y.squeeze(0) if unbatched else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The padded storage cannot tell 50 from 60 input channels: the true shape goes into
        # the module's state-dict metadata, checked on load.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", {}).get(prefix[:-1])
        if metadata is not None:
            metadata["conv_shape"] = self._shape_key()

    def _shape_key(self):
        return (self.out_channels, self.in_channels, *self.kernel_size, self.groups)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = local_metadata.get("conv_shape")
        if saved is not None and tuple(saved) != self._shape_key():
            error_msgs.append(f"size mismatch for {prefix}values: copying a SparseConv2d of (out, in, kh, kw, groups) "
                              f"= {tuple(saved)} into one of {self._shape_key()}")
            return
        # Adopt the saved structure first, so a checkpoint with another number of stored blocks loads.
        saved_mask = state_dict.get(prefix + "block_mask")
        if saved_mask is not None and tuple(saved_mask.shape) == tuple(self.block_mask.shape):
            self.set_block_mask(saved_mask.to(torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + (f", bias={self.bias is not None}, block_size={self.block_size}, "
                       f"density={self.density:.4f} ({self.nnz_blocks} blocks)")


class _AsLinear:
    """The block grid and sizes of a conv layer, as SparseLinear's crippled-layer rule reads them."""

    def __init__(self, layer):
        self.in_features, self.out_features = layer.in_channels // layer.groups, layer.out_channels
        self.block_size, self.block_mask = (layer.block_size,) * 2, layer.block_mask


def _warn_crippled_conv(layer, density):
    """SparseLinear's crippled-layer warning (no block at all, or a tenth of the output block
    rows empty), naming this layer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_if_crippled(_AsLinear(layer), density)
    what = (f"SparseConv2d({layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
            f"groups={layer.groups}, block_size={layer.block_size}, density={density})")
    for record in caught:
        message = re.sub(r"^SparseLinear\(.*?density=[^)]*\)", lambda _: what, str(record.message))
        warnings.warn(message, record.category, stacklevel=3)
