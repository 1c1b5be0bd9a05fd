"""Reference block-sparse products in plain torch: the oracle and the fallback.

Works on any device and dtype. It touches only stored blocks: blocks of X (or dY)
are gathered per stored block, multiplied as a batch, and scattered back with
index_add_. Blocks are processed in chunks so the gathered copy stays bounded.
"""
import torch

from ..registry import register_kernel

_CHUNK_ELEMENTS = 1 << 23


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(nnz, rows, width):
    step = max(1, _CHUNK_ELEMENTS // max(1, rows * width))
    for start in range(0, nnz, step):
        yield slice(start, min(nnz, start + step))


def bsr_forward(x, values, layout, bias=None):
    (n, k), (br, bc), m = layout.shape, layout.block_size, x.shape[0]
    acc = _acc_dtype(x.dtype)
    x_blocks = x.view(m, k // bc, bc)
    y = torch.zeros(m, n // br, br, dtype=acc, device=x.device)
    for part in _chunks(layout.nnz_blocks, m, max(br, bc)):
        gathered = x_blocks[:, layout.col_indices[part]].to(acc)            # (m, b, bc)
        y.index_add_(1, layout.row_indices[part],
                     torch.einsum("mbk,bik->mbi", gathered, values[part].to(acc)))
    y = y.view(m, n)
    if bias is not None:
        y += bias.to(acc)
    return y.to(x.dtype)


def bsr_grad_input(dy, values, layout):
    (n, k), (br, bc), m = layout.shape, layout.block_size, dy.shape[0]
    acc = _acc_dtype(dy.dtype)
    dy_blocks = dy.view(m, n // br, br)
    dx = torch.zeros(m, k // bc, bc, dtype=acc, device=dy.device)
    for part in _chunks(layout.nnz_blocks, m, max(br, bc)):
        gathered = dy_blocks[:, layout.row_indices[part]].to(acc)           # (m, b, br)
        dx.index_add_(1, layout.col_indices[part],
                      torch.einsum("mbi,bik->mbk", gathered, values[part].to(acc)))
    return dx.view(m, k).to(dy.dtype)


def bsr_grad_weight(dy, x, layout, bias_grad=False):
    (n, k), (br, bc), m = layout.shape, layout.block_size, x.shape[0]
    acc = _acc_dtype(x.dtype)
    dy_blocks, x_blocks = dy.view(m, n // br, br), x.view(m, k // bc, bc)
    dvalues = torch.empty(layout.nnz_blocks, br, bc, dtype=x.dtype, device=x.device)
    for part in _chunks(layout.nnz_blocks, m, max(br, bc)):
        dvalues[part] = torch.einsum(
            "mbi,mbk->bik",
            dy_blocks[:, layout.row_indices[part]].to(acc),
            x_blocks[:, layout.col_indices[part]].to(acc)).to(x.dtype)
    return dvalues, dy.sum(0, dtype=acc).to(dy.dtype) if bias_grad else None


register_kernel("bsr_forward", "reference", bsr_forward)
register_kernel("bsr_grad_input", "reference", bsr_grad_input)
register_kernel("bsr_grad_weight", "reference", bsr_grad_weight)
