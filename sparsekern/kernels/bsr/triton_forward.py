"""Triton kernels for the products with a sparse *stationary* operand (DSD):
forward ``y = x Wᵀ`` (walk W by block rows) and ``dx = dy W`` (walk W by block
columns through the transpose metadata, never forming Wᵀ).

Both are one kernel: an output block column ``j`` of width OUT_B is the sum, over
the stored blocks of one "segment" (a block row of W for the forward, a block
column for dX), of a (BM, IN_B) slice of the dense operand times that block.
The two uses differ only in which index arrays list the segments and in which
stride of a stored block is "out" and which is "in".

Load balance: work items are segments, launched longest first, and a segment far
longer than the mean is split in pieces whose fp32 partial sums are added on the
host side (only for those rows), so one dense row of W does not leave the GPU
waiting on a single program. The schedule is built once per layout and cached.

This module imports triton: it is loaded on the first kernel call (triton_backend).
The kernels use only core builtins of triton.language (tl.full, not tl.zeros/tl.cdiv):
the @jit functions of triton's standard library are fixed to interpreter or compiled
mode when triton is imported, which breaks one mode or the other in a process that
uses both (tests: interpreter on CPU, then compiled kernels on a GPU).
"""
import functools
import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_backend import dot_precision, interpreting, upcast

# A segment is split when longer than twice max(mean segment, MIN_SEGMENT) blocks.
MIN_SEGMENT = 8


def _dsd_kernel(a_ptr, v_ptr, out_ptr, part_ptr, work_ptr, n_work, ids_ptr, gather_ptr, M, stride_am,
                stride_om, M_BUCKET, OUT_B: tl.constexpr, IN_B: tl.constexpr, V_STRIDE_OUT: tl.constexpr,
                V_STRIDE_IN: tl.constexpr, IDENTITY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Token tiles slowest: the programs in flight share one (BM, K) slice of the dense
    # operand in L2 across all segments; within a token tile, segments run longest first.
    n_sub: tl.constexpr = (OUT_B + BN - 1) // BN
    per_m = n_work * n_sub
    pid = tl.program_id(0)
    pid_m, rest = pid // per_m, pid % per_m
    item, pid_n = rest // n_sub, rest % n_sub
    out_block = tl.load(work_ptr + item)
    start = tl.load(work_ptr + n_work + item)
    end = tl.load(work_ptr + 2 * n_work + item)
    slot = tl.load(work_ptr + 3 * n_work + item)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m, mask_n = offs_m < M, offs_n < OUT_B
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for p in range(start, end):
        block = p if IDENTITY else tl.load(ids_ptr + p)
        a_block = a_rows + tl.load(gather_ptr + p) * IN_B
        v_block = v_ptr + block.to(tl.int64) * (OUT_B * IN_B) + offs_n[None, :] * V_STRIDE_OUT
        for k0 in tl.static_range(0, IN_B, BK):
            kk = k0 + offs_k
            a = tl.load(a_block + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < IN_B), other=0.0)
            v = tl.load(v_block + kk[:, None] * V_STRIDE_IN, mask=(kk[:, None] < IN_B) & mask_n[None, :], other=0.0)
            if UPCAST:
                a, v = a.to(tl.float32), v.to(tl.float32)
            acc = tl.dot(a, v, acc, input_precision=PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if slot < 0:
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + out_block * OUT_B + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = part_ptr + (slot.to(tl.int64) * M + offs_m[:, None]) * OUT_B + offs_n[None, :]
        tl.store(part, acc, mask=mask)


# (BM, BN, BK, num_warps, num_stages); BN/BK are clamped to the block by _prune.
_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 3),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 4, 5),
]
# Fixed tile under the interpreter: small, and narrower than the tested blocks so
# the sub-tile and K-chunk loops are exercised.
_INTERPRET_TILE = dict(BM=16, BN=16, BK=16)


def tile(limit, width):
    """Tile edge for a block edge ``width``: a power of two >= 16 (tl.dot's minimum), <= limit."""
    return min(limit, max(16, triton.next_power_of_2(width)))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    seen, kept = set(), []
    for config in configs:
        bn, bk = tile(config.kwargs["BN"], args["OUT_B"]), tile(config.kwargs["BK"], args["IN_B"])
        key = (config.kwargs["BM"], bn, bk, config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(BM=key[0], BN=bn, BK=bk), num_warps=key[3], num_stages=key[4]))
    return kept


@functools.cache
def _kernel(interpret):
    """The jitted kernel (triton.jit reads TRITON_INTERPRET when it decorates, hence one per
    mode); under the interpreter untuned, since autotuning would run every config."""
    kernel = triton.jit(_dsd_kernel)
    if interpret:
        return kernel
    configs = [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in _CONFIGS]
    return triton.autotune(configs, key=["M_BUCKET", "OUT_B", "IN_B", "V_STRIDE_OUT"],
                           prune_configs_by=dict(early_config_prune=_prune))(kernel)


