"""``BlockStructured``: the block-structure mechanics ``SparseLinear`` and ``SparseConv2d`` share.

A block-structured layer stores a ``values`` parameter (nnz, br, bc, *taps) over the blocks
of a ``block_mask`` buffer (the bool block grid of a padded (rows, cols) matrix), plus an
optional ``bias``. This mixin keeps that structure: the random initial draw, the cached
BlockLayout, structure changes (``restructure`` / ``carry``), value initialisation, padding
zeroing, loading a checkpoint of another nnz and the crippled-layer warning. The layer says
what its blocks are through :meth:`_block_structure`.
"""
import sys
import warnings

import torch
from torch import nn

from ..formats.bsr import BlockLayout, carry_blocks
from ..ops.transforms import transformed
from .parameter import refuse_meta_device, replace_data_

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_density(density):
    if not isinstance(density, (int, float)) or not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return float(density)


def blocks_to_keep(density, cells):
    return int(round(check_density(density) * cells))


def top_block_mask(norms, density):
    """The bool grid shaped as ``norms`` keeping its blocks of largest norm at ``density``."""
    keep = torch.topk(norms.flatten(), blocks_to_keep(density, norms.numel())).indices
    mask = torch.zeros(norms.numel(), dtype=torch.bool, device=norms.device)
    mask[keep] = True
    return mask.view(norms.shape)


def check_from_dense(module, kind, density, block_mask):
    if not isinstance(module, kind):
        raise TypeError(f"from_dense expects an nn.{kind.__name__}, got {type(module).__name__}")
    if density is not None and block_mask is not None:
        raise ValueError("give either density or block_mask, not both")


