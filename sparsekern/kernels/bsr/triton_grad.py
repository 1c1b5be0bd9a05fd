"""Triton kernel for the sampled weight gradient (SDD): ``dW = dyᵀ x`` on the blocks
of a layout only, which may be any block mask (the forward's, a superset, or
every block for dense scores).

One program computes one (TR, TC) tile of one stored block, reducing over the
token dimension M. Every block costs the same, so the load is balanced by
construction; when there are too few blocks to fill the GPU (high sparsity, few
blocks) M is split in chunks whose fp32 partial sums are added afterwards.

This module imports triton: it is loaded on the first kernel call (triton_backend).
"""
import functools

import torch
import triton
import triton.language as tl

from .triton_backend import dot_precision, interpreting, parallel_slots, upcast
from .triton_forward import tile


def _sdd_kernel(dy_ptr, x_ptr, out_ptr, rows_ptr, cols_ptr, nnz, M, stride_dy, stride_x, m_per_split, M_BUCKET,
                BR: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                TR: tl.constexpr, TC: tl.constexpr, BM: tl.constexpr):
    n_c: tl.constexpr = (BC + TC - 1) // TC
    n_sub: tl.constexpr = ((BR + TR - 1) // TR) * n_c
    # Sub-tiles of a block, then blocks (row-major: neighbours share dy slices), then M chunks.
    pid = tl.program_id(0)
    sub, rest = pid % n_sub, pid // n_sub
    block, split = rest % nnz, rest // nnz
    row = tl.load(rows_ptr + block)
    col = tl.load(cols_ptr + block)
    offs_r = (sub // n_c) * TR + tl.arange(0, TR)
    offs_c = (sub % n_c) * TC + tl.arange(0, TC)
    mask_r, mask_c = offs_r < BR, offs_c < BC
    m_lo = split * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    dy_cols = dy_ptr + row * BR + offs_r[None, :]
    x_cols = x_ptr + col * BC + offs_c[None, :]
    acc = tl.full((TR, TC), 0.0, tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < m_hi
        offs_m = offs_m.to(tl.int64)[:, None]
        g = tl.load(dy_cols + offs_m * stride_dy, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        xs = tl.load(x_cols + offs_m * stride_x, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            g, xs = g.to(tl.float32), xs.to(tl.float32)
        acc = tl.dot(tl.trans(g), xs, acc, input_precision=PRECISION)
    out = out_ptr + ((split * nnz + block).to(tl.int64) * BR + offs_r[:, None]) * BC + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


# (TR, TC, BM, num_warps, num_stages); TR/TC are clamped to the block by _prune.
_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 128, 4, 3),
    (32, 32, 64, 4, 4),
]
_INTERPRET_TILE = dict(TR=16, TC=16, BM=16)
# Rows of M per split chunk: a multiple of every BM; on a GPU large enough that the
# partial sums stay cheap next to the product.
_GPU_GRAIN = 512


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    seen, kept = set(), []
    for config in configs:
        tr, tc = tile(config.kwargs["TR"], args["BR"]), tile(config.kwargs["TC"], args["BC"])
        key = (tr, tc, config.kwargs["BM"], config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(TR=tr, TC=tc, BM=key[2]), num_warps=key[3], num_stages=key[4]))
    return kept


@functools.cache
def _kernel(interpret):
    """The jitted kernel, one per interpreter mode; untuned under the interpreter."""
    kernel = triton.jit(_sdd_kernel)
    if interpret:
        return kernel
    configs = [triton.Config(dict(TR=tr, TC=tc, BM=bm), num_warps=w, num_stages=s) for tr, tc, bm, w, s in _CONFIGS]
    return triton.autotune(configs, key=["M_BUCKET", "BR", "BC"], prune_configs_by=dict(early_config_prune=_prune))(kernel)


def split_m(m, programs, slots, grain):
    """(number of M chunks, rows per chunk): enough programs for ~2 waves, chunks of >= grain rows."""
    want = max(1, -(-2 * slots // max(1, programs)))
    split = max(1, min(want, triton.cdiv(m, grain)))
    per_split = triton.cdiv(triton.cdiv(m, split), grain) * grain
    return triton.cdiv(m, per_split), per_split


def bsr_grad_weight(dy, x, layout):
    """dy (M, N), x (M, K) -> dvalues (nnz, br, bc): (dy.T @ x) on the stored blocks of ``layout``."""
    (br, bc), nnz, m = layout.block_size, layout.nnz_blocks, x.shape[0]
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, br, bc, dtype=x.dtype, device=x.device)
    interpret = interpreting()
    grain = _INTERPRET_TILE["BM"] if interpret else _GPU_GRAIN
    programs = nnz * triton.cdiv(br, 64) * triton.cdiv(bc, 64)
    split, per_split = split_m(m, programs, parallel_slots(x.device), grain)
    out = torch.empty(split, nnz, br, bc, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    args = (dy, x, out, layout.row_indices, layout.col_indices, nnz, m, dy.stride(0), x.stride(0), per_split,
            triton.next_power_of_2(m))
    meta = dict(BR=br, BC=bc, PRECISION=dot_precision(x.dtype), UPCAST=upcast(x.dtype))
    kernel = _kernel(interpret)
    def grid(cfg):
        return (triton.cdiv(br, cfg["TR"]) * triton.cdiv(bc, cfg["TC"]) * nnz * split,)

    if interpret:
        kernel[grid(_INTERPRET_TILE)](*args, **meta, **_INTERPRET_TILE)
    else:
        kernel[grid](*args, **meta)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