@dataclass(frozen=True)
class Schedule:
    """Work items of a DSD launch. ``work`` (4, W) int32 rows: output block, first and
    end position in the segment arrays, partial slot (-1: write the output directly).
    Split output blocks are ``split_rows``; partial slot s belongs to split_rows[slot_to_row[s]]."""
    work: torch.Tensor
    split_rows: torch.Tensor
    slot_to_row: torch.Tensor

    @property
    def n_slots(self):
        return self.slot_to_row.numel()


def plan(counts, min_segment=MIN_SEGMENT):
    """Work items ``(out_block, start, end, slot)`` for segments of ``counts`` blocks, longest first.

    Segments longer than twice the target length max(mean, min_segment) are cut in
    near-equal pieces, each with its own partial slot. Empty segments stay (their
    output block must be written with zeros).
    """
    target = max(min_segment, math.ceil(sum(counts) / max(1, len(counts))))
    items, start = [], 0
    slot_rows = []
    for out_block, count in enumerate(counts):
        if count > 2 * target:
            pieces = math.ceil(count / target)
            bounds = [start + count * i // pieces for i in range(pieces + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                items.append((out_block, lo, hi, len(slot_rows)))
                slot_rows.append(out_block)
        else:
            items.append((out_block, start, start + count, -1))
        start += count
    items.sort(key=lambda item: item[1] - item[2])  # stable: longest first
    return items, slot_rows


_schedules = {}


def schedule(offsets):
    """The cached :class:`Schedule` of a segment-offsets tensor (one host copy per layout)."""
    entry = _schedules.get(id(offsets))
    if entry is not None and entry[0]() is offsets:
        return entry[1]
    items, slot_rows = plan(torch.diff(offsets).tolist())
    split_rows, slot_to_row = torch.unique(torch.tensor(slot_rows, dtype=torch.int64), return_inverse=True)
    device = offsets.device
    work = torch.tensor(items, dtype=torch.int32).reshape(-1, 4).T.contiguous()
    result = Schedule(work.to(device), split_rows.to(device), slot_to_row.to(device))
    key = id(offsets)
    _schedules[key] = (weakref.ref(offsets, lambda _: _schedules.pop(key, None)), result)
    return result


def _dsd(a, values, offsets, ids, gather, out_b, in_b, v_strides):
    """Launch: ``out[:, j*OUT_B:(j+1)*OUT_B] = sum over segment j of a-slice @ block``."""
    m, n_out = a.shape[0], offsets.numel() - 1
    out = torch.empty(m, n_out * out_b, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    plan_ = schedule(offsets)
    n_work = plan_.work.shape[1]
    part = torch.empty(plan_.n_slots, m, out_b, dtype=torch.float32, device=a.device) if plan_.n_slots else out
    args = (a, values, out, part, plan_.work, n_work, gather if ids is None else ids, gather, m, a.stride(0),
            out.stride(0), triton.next_power_of_2(m))
    meta = dict(OUT_B=out_b, IN_B=in_b, V_STRIDE_OUT=v_strides[0], V_STRIDE_IN=v_strides[1],
                IDENTITY=ids is None, PRECISION=dot_precision(a.dtype), UPCAST=upcast(a.dtype))
    kernel = _kernel(interpreting())
    def grid(cfg):
        return (triton.cdiv(m, cfg["BM"]) * triton.cdiv(out_b, cfg["BN"]) * n_work,)

    if interpreting():
        kernel[grid(_INTERPRET_TILE)](*args, **meta, **_INTERPRET_TILE)
    else:
        kernel[grid](*args, **meta)
    if plan_.n_slots:
        # The split output blocks were not written by the kernel: their partials sum to them.
        total = torch.zeros(plan_.split_rows.numel(), m, out_b, dtype=torch.float32, device=a.device)
        total.index_add_(0, plan_.slot_to_row, part)
        out.view(m, n_out, out_b)[:, plan_.split_rows] = total.transpose(0, 1).to(out.dtype)
    return out


def bsr_forward(x, values, layout, bias=None):
    """x (M, K), W (N, K) as (values (nnz, br, bc), layout) -> y = x @ W.T (+ bias), (M, N)."""
    br, bc = layout.block_size
    y = _dsd(x, values, layout.row_offsets, None, layout.col_indices, br, bc, (bc, 1))
    if bias is not None:  # one more pass over y; on the GPU it is small next to the product
        y += bias
    return y


def bsr_grad_input(dy, values, layout):
    """dy (M, N), W (N, K) -> dx = dy @ W, (M, K), walking W's block columns."""
    br, bc = layout.block_size
    return _dsd(dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices, bc, br, (1, bc))
