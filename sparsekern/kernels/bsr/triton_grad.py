"""Triton kernel for the sampled weight gradient (SDD): ``dW = dyᵀ x`` on the blocks
of a layout only, which may be any block mask (the forward's, a superset, or
every block for dense scores).

Gathered tiles: one program computes up to GROUP consecutive stored blocks of one
block row at once, a (TR, GROUP·TC) tile whose rows share the dy slice of the
block row and whose columns gather x's columns of the GROUP blocks. Per token
row it loads TR + GROUP·TC elements for TR·GROUP·TC products, so a 128 x 256
tile does ~85 flop per loaded element where one 64 x 64 block does 32. GROUP is
part of the autotuned config; the layout's *fill* (stored blocks per non-empty
block row, a power of two) is in the autotune key and bounds GROUP, so sparse
rows are not padded into wide tiles. Blocks wider than a tile are cut in
sub-tiles instead (GROUP = 1). When there are too few programs to fill the GPU,
the token dimension M is split in chunks whose fp32 partial sums are added
afterwards.

On CUDA, at high density the dense product dyᵀx (cuBLAS) followed by a gather of
the stored blocks is cheaper; :func:`use_dense` decides by the model documented
there (a model, not a measurement).

This module imports triton: it is loaded on the first kernel call (triton_backend).
"""
import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_backend import SMEM_BUDGET, dot_precision, interpreting, parallel_slots, upcast
from .triton_forward import tile

# Group sizes (blocks per gathered tile) with a schedule per layout; the kernel finds
# its group's table by GROUP's position here (SLOT).
GROUPS = (1, 2, 4, 8, 16)

# Floor rule, CUDA only: the dense route (cuBLAS dyᵀx, then a gather of the stored
# blocks) replaces the SDD kernel from this density on when tokens are many; fewer
# tokens need a higher density (see use_dense). Unmeasured: set from that model, to
# be replaced by the crossover measured with bench/bench_bsr_triton.py.
DENSE_DW_DENSITY = 0.7
# Machine balance assumed by the model: tensor-core flops per byte of DRAM traffic at
# which both take the same time (H100 SXM bf16: ~990 TFLOP/s over 3.35 TB/s ≈ 300).
_RIDGE = 300.0