def warn_if_crippled(block_mask, what):
    """Warn when the block grid ``block_mask`` leaves the layer ``what`` (nearly) without inputs:
    no block at all, or a tenth of its output block rows empty (those outputs would be the bias alone)."""
    rows = block_mask.any(1)
    if not bool(rows.any()):
        warnings.warn(f"{what} stores no block (its {block_mask.numel()}-block grid rounds density to 0): "
                      "use a smaller block_size or a higher density", UserWarning, stacklevel=3)
    elif int((~rows).sum()) >= max(1, rows.numel() // 10):
        warnings.warn(f"{what}: {int((~rows).sum())} of {rows.numel()} output block rows store no block, so those "
                      "outputs are the bias alone; use a smaller block_size or a higher density",
                      UserWarning, stacklevel=3)


class BlockStructured(nn.Module):
    """Base of the block-sparse layers. A subclass defines :meth:`_block_structure`,
    :meth:`_default_bound` and :meth:`_shape_key`, and the class attributes ``_shape_metadata``
    (its state-dict metadata key) and ``_shape_description`` (its shape in load errors)."""

    _shape_metadata = None
    _shape_description = None

    def _block_structure(self):
        """(extent, padded_shape, (br, bc), taps): the true (rows, cols) of the blocked matrix,
        its padded shape, the block size and the trailing shape of each block (() or (kh, kw))."""
        raise NotImplementedError

    def _default_bound(self):
        raise NotImplementedError

    def _shape_key(self):
        raise NotImplementedError

    def _init_blocks(self, density, device, dtype):
        """Draw a block mask at ``density`` uniformly at random; register it and an empty ``values``."""
        refuse_meta_device(type(self).__name__, device)
        _, padded_shape, (br, bc), taps = self._block_structure()
        grid = (padded_shape[0] // br, padded_shape[1] // bc)
        cells = grid[0] * grid[1]
        keep = torch.randperm(cells)[:blocks_to_keep(density, cells)]
        block_mask = torch.zeros(cells, dtype=torch.bool)
        block_mask[keep] = True
        self._layout = BlockLayout.from_block_mask(block_mask.view(grid).to(device), padded_shape, (br, bc))
        self.register_buffer("block_mask", self._layout.block_mask)  # the layout's own tensor (see layout())
        self.values = nn.Parameter(torch.empty(self._layout.nnz_blocks, br, bc, *taps, device=device, dtype=dtype))

    def reset_parameters(self):
        """The dense layer's initialisation (U(±bound), bound 1/sqrt(fan_in)) on the stored blocks and the bias."""
        bound = self._default_bound()
        self.reset_values(bound)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def reset_values(self, bound=None, blocks=None):
        """Draw U(±bound) on the stored blocks (the dense layer's bound 1/sqrt(fan_in) by default),
        or only on the blocks at indices ``blocks``; the bias is left alone."""
        bound = self._default_bound() if bound is None else float(bound)
        with torch.no_grad():
            if blocks is None:
                self.values.uniform_(-bound, bound)
            else:
                self.values[blocks] = torch.empty_like(self.values[blocks]).uniform_(-bound, bound)
            self._zero_padding()

    def _zero_padding(self):
        self.zero_edge_padding(self.values.data, self._layout)

    def zero_edge_padding(self, values, layout):
        """Zero, in place, the parts of ``values``' edge blocks (blocks of this layer's grid on
        ``layout``, e.g. a driver's shadow blocks) that lie outside the true (rows, cols) extent."""
        (rows, cols), padded_shape, (br, bc), _ = self._block_structure()
        pad_rows, pad_cols = padded_shape[0] - rows, padded_shape[1] - cols
        if pad_rows:
            values[layout.row_indices == layout.grid[0] - 1, br - pad_rows:] = 0
        if pad_cols:
            values[layout.col_indices == layout.grid[1] - 1, :, bc - pad_cols:] = 0

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
        """The block structure; its ``block_mask`` is the buffer of that name. Another tensor in the
        buffer's place is followed: the same structure elsewhere (a device move) is adopted,
        another structure (torch.func.functional_call with another model's state) is used for
        that call, as the buffer says."""
        mask = self.block_mask
        if torch.compiler.is_compiling():
            # dynamo cannot trace the check (tensor identity, a data-dependent equal): a compiled
            # graph follows a device move only
            return self._layout.to(mask.device)
        if mask is self._layout.block_mask:
            return self._layout
        if torch._C._functorch.is_batchedtensor(mask):
            raise ValueError(f"{self}: torch.func.vmap over stacked block masks: models under one vmap share "
                             "one block structure; map their parameters (stack_module_state's first output) "
                             "and pass one model's buffers unmapped")
        own = self._layout.block_mask
        if tuple(mask.shape) == tuple(own.shape) and torch.equal(mask.cpu(), own.cpu()):
            layout = self._layout.to(mask.device)
            if not transformed():  # adopt the moved buffer (never a transform's wrapped tensors)
                self._layout = layout
                self.block_mask = layout.block_mask
            return layout
        return BlockLayout.from_block_mask(mask, self._layout.shape, self._layout.block_size)

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

        ``values`` (new nnz, br, bc, *taps) if given, else surviving blocks keep theirs and new
        blocks start at zero. Returns int64 (new nnz,): for each new block, its index in
        the old ``values``, or -1 for a new block; :meth:`carry` moves optimizer state with it.
        """
        _, shape, block, taps = self._block_structure()
        if isinstance(structure, BlockLayout):
            if structure.shape != shape or structure.block_size != block:
                raise ValueError(f"layout of shape {structure.shape} and block size {structure.block_size} does "
                                 f"not fit this layer ({shape}, {block})")
            layout = structure.to(self.block_mask.device)
        else:
            layout = BlockLayout.from_block_mask(structure.to(self.block_mask.device), shape, block)
        slots = self.layout().positions_of(layout)
        expected = (layout.nnz_blocks, *block, *taps)
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

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=...) restrides every 4-D and 5-D tensor (and refuses
        # channels_last on 5-D ones). A conv layer's values (nnz, bo, bi, kh, kw) are not an
        # image-like tensor but the kernels' contiguous block storage: the conversion sees them
        # flat, so model.to(memory_format=torch.channels_last) converts the rest of a CNN and
        # leaves the blocks as they are (dtype and device conversions still apply).
        def keep_block_storage(tensor):
            if tensor.dim() < 4:
                return fn(tensor)
            flat = tensor.flatten(1)
            out = fn(flat)
            return tensor if out is flat else out.view(tensor.shape)
        return super()._apply(keep_block_storage, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The padded storage cannot tell 50 from 60 input features: the true shape goes into
        # the module's state-dict metadata, checked on load.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", {}).get(prefix[:-1])
        if metadata is not None:
            metadata[self._shape_metadata] = self._shape_key()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = local_metadata.get(self._shape_metadata)
        if saved is not None and tuple(saved) != self._shape_key():
            error_msgs.append(f"size mismatch for {prefix}values: copying a {self._shape_description} = "
                              f"{tuple(saved)} into one of {self._shape_key()}")
            return
        # Adopt the saved structure first, so a checkpoint whose number of stored
        # blocks differs from ours (after DST/GGR updates) loads into this layer.
        saved_mask = state_dict.get(prefix + "block_mask")
        if saved_mask is not None and tuple(saved_mask.shape) == tuple(self.block_mask.shape):
            self.set_block_mask(saved_mask.to(torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
