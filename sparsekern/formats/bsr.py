"""Block-CSR format: ``BlockLayout`` (structure only) and ``BlockSparseMatrix``.

A matrix of shape (R, C) is cut into blocks of (br, bc); the *block grid* has
(R/br, C/bc) cells, and a bool ``block_mask`` over the grid says which blocks
are stored. Stored blocks are kept row-major in ``values`` (nnz, br, bc).

The layout also holds the *transpose metadata* (the same blocks grouped by
block column) built once, so products that walk W by columns (dX = dY W) need
no transposed copy of the values.
"""
from dataclasses import dataclass

import torch


def _as_block_size(block_size):
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)
            or min(block_size) < 1):
        raise ValueError(f"block_size must be a positive int or a pair of positive ints, got {block_size!r}")
    return tuple(block_size)


def _check_divisible(shape, block_size):
    if shape[0] % block_size[0] or shape[1] % block_size[1]:
        raise ValueError(
            f"shape {tuple(shape)} is not divisible by block size {block_size}; "
            "pad the matrix (SparseLinear does this for you)")


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which blocks of a (rows, cols) matrix are stored, in block-CSR order.

    Index tensors are int64 on the mask's device:
      row_offsets (RB+1)   stored blocks of block row i are [row_offsets[i], row_offsets[i+1])
      col_indices (nnz)    block column of each stored block
      row_indices (nnz)    block row of each stored block
      col_offsets (CB+1)   transpose: blocks of block column j are t_block_ids[col_offsets[j]:col_offsets[j+1]]
      t_block_ids (nnz)    index into ``values`` of each block, in block-column order
      t_row_indices (nnz)  block row of each block, in block-column order
    """
    shape: tuple
    block_size: tuple
    block_mask: torch.Tensor
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    col_offsets: torch.Tensor
    t_block_ids: torch.Tensor
    t_row_indices: torch.Tensor

    @classmethod
    def from_block_mask(cls, block_mask, shape, block_size):
        block_size = _as_block_size(block_size)
        shape = tuple(int(s) for s in shape)
        _check_divisible(shape, block_size)
        grid = (shape[0] // block_size[0], shape[1] // block_size[1])
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got "
                            f"{getattr(block_mask, 'dtype', type(block_mask).__name__)}")
        if tuple(block_mask.shape) != grid:
            raise ValueError(
                f"block_mask has shape {tuple(block_mask.shape)} but a {shape} matrix with block size "
                f"{block_size} has a block grid of {grid}")
        block_mask = block_mask.detach().clone()
        # Row-major: the order of ``values``. Own storage, not views into one nonzero() result:
        # a view's storage offset (nnz) would be one more symbol for torch.compile to guard on.
        rows, cols = (t.clone() for t in block_mask.nonzero(as_tuple=True))
        device = block_mask.device
        row_offsets = torch.zeros(grid[0] + 1, dtype=torch.int64, device=device)
        row_offsets[1:] = torch.cumsum(block_mask.sum(1), 0)
        col_offsets = torch.zeros(grid[1] + 1, dtype=torch.int64, device=device)
        col_offsets[1:] = torch.cumsum(block_mask.sum(0), 0)
        t_block_ids = torch.argsort(cols * grid[0] + rows)
        return cls(shape, block_size, block_mask, row_offsets, cols, rows,
                   col_offsets, t_block_ids, rows[t_block_ids])

    @property
    def grid(self):
        return tuple(self.block_mask.shape)

    @property
    def nnz_blocks(self):
        return int(self.col_indices.numel())

    @property
    def density(self):
        cells = self.grid[0] * self.grid[1]
        return self.nnz_blocks / cells if cells else 0.0

    @property
    def device(self):
        return self.block_mask.device

    def block_keys(self):
        """Row-major linear index (row * CB + col) of each stored block, ascending."""
        return self.row_indices * self.grid[1] + self.col_indices

    def positions_of(self, other):
        """For each block of ``other`` (same grid): its index in this layout, or -1 if not stored here.

        O(nnz log nnz) by binary search of sorted block keys; this is what lets a
        structure change keep surviving values without touching the dense grid.
        """
        if other.grid != self.grid:
            raise ValueError(f"block grids differ: {self.grid} vs {other.grid}")
        keys, wanted = self.block_keys(), other.block_keys()
        if keys.numel() == 0:
            return torch.full_like(wanted, -1)
        pos = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        return torch.where(keys[pos] == wanted, pos, torch.full_like(pos, -1))

    def to(self, device):
        if torch.device(device) == self.device:
            return self
        return BlockLayout.from_block_mask(self.block_mask.to(device), self.shape, self.block_size)


class BlockSparseMatrix:
    """A (rows, cols) matrix storing only the blocks in its ``block_mask``.

    ``values`` (nnz, br, bc) is a leaf tensor: set ``requires_grad`` on it and the
    gradients of :func:`sparsekern.ops.bsr_linear` land there, for stored blocks only.
    """

    def __init__(self, values, layout):
        expected = (layout.nnz_blocks, *layout.block_size)
        if tuple(values.shape) != expected:
            raise ValueError(f"values has shape {tuple(values.shape)}, layout expects {expected}")
        if values.device != layout.device:
            raise ValueError(f"values on {values.device} but layout on {layout.device}")
        self.values = values
        self.layout = layout

    @classmethod
    def from_dense(cls, dense, block_size, block_mask=None):
        """Exact conversion. ``block_mask=None`` keeps every block holding a nonzero."""
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            raise ValueError(f"dense must be a 2-D tensor, got "
                             f"{tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__}")
        block_size = _as_block_size(block_size)
        _check_divisible(dense.shape, block_size)
        blocks = _to_blocks(dense.detach(), block_size)
        if block_mask is None:
            block_mask = blocks.ne(0).any(-1).any(-1)
        layout = BlockLayout.from_block_mask(block_mask.to(dense.device), dense.shape, block_size)
        return cls(blocks[layout.block_mask].contiguous(), layout)

    shape = property(lambda self: self.layout.shape)
    block_size = property(lambda self: self.layout.block_size)
    block_mask = property(lambda self: self.layout.block_mask)
    density = property(lambda self: self.layout.density)
    nnz_blocks = property(lambda self: self.layout.nnz_blocks)
    dtype = property(lambda self: self.values.dtype)
    device = property(lambda self: self.values.device)

    def to_dense(self):
        """The dense (rows, cols) matrix; differentiable with respect to ``values``."""
        return values_to_dense(self.values, self.layout)

    def with_block_mask(self, block_mask):
        """A new matrix on ``block_mask``: surviving blocks keep their values, new blocks are zero."""
        layout = BlockLayout.from_block_mask(block_mask.to(self.device), self.shape, self.block_size)
        return BlockSparseMatrix(carry_blocks(self.values.detach(), self.layout.positions_of(layout)), layout)

    def __repr__(self):
        return (f"BlockSparseMatrix(shape={self.shape}, block_size={self.block_size}, "
                f"density={self.density:.4f}, dtype={self.dtype}, device={self.device})")


def _to_blocks(dense, block_size):
    (rows, cols), (br, bc) = dense.shape, block_size
    return dense.reshape(rows // br, br, cols // bc, bc).transpose(1, 2)


def values_to_dense(values, layout, out=None):
    """The dense (rows, cols) matrix of the stored blocks, zeros elsewhere; written into
    ``out`` (contiguous, of that shape and values' dtype) when it is given."""
    (rb, cb), (br, bc) = layout.grid, layout.block_size
    blocks_first = None if out is None else out.view(rb, br, cb, bc).transpose(1, 2)
    if layout.nnz_blocks == rb * cb:  # every block, in row-major order: one transposing copy
        full = values.view(rb, cb, br, bc)
        if out is None:
            return full.transpose(1, 2).reshape(layout.shape)
        blocks_first.copy_(full)
        return out
    # Scattered straight into the (rows, cols) layout: zeros, then one pass over the blocks
    # (building (rb, cb, br, bc) first and transposing it costs two more passes).
    if out is None:
        dense = values.new_zeros(rb, br, cb, bc).transpose(1, 2)
        return dense.index_put((layout.row_indices, layout.col_indices), values).transpose(1, 2).reshape(layout.shape)
    out.zero_()
    blocks_first.index_put_((layout.row_indices, layout.col_indices), values)
    return out


def carry_blocks(tensor, slots):
    """``tensor`` (old nnz, ...) moved to a new structure: row i of the result is
    ``tensor[slots[i]]``, or zero where ``slots[i] < 0`` (a new block). ``slots`` is
    ``old_layout.positions_of(new_layout)``; values and optimizer state move this way."""
    out = tensor.new_zeros((slots.numel(), *tensor.shape[1:]))
    kept = (slots >= 0).nonzero().squeeze(1)
    return out.index_copy_(0, kept, tensor.index_select(0, slots[kept]))
