"""Fused 2:4 prune + compress in Triton (GPU; CPU under ``TRITON_INTERPRET=1`` for tests).

One pass over the dense weight writes the compressed values and packed 2-bit
indices (and, for transposable 2:4, those of Wᵀ too): this is what lets the
``dynamic`` layer re-prune every step for a small fraction of a matmul.

Row-wise: per group of four, keep the two largest |w| (ties: lower index), and
pack the two positions of two neighbouring groups into one byte.
Transposable: each program takes a 2 x 2 block of 4x4 tiles per step (so the
bytes of W and of Wᵀ both pair up), scores every tile against the 90 patterns
with one small ``tl.dot`` (fp32, exact), keeps the argmax (as the reference
does) and writes both compressions.

Triton is imported, and the kernels are built, on first use only.
"""
import contextlib
import functools
import os

import torch

from ...formats.semi_prune import check_2to4_shape, transposable_patterns
from ..registry import register_kernel

_BLOCK = 64  # group pairs (row-wise) or tile pairs (transposable) per program
_INTERPRETER_BLOCK = 4  # the interpreter runs the argmax combine per element: keep programs small


def _block():
    return _INTERPRETER_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else _BLOCK


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import _triton_prune_jit as jit
    return jit.prune_rows, jit.prune_tiles


@functools.lru_cache(maxsize=None)
def _pattern_table(device):
    """The 90 patterns as (16, 128) 0/1 float columns (zero padded), a (128,) bias that rules out
    the padding (-inf), and each pattern's 16-bit mask (int32, bit 4 * row + col)."""
    patterns = transposable_patterns(device)
    table = torch.zeros(16, 128, dtype=torch.float32, device=device)
    table[:, :90] = patterns.T.float()
    bias = torch.full((128,), float("-inf"), device=device)
    bias[:90] = 0.0
    bits = torch.zeros(128, dtype=torch.int32, device=device)
    bits[:90] = (patterns.int() << torch.arange(16, device=device, dtype=torch.int32)).sum(1).int()
    return table.contiguous(), bias, bits


def _on_device(device):
    """Launch on ``device``: triton launches on the current CUDA device, which need not be the tensor's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def semi_prune_compress(dense, transposable):
    check_2to4_shape(dense.shape, transposable)
    with _on_device(dense.device):
        return _prune_compress(dense.contiguous(), transposable)  # the kernels read W row-major


def _prune_compress(dense, transposable):
    prune_rows, prune_tiles = _kernels()
    rows, cols = dense.shape
    values = torch.empty(rows, cols // 2, dtype=dense.dtype, device=dense.device)
    indices = torch.empty(rows, -(-cols // 8), dtype=torch.uint8, device=dense.device)
    if rows == 0 or cols == 0:
        empty_t = (torch.empty(cols, rows // 2, dtype=dense.dtype, device=dense.device),
                   torch.empty(cols, -(-rows // 8), dtype=torch.uint8, device=dense.device))
        return (values, indices) + (empty_t if transposable else (None, None))
    if not transposable:
        block = _block()
        grid = (rows, -(-indices.shape[1] // block))
        prune_rows[grid](dense, values, indices, rows, cols, indices.shape[1], BLOCK=block)
        return values, indices, None, None
    values_t = torch.empty(cols, rows // 2, dtype=dense.dtype, device=dense.device)
    indices_t = torch.empty(cols, -(-rows // 8), dtype=torch.uint8, device=dense.device)
    patterns, bias, bits = _pattern_table(dense.device)
    block = _block()
    grid = (-(-rows // 8), -(-indices.shape[1] // block))
    prune_tiles[grid](dense, patterns, bias, bits, values, indices, values_t, indices_t, rows, cols,
                      indices.shape[1], indices_t.shape[1], BLOCK=block)
    return values, indices, values_t, indices_t


def _unavailable(device, dtype):
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"supports float32/float16/bfloat16, got {dtype}"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"needs a CUDA device (or TRITON_INTERPRET=1 for tests), got {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


register_kernel("semi_prune_compress", "triton", semi_prune_compress, _unavailable)
