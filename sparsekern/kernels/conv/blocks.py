"""Between a conv weight's stored blocks ``values`` (nnz, bs, bs, kh, kw) and its dense form."""
import torch


def dense_conv_weight(values, layout, geometry):
    """The (out_channels, in_channels / groups, kh, kw) weight: stored blocks in place, zeros
    elsewhere; differentiable with respect to ``values``."""
    (rb, cb), bs, (kh, kw) = layout.grid, geometry.block_size, geometry.kernel_size
    if layout.nnz_blocks == rb * cb:  # every block stored, in row-major order: one transposing copy
        dense = values.reshape(rb, cb, bs, bs, kh, kw).transpose(1, 2).reshape(rb * bs, cb * bs, kh, kw)
    else:  # the blocks scattered straight into their places (no block-major copy to transpose: 0.16 -> 0.10 ms
        # at 256 x 256 x 3 x 3 bf16, half the blocks)
        dense = values.new_zeros(rb * bs, cb * bs, kh, kw)
        dense.view(rb, bs, cb, bs, kh, kw).permute(0, 2, 1, 3, 4, 5)[layout.row_indices, layout.col_indices] = values
    return dense[:geometry.out_channels, :geometry.in_per_group]


def gather_blocks(dense, layout, geometry):
    """The stored blocks of a dense (out_channels, in_channels / groups, kh, kw) tensor: (nnz, bs, bs, kh, kw),
    a new contiguous tensor (never a view of ``dense``)."""
    (rb, cb), bs = layout.grid, geometry.block_size
    rows, cols = geometry.padded_shape
    if dense.shape[:2] != (rows, cols):  # channels beyond the last whole block read as zero
        dense = torch.nn.functional.pad(dense, (0, 0, 0, 0, 0, cols - dense.shape[1], 0, rows - dense.shape[0]))
    blocks = dense.reshape(rb, bs, cb, bs, *dense.shape[2:]).transpose(1, 2)
    if layout.nnz_blocks == rb * cb:  # every block stored, in row-major order: one copy, no gather (5x faster)
        return blocks.clone(memory_format=torch.contiguous_format).view(rb * cb, bs, bs, *dense.shape[2:])
    return blocks[layout.row_indices, layout.col_indices]


def block_norms(dense, geometry):
    """Frobenius norm of every block (all taps) of a dense weight: (RB, CB) float32."""
    (rb, cb), bs = geometry.grid, geometry.block_size
    rows, cols = geometry.padded_shape
    padded = torch.nn.functional.pad(dense.float(), (0, 0, 0, 0, 0, cols - dense.shape[1], 0, rows - dense.shape[0]))
    return padded.reshape(rb, bs, cb, bs, -1).pow(2).sum((1, 3, 4)).sqrt()
