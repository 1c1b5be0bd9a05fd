"""Reference 2:4 products in plain torch: the oracle and the fallback.

Works on any device and dtype. Products decompress W (one scatter) and use a
dense matmul, or for dW gather the dense product at the kept positions: exact,
simple, and no faster than dense.
"""
import torch

from ...formats.semi import compress, decompress, unpack_columns
from ...formats.semi_prune import prune_2to4
from ..registry import register_kernel


def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dense(values, indices, acc):
    return decompress(values.to(acc), indices, 2 * values.shape[1])


def semi_forward(x, values, indices, bias=None):
    acc = _acc_dtype(x.dtype)
    y = x.to(acc) @ _dense(values, indices, acc).T
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if indices_t is not None:
        return semi_forward(dy, values.reshape(-1)[transpose_map], indices_t)
    acc = _acc_dtype(dy.dtype)
    return (dy.to(acc) @ _dense(values, indices, acc)).to(dy.dtype)


def semi_grad_weight(dy, x, indices):
    acc = _acc_dtype(x.dtype)
    columns = unpack_columns(indices, x.shape[1])
    return (dy.to(acc).T @ x.to(acc)).gather(1, columns).to(x.dtype)


def semi_prune_compress(dense, transposable):
    mask = prune_2to4(dense, transposable=transposable)
    values, indices = compress(dense, mask)
    if not transposable:
        return values, indices, None, None
    values_t, indices_t = compress(dense.T, mask.T)
    return values, indices, values_t, indices_t


register_kernel("semi_forward", "reference", semi_forward)
register_kernel("semi_grad_input", "reference", semi_grad_input)
register_kernel("semi_grad_weight", "reference", semi_grad_weight)
register_kernel("semi_prune_compress", "reference", semi_prune_compress)
