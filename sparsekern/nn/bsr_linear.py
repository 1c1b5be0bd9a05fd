"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is block-sparse.

The weight is stored as a block-CSR ``values`` parameter (nnz, br, bc) plus a
``block_mask`` buffer over the block grid. Feature counts that are not
multiples of the block size are padded up internally: edge blocks carry zero
rows/columns that stay zero under training (their gradients are exactly zero).
"""
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bsr import BlockLayout, BlockSparseMatrix, _as_block_size, carry_blocks, values_to_dense
from ..ops.bsr_linear import bsr_linear
from ..ops.checks import check_layer_input
from .autocast import autocast_dtype, cast, outside_autocast
from .dense_export import dense_linear
from .parameter import replace_data_

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_features(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_density(density):
    if not isinstance(density, (int, float)) or not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return float(density)


def _blocks_to_keep(density, cells):
    return int(round(_check_density(density) * cells))


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W block-sparse; forward, dX and dW touch stored blocks only.

    Args:
        in_features, out_features: any positive ints (padded up to whole blocks).
        bias: learn an additive bias.
        block_size: int or (rows, cols) of a block.
        density: fraction of blocks stored, chosen uniformly at random.
        device, dtype: of the parameters (float32, float64, bfloat16 or float16).
    """

    def __init__(self, in_features, out_features, bias=True, *, block_size=32, density=1.0,
                 device=None, dtype=None):
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"SparseLinear supports dtypes {_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = _as_block_size(block_size)
        br, bc = self.block_size
        self.padded_shape = (math.ceil(out_features / br) * br, math.ceil(in_features / bc) * bc)
        grid = (self.padded_shape[0] // br, self.padded_shape[1] // bc)
        cells = grid[0] * grid[1]
        keep = torch.randperm(cells)[:_blocks_to_keep(density, cells)]
        block_mask = torch.zeros(cells, dtype=torch.bool)
        block_mask[keep] = True
        self.register_buffer("block_mask", block_mask.view(grid).to(device))
        self._layout = BlockLayout.from_block_mask(self.block_mask, self.padded_shape, self.block_size)
        self.values = nn.Parameter(torch.empty(self._layout.nnz_blocks, br, bc, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # Optional BlockSparseMatrix over the padded weight whose values receive dYᵀX on its
        # blocks at the next backward (see bsr_linear): how DST methods get gradient scores.
        self.grad_probe = None
        self.reset_parameters()
        if density > 0:
            _warn_if_crippled(self, density)

    def reset_parameters(self):
        """nn.Linear's initialisation (U(±1/sqrt(in_features))) on the stored blocks and the bias."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.reset_values(bound)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def reset_values(self, bound=None, blocks=None):
        """Draw U(±bound) on the stored blocks (nn.Linear's bound 1/sqrt(in_features) by default),
        or only on the blocks at indices ``blocks``; the bias is left alone."""
        bound = 1.0 / math.sqrt(self.in_features) if bound is None else float(bound)
        with torch.no_grad():
            if blocks is None:
                self.values.uniform_(-bound, bound)
            else:
                self.values[blocks] = torch.empty_like(self.values[blocks]).uniform_(-bound, bound)
            self._zero_padding()

    @classmethod
    def from_dense(cls, linear, *, block_size=32, density=None, block_mask=None):
        """Convert an ``nn.Linear``. Keeps ``block_mask`` if given, else the blocks of largest
        Frobenius norm at ``density``, else every block holding a nonzero (exact)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if density is not None and block_mask is not None:
            raise ValueError("give either density or block_mask, not both")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    block_size=block_size, density=0.0, device=weight.device, dtype=weight.dtype)
        padded = F.pad(weight, (0, layer.padded_shape[1] - weight.shape[1], 0, layer.padded_shape[0] - weight.shape[0]))
        dense = BlockSparseMatrix.from_dense(padded, layer.block_size, block_mask=block_mask)
        if density is not None:
            norms = _block_norms(padded, layer.block_size)
            keep = torch.topk(norms.flatten(), _blocks_to_keep(density, norms.numel())).indices
            mask = torch.zeros(norms.numel(), dtype=torch.bool, device=weight.device)
            mask[keep] = True
            dense = BlockSparseMatrix.from_dense(padded, layer.block_size, block_mask=mask.view(norms.shape))
        layer._adopt(dense.layout, dense.values)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def density(self):
        return self._layout.density

    @property
    def nnz_blocks(self):
        return self._layout.nnz_blocks

    def layout(self):
        """The block structure (rebuilt if the module moved to another device)."""
        if self._layout.device != self.block_mask.device:
            self._layout = self._layout.to(self.block_mask.device)
        return self._layout

    def sparse_weight(self):
        """The padded weight as a BlockSparseMatrix sharing the ``values`` parameter."""
        return BlockSparseMatrix(self.values, self.layout())

    def dense_weight(self):
        """The dense (out_features, in_features) weight this layer represents."""
        return values_to_dense(self.values, self.layout())[:self.out_features, :self.in_features]

    def to_dense(self):
        """The ``nn.Linear`` this layer stands for (effective weight and bias, same device and dtype),
        e.g. to load a sparse-trained model where a dense checkpoint is expected."""
        return dense_linear(self)

    @property
    def mask(self):
        """The structure the methods act on: the bool block grid (alias of ``block_mask``)."""
        return self.block_mask

    def set_block_mask(self, block_mask):
        """Change the structure: surviving blocks keep their values, new blocks start at zero.

        The ``values`` parameter keeps its identity (optimizers still hold it) but
        changes shape; its ``.grad`` is cleared. Optimizer state for it must be
        moved by the caller (:meth:`restructure` returns the map; the method layer does this).
        """
        self.restructure(block_mask)

    def restructure(self, structure, values=None):
        """Install ``structure`` (a bool block grid, or a BlockLayout of this layer's padded
        shape and block size), built once; returns the slot map.

        ``values`` (new nnz, br, bc) if given, else surviving blocks keep theirs and new
        blocks start at zero. Returns int64 (new nnz,): for each new block, its index in
        the old ``values``, or -1 for a new block; :meth:`carry` moves optimizer state with it.
        """
        if isinstance(structure, BlockLayout):
            if structure.shape != self.padded_shape or structure.block_size != self.block_size:
                raise ValueError(f"layout of shape {structure.shape} and block size {structure.block_size} does "
                                 f"not fit this layer ({self.padded_shape}, {self.block_size})")
            layout = structure.to(self.block_mask.device)
        else:
            layout = BlockLayout.from_block_mask(structure.to(self.block_mask.device), self.padded_shape,
                                                 self.block_size)
        slots = self.layout().positions_of(layout)
        if values is None:
            values = self.carry(self.values.detach(), slots)
        elif tuple(values.shape) != (layout.nnz_blocks, *self.block_size):
            raise ValueError(f"values has shape {tuple(values.shape)}, the layout needs "
                             f"{(layout.nnz_blocks, *self.block_size)}")
        self._adopt(layout, values)
        return slots

    @staticmethod
    def carry(tensor, slots):
        """``tensor`` shaped like the old ``values`` moved by :meth:`restructure`'s slot map
        (zero for new blocks)."""
        return carry_blocks(tensor, slots)

    def _adopt(self, layout, values):
        count_changes = layout.nnz_blocks != self.values.shape[0]
        self.block_mask = layout.block_mask
        self._layout = layout
        replace_data_(self.values, values.to(self.values.dtype))
        if count_changes:
            self.mark_block_count_dynamic()

    def mark_block_count_dynamic(self):
        """Let torch.compile treat the number of stored blocks as a symbol, so that a graph traced
        after this serves every later count instead of one graph per count (done on each change
        of the count). ``values`` is a Parameter: dynamo keeps its shape static unless
        ``torch._dynamo.config.force_parameter_static_shapes`` is off."""
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:  # nothing compiled yet; importing it would cost eager users a second
            return
        layout = self._layout
        for tensor in (self.values, layout.col_indices, layout.row_indices, layout.t_block_ids,
                       layout.t_row_indices):
            dynamo.maybe_mark_dynamic(tensor, 0)

    def _zero_padding(self):
        """Zero the parts of edge blocks that lie outside (out_features, in_features)."""
        layout, (br, bc) = self._layout, self.block_size
        pad_rows = self.padded_shape[0] - self.out_features
        pad_cols = self.padded_shape[1] - self.in_features
        if pad_rows:
            self.values.data[layout.row_indices == layout.grid[0] - 1, br - pad_rows:, :] = 0
        if pad_cols:
            self.values.data[layout.col_indices == layout.grid[1] - 1, :, bc - pad_cols:] = 0

    def forward(self, x):
        check_layer_input(x, self.in_features)
        weight, bias, probe = self.sparse_weight(), self.bias, self.grad_probe
        dtype = autocast_dtype(x, self.values.dtype)
        if dtype is not None:
            x, bias = cast(x, dtype), cast(bias, dtype)
            weight = BlockSparseMatrix(cast(weight.values, dtype), weight.layout)
            probe = None if probe is None else BlockSparseMatrix(cast(probe.values, dtype), probe.layout)
            with outside_autocast(x):
                return self._product(x, weight, bias, probe)
        return self._product(x, weight, bias, probe)

    def _product(self, x, weight, bias, probe):
        pad_in = self.padded_shape[1] - self.in_features
        if pad_in:
            x = F.pad(x, (0, pad_in))
        if self.padded_shape[0] == self.out_features:
            return bsr_linear(x, weight, bias, grad_probe=probe)
        y = bsr_linear(x, weight, grad_probe=probe)[..., :self.out_features]
        return y.contiguous() if bias is None else y + bias  # contiguous, as nn.Linear's

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The padded storage cannot tell 50 from 60 input features: the true shape goes into
        # the module's state-dict metadata, checked on load.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", {}).get(prefix[:-1])
        if metadata is not None:
            metadata["features"] = (self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = local_metadata.get("features")
        if saved is not None and tuple(saved) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}values: copying a SparseLinear of (out, in) = "
                              f"{tuple(saved)} into one of {(self.out_features, self.in_features)}")
            return
        # Adopt the saved structure first, so a checkpoint whose number of stored
        # blocks differs from ours (after DST/GGR updates) loads into this layer.
        saved_mask = state_dict.get(prefix + "block_mask")
        if saved_mask is not None and tuple(saved_mask.shape) == tuple(self.block_mask.shape):
            self.set_block_mask(saved_mask.to(torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, "
                f"density={self.density:.4f} ({self.nnz_blocks} blocks)")


def _warn_if_crippled(layer, density):
    """Warn when the drawn structure leaves the layer (nearly) without inputs: no block at all,
    or a tenth of its output block rows empty (those outputs would be the bias alone)."""
    what = (f"SparseLinear({layer.in_features}, {layer.out_features}, block_size={layer.block_size}, "
            f"density={density})")
    rows = layer.block_mask.any(1)
    if not bool(rows.any()):
        warnings.warn(f"{what} stores no block (its {layer.block_mask.numel()}-block grid rounds density to 0): "
                      "use a smaller block_size or a higher density", UserWarning, stacklevel=3)
    elif int((~rows).sum()) >= max(1, rows.numel() // 10):
        warnings.warn(f"{what}: {int((~rows).sum())} of {rows.numel()} output block rows store no block, so those "
                      "outputs are the bias alone; use a smaller block_size or a higher density",
                      UserWarning, stacklevel=3)


def _block_norms(dense, block_size):
    (rows, cols), (br, bc) = dense.shape, block_size
    return dense.float().reshape(rows // br, br, cols // bc, bc).pow(2).sum((1, 3)).sqrt()