def _sdd_kernel(dy_ptr, x_ptr, out_ptr, rows_ptr, cols_ptr, items_ptr, nnz, M,
                stride_dy, stride_x, m_per_split, M_BUCKET, FILL,
                BR: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                TR: tl.constexpr, TC: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr):
    n_c: tl.constexpr = (BC + TC - 1) // TC
    n_sub: tl.constexpr = ((BR + TR - 1) // TR) * n_c
    SLOT: tl.constexpr = (GROUP > 1) + (GROUP > 2) + (GROUP > 4) + (GROUP > 8)
    # Axis 0: sub-tiles, then tiles (row-major: neighbours share dy slices); axis 1: M chunks.
    pid, split = tl.program_id(0), tl.program_id(1)
    sub, item = pid % n_sub, pid // n_sub
    table = items_ptr + SLOT * 2 * nnz.to(tl.int64)
    first = tl.load(table + item).to(tl.int64)
    count = tl.load(table + nnz + item)
    row = tl.load(rows_ptr + first)
    # Column j of the tile is column j % TC of the group's block j // TC.
    j = tl.arange(0, GROUP * TC)
    in_group = j // TC < count
    blocks = first + j // TC
    cols = tl.load(cols_ptr + blocks, mask=in_group, other=0)
    offs_r = (sub // n_c) * TR + tl.arange(0, TR)
    offs_c = (sub % n_c) * TC + j % TC
    mask_r, mask_c = offs_r < BR, in_group & (offs_c < BC)
    m_lo = split * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    dy_cols = dy_ptr + row * BR + offs_r[None, :]
    x_cols = x_ptr + cols[None, :] * BC + offs_c[None, :]
    # The gathered columns are the dot's M side (>= 64 in most configs, as wgmma needs),
    # so blocks of 16 or 32 rows still run on Hopper's warpgroup MMA.
    acc = tl.full((GROUP * TC, TR), 0.0, tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < m_hi
        offs_m = offs_m.to(tl.int64)[:, None]
        g = tl.load(dy_cols + offs_m * stride_dy, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        xs = tl.load(x_cols + offs_m * stride_x, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            g, xs = g.to(tl.float32), xs.to(tl.float32)
        acc = tl.dot(tl.trans(xs), g, acc, input_precision=PRECISION)
    out = out_ptr + ((split.to(tl.int64) * nnz + blocks[:, None]) * BR + offs_r[None, :]) * BC + offs_c[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_r[None, :])


# (TR, total tile columns, BM, num_warps, num_stages). _prune turns the columns into
# TC = the block's width (clamped) times GROUP blocks, or a sub-tile of a wide block.
_CONFIGS = [
    (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 128, 4, 3),
]
# Fixed tile under the interpreter: narrower than most tested blocks (sub-tiles and
# token chunks are exercised) and gathering up to 4 blocks of 16 columns.
_INTERPRET_TILE = dict(TR=16, TC=16, BM=16)
_INTERPRET_GROUP = 4
# Rows of M per split chunk: a multiple of every BM; on a GPU large enough that the
# partial sums stay cheap next to the product.
_GPU_GRAIN = 512


def group_shape(columns, bc, fill):
    """(TC, GROUP) for a tile ``columns`` wide: whole blocks (TC = the block's padded
    width) gathered GROUP at a time, at most ``fill``; a block wider than the tile is
    cut in sub-tiles of ``columns`` (GROUP = 1)."""
    tc = tile(columns, bc)
    return tc, max(1, min(columns // tc, fill, GROUPS[-1]))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    size = args["dy_ptr"].element_size()
    seen, kept = set(), []
    for config in configs:
        tc, group = group_shape(config.kwargs["TN"], args["BC"], args["FILL"])
        tr, bm = tile(config.kwargs["TR"], args["BR"]), config.kwargs["BM"]
        stages = min(config.num_stages, SMEM_BUDGET // (bm * (tr + group * tc) * size))
        key = (tr, tc, group, bm, config.num_warps, stages)
        if stages >= 2 and key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(TR=tr, TC=tc, GROUP=group, BM=bm), num_warps=key[4], num_stages=stages))
    return kept


@functools.cache
def _kernel(interpret):
    """The jitted kernel, one per interpreter mode; untuned under the interpreter."""
    kernel = triton.jit(_sdd_kernel)
    if interpret:
        return kernel
    configs = [triton.Config(dict(TR=tr, TN=tn, BM=bm), num_warps=w, num_stages=s) for tr, tn, bm, w, s in _CONFIGS]
    return triton.autotune(configs, key=["M_BUCKET", "FILL", "BR", "BC"],
                           prune_configs_by=dict(early_config_prune=_prune))(kernel)


@dataclass(frozen=True)
class Schedule:
    """Gathered tiles of a layout for every group size. ``items`` (len(GROUPS), 2, nnz)
    int32: for GROUPS[s], row 0 the first stored block of each tile, row 1 its block
    count (1..GROUPS[s], all in one block row); ``n_items[s]`` tiles are used. ``fill``:
    stored blocks per non-empty block row, rounded up to a power of two (<= GROUPS[-1])."""
    items: torch.Tensor
    n_items: tuple
    fill: int


def plan(layout):
    """The :class:`Schedule` of a layout (one host sync). Checks the layout once: offsets
    rising from 0 to nnz, every block row and column in range, so a corrupt layout raises
    instead of reading out of bounds."""
    offsets, rows, cols = layout.row_offsets, layout.row_indices, layout.col_indices
    counts = torch.diff(offsets)
    per_row = torch.stack([(counts + g - 1) // g for g in GROUPS])
    valid = ((offsets[0] == 0) & (counts >= 0).all() & (offsets[-1] == cols.numel()) & (rows.numel() == cols.numel())
             & ((cols >= 0) & (cols < layout.grid[1])).all() & ((rows >= 0) & (rows < layout.grid[0])).all())
    *n_items, rows_used, valid = torch.cat([per_row.sum(1), (counts > 0).sum().view(1), valid.view(1)]).tolist()
    if not valid:
        raise ValueError("corrupt block layout: row offsets must rise from 0 to the number of stored blocks, "
                         "block rows and columns must lie in the block grid")
    nnz = cols.numel()
    items = torch.zeros(len(GROUPS), 2, nnz, dtype=torch.int32, device=offsets.device)
    block_rows = torch.arange(counts.numel(), device=offsets.device)
    for slot, (g, n) in enumerate(zip(GROUPS, n_items)):
        row = torch.repeat_interleave(block_rows, per_row[slot], output_size=n)
        # Tile t of block row r starts t·g blocks into the row.
        starts = torch.cumsum(per_row[slot], 0) - per_row[slot]
        first = offsets[row] + (torch.arange(n, device=offsets.device) - starts[row]) * g
        items[slot, 0, :n] = first.to(torch.int32)
        items[slot, 1, :n] = torch.clamp(offsets[row + 1] - first, max=g).to(torch.int32)
    fill = min(GROUPS[-1], triton.next_power_of_2(-(-nnz // max(1, rows_used))))
    return Schedule(items, tuple(n_items), fill)


_schedules = {}


def schedule(layout):
    """The cached :class:`Schedule` of a layout (built once per set of index tensors)."""
    tensors = (layout.row_offsets, layout.row_indices, layout.col_indices)
    key = id(layout.row_offsets)
    entry = _schedules.get(key)
    if entry is not None and all(ref() is t for ref, t in zip(entry[0], tensors)):
        return entry[1]
    result = plan(layout)
    refs = tuple(weakref.ref(t, lambda _: _schedules.pop(key, None)) for t in tensors)
    _schedules[key] = (refs, result)
    return result


def split_m(m, programs, slots, grain):
    """(number of M chunks, rows per chunk): enough programs for ~2 waves, chunks of >= grain rows."""
    want = max(1, -(-2 * slots // max(1, programs)))
    split = max(1, min(want, triton.cdiv(m, grain)))
    per_split = triton.cdiv(triton.cdiv(m, split), grain) * grain
    return triton.cdiv(m, per_split), per_split


def use_dense(m, layout, dtype, device):
    """True where the dense route (cuBLAS dyᵀx, then a gather) is expected to be faster.

    Model (unmeasured), with d the layout's density, W = N x K, s bytes per element,
    P cuBLAS's throughput and R = P / DRAM bandwidth (``_RIDGE``):
    the SDD kernel does d·2MNK flops at DENSE_DW_DENSITY·P (gathered tiles take no
    TMA, partly filled groups are padded), so on compute alone dense wins from
    d = DENSE_DW_DENSITY; the dense route also writes the full dW and reads its
    stored blocks back, (1 + d)·NK·s more bytes. Dense iff
    2MNK/P + (1 + d)·NK·s/BW <= d·2MNK/(DENSE_DW_DENSITY·P), i.e.
    d / DENSE_DW_DENSITY >= 1 + (1 + d)·s·R/(2M): never at a few hundred tokens, from
    d ≈ 0.8 at 4096 bf16 tokens. CUDA only: on CPU the cpu backend's own rule applies.
    """
    if device.type != "cuda" or m == 0:
        return False
    d = layout.density
    size = torch.empty((), dtype=dtype).element_size()
    return d / DENSE_DW_DENSITY >= 1 + (1 + d) * size * _RIDGE / (2 * m)


def dense_grad_weight(dy, x, layout):
    """The dense route: (dyᵀ x) on every block, then the stored blocks gathered."""
    (rb, cb), (br, bc) = layout.grid, layout.block_size
    full = (dy.T @ x).view(rb, br, cb, bc).transpose(1, 2)
    return full[layout.row_indices, layout.col_indices]


def unit_columns(t):
    """``t`` with unit column stride (row strides are passed to the kernel): the tiles
    load whole rows of contiguous columns."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def device_guard(device):
    """Launch on ``device``, whatever the current CUDA device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def bsr_grad_weight(dy, x, layout, bias_grad=False):
    """dy (M, N), x (M, K) -> (dvalues (nnz, br, bc), dbias (N,) or None): (dy.T @ x) on the stored
    blocks of ``layout``, and with ``bias_grad`` the column sums of dy."""
    return _values_grad(dy, x, layout), dy.sum(0) if bias_grad else None


def _values_grad(dy, x, layout):
    (br, bc), nnz, m = layout.block_size, layout.nnz_blocks, x.shape[0]
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, br, bc, dtype=x.dtype, device=x.device)
    if use_dense(m, layout, x.dtype, x.device):
        return dense_grad_weight(dy, x, layout)
    with device_guard(x.device):
        return sdd(unit_columns(dy), unit_columns(x), layout)


def sdd(dy, x, layout, interpret_meta=None):
    """Launch the SDD kernel (autotuned; under the interpreter the fixed tile, or
    ``interpret_meta`` = dict(TR, TC, GROUP, BM))."""
    (br, bc), nnz, m = layout.block_size, layout.nnz_blocks, x.shape[0]
    plan_ = schedule(layout)
    interpret = interpreting()
    if interpret:
        meta = interpret_meta or dict(_INTERPRET_TILE, GROUP=_INTERPRET_GROUP if _INTERPRET_TILE["TC"] >= bc else 1)
        grain = meta["BM"]
    else:
        grain = _GPU_GRAIN
    # Split from the program count at a nominal 128 x 128 tile (the autotuned one may differ).
    tc, group = group_shape(128, bc, plan_.fill)
    programs = plan_.n_items[GROUPS.index(group)] * triton.cdiv(br, 128) * triton.cdiv(bc, tc)
    split, per_split = split_m(m, programs, parallel_slots(x.device), grain)
    out = torch.empty(split, nnz, br, bc, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    args = (dy, x, out, layout.row_indices, layout.col_indices, plan_.items, nnz, m,
            dy.stride(0), x.stride(0), per_split, triton.next_power_of_2(m), plan_.fill)

    def grid(cfg):
        tiles = plan_.n_items[GROUPS.index(cfg["GROUP"])]
        return (triton.cdiv(br, cfg["TR"]) * triton.cdiv(bc, cfg["TC"]) * tiles, split)

    common = dict(BR=br, BC=bc, PRECISION=dot_precision(x.dtype), UPCAST=upcast(x.dtype))
    kernel = _kernel(interpret)
    if interpret:
        kernel[grid(meta)](*args, **common, **meta)
    else:
        kernel[grid](*args, **common)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
