"""Triton kernels of the block-sparse conv products: implicit GEMM over the stored channel
blocks, reading x and dy in place through their strides (any memory format; no im2col,
no dense weight).

Forward: a program owns a tile of output pixels and (part of) one output block row; for
every tap it computes the shifted input pixels once, then walks the row's stored blocks
(row_offsets/col_indices), each a (pixels, in) x (in, out) product into fp32.

dX: a program owns a tile of input pixels of one *stride phase* (ih % sh, iw % sw) and one
input block column of one group, walking the column through the transpose metadata. Within
a phase a tap either reaches every pixel of the tile through whole output pixels or none,
so taps are skipped per program, not masked per pixel: stride 2 costs no extra products.

dW: a program owns a tile of one stored block at one tap and reduces over output pixels;
when blocks x taps are too few to fill the GPU the pixels are split in chunks whose fp32
partial sums are added afterwards.

The stored blocks are repacked per call to (nnz, kh, kw, k, n) so the weight tile of every
product is contiguous along its output edge. Every load is masked by the channel, pixel and
block bounds, so no metadata can make a kernel read outside its tensors. Pixel and program
indices are 32-bit (a launch past that is refused); every product of an index with a stride
or a block's extent is 64-bit, so tensors of more than 2**31 elements are addressed right.

This module imports triton: it is loaded on the first kernel call (triton_backend). Like
the bsr kernels it uses only core builtins of triton.language (see bsr/triton_forward.py).
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..bsr.triton_backend import dot_precision, interpreting, parallel_slots, upcast
from ..bsr.triton_forward import tile
from ..bsr.triton_grad import split_m
from .geometry import output_memory_format


def _forward_kernel(x_ptr, v_ptr, bias_ptr, y_ptr, offsets_ptr, cols_ptr, nnz, n_rows, P, HO, WO, H, W, CIN_G,
                    COUT, COUT_G, sxn, sxc, sxh, sxw, syn, syc, syh, syw, SH, SW, PT, PL, DH, DW, P_BUCKET,
                    BS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Pixel tiles slowest: the programs in flight share one input tile in L2 across block rows.
    n_sub: tl.constexpr = (BS + BN - 1) // BN
    pid = tl.program_id(0)
    per_p = n_rows * n_sub
    pid_p, rest = pid // per_p, pid % per_p
    row, pid_n = rest // n_sub, rest % n_sub

    offs_p = pid_p * BP + tl.arange(0, BP)
    mask_p = offs_p < P
    n, rem = offs_p // (HO * WO), offs_p % (HO * WO)
    oh, ow = rem // WO, rem % WO
    offs_n = pid_n * BN + tl.arange(0, BN)
    cout = row * BS + offs_n
    mask_n = (offs_n < BS) & (cout < COUT)
    x_pixels = x_ptr + n.to(tl.int64) * sxn + ((row * BS) // COUT_G * CIN_G).to(tl.int64) * sxc
    lo = tl.maximum(tl.load(offsets_ptr + row), 0)
    hi = tl.minimum(tl.load(offsets_ptr + row + 1), nnz)
    offs_k = tl.arange(0, BK)

    acc = tl.full((BP, BN), 0.0, tl.float32)
    for ky in range(KH):
        ih = oh * SH - PT + ky * DH
        ok_h = mask_p & (ih >= 0) & (ih < H)
        for kx in range(KW):
            iw = ow * SW - PL + kx * DW
            ok = ok_h & (iw >= 0) & (iw < W)
            a_pixels = x_pixels + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            for q in range(lo, hi):  # int64, as the offsets
                col = tl.load(cols_ptr + q)
                v_block = v_ptr + (q * (KH * KW) + ky * KW + kx) * (BS * BS) + offs_n[None, :]
                for k0 in tl.static_range(0, BS, BK):
                    kk = k0 + offs_k
                    cin = col * BS + kk
                    mask_k = (kk < BS) & (cin >= 0) & (cin < CIN_G)
                    a = tl.load(a_pixels[:, None] + cin.to(tl.int64)[None, :] * sxc,
                                mask=ok[:, None] & mask_k[None, :], other=0.0)
                    v = tl.load(v_block + kk[:, None] * BS, mask=(kk[:, None] < BS) & mask_n[None, :], other=0.0)
                    if UPCAST:
                        a, v = a.to(tl.float32), v.to(tl.float32)
                    acc = tl.dot(a, v, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cout, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = (y_ptr + n.to(tl.int64)[:, None] * syn + cout.to(tl.int64)[None, :] * syc
           + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None])
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


def _grad_input_kernel(dy_ptr, v_ptr, dx_ptr, offsets_ptr, ids_ptr, rows_ptr, nnz, n_rows, n_cols, GROUPS, PA, A, B,
                       H, W, HO, WO, CIN_G, COUT, COUT_G, sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, SH, SW, PT, PL,
                       DH, DW, P_BUCKET, BS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Pixel tiles (of one phase) slowest, then phases, then (group, block column), then sub-tiles.
    n_sub: tl.constexpr = (BS + BN - 1) // BN
    pid = tl.program_id(0)
    per_phase = GROUPS * n_cols * n_sub
    per_p = SH * SW * per_phase
    pid_p, rest = pid // per_p, pid % per_p
    phase, rest = rest // per_phase, rest % per_phase
    group, rest = rest // (n_cols * n_sub), rest % (n_cols * n_sub)
    col, pid_n = rest // n_sub, rest % n_sub
    ph, pw = phase // SW, phase % SW

    # Input pixel (ih, iw) = (ph + SH * a, pw + SW * b); PA = N * A * B pixels per phase.
    offs_p = pid_p * BP + tl.arange(0, BP)
    n, rem = offs_p // (A * B), offs_p % (A * B)
    a_, b_ = rem // B, rem % B
    ih, iw = ph + SH * a_, pw + SW * b_
    mask_p = (offs_p < PA) & (ih < H) & (iw < W)
    offs_n = pid_n * BN + tl.arange(0, BN)
    cin = col * BS + offs_n
    mask_n = (offs_n < BS) & (cin < CIN_G)
    dy_images = dy_ptr + n.to(tl.int64) * sdn
    lo = tl.maximum(tl.load(offsets_ptr + col), 0)
    hi = tl.minimum(tl.load(offsets_ptr + col + 1), nnz)
    offs_k = tl.arange(0, BK)

    acc = tl.full((BP, BN), 0.0, tl.float32)
    for ky in range(KH):
        # oh = (ih + PT - ky * DH) / SH must be whole: the same for every pixel of the phase.
        shift_h = ph + PT - ky * DH
        if (shift_h % SH + SH) % SH == 0:
            oh = a_ + shift_h // SH  # exact division: C and floor semantics agree
            ok_h = mask_p & (oh >= 0) & (oh < HO)
            for kx in range(KW):
                shift_w = pw + PL - kx * DW
                if (shift_w % SW + SW) % SW == 0:
                    ow = b_ + shift_w // SW
                    ok = ok_h & (ow >= 0) & (ow < WO)
                    g_pixels = dy_images + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
                    for q in range(lo, hi):
                        row = tl.load(rows_ptr + q)
                        block = tl.load(ids_ptr + q)
                        valid = (row >= 0) & (row < n_rows) & (block >= 0) & (block < nnz)
                        if valid & ((row * BS) // COUT_G == group):
                            v_block = (v_ptr + (block.to(tl.int64) * (KH * KW) + ky * KW + kx) * (BS * BS)
                                       + offs_n[None, :])
                            for k0 in tl.static_range(0, BS, BK):
                                kk = k0 + offs_k
                                cout = row * BS + kk
                                mask_k = (kk < BS) & (cout < COUT)
                                g = tl.load(g_pixels[:, None] + cout.to(tl.int64)[None, :] * sdc,
                                            mask=ok[:, None] & mask_k[None, :], other=0.0)
                                v = tl.load(v_block + kk[:, None] * BS, mask=(kk[:, None] < BS) & mask_n[None, :],
                                            other=0.0)
                                if UPCAST:
                                    g, v = g.to(tl.float32), v.to(tl.float32)
                                acc = tl.dot(g, v, acc, input_precision=PRECISION)

    channel = (group * CIN_G + cin).to(tl.int64)
    out = (dx_ptr + n.to(tl.int64)[:, None] * sxn + channel[None, :] * sxc
           + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None])
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


def _grad_weight_kernel(dy_ptr, x_ptr, out_ptr, rows_ptr, cols_ptr, nnz, n_rows, n_cols, P, HO, WO, H, W, CIN_G,
                        COUT, COUT_G, sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, SH, SW, PT, PL, DH, DW, p_per_split,
                        P_BUCKET, BS: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        TR: tl.constexpr, TC: tl.constexpr, BM: tl.constexpr):
    # Sub-tiles, then taps (neighbours share the dy slice), then blocks, then pixel chunks.
    n_c: tl.constexpr = (BS + TC - 1) // TC
    n_sub: tl.constexpr = ((BS + TR - 1) // TR) * n_c
    pid = tl.program_id(0)
    sub, rest = pid % n_sub, pid // n_sub
    tap, rest = rest % (KH * KW), rest // (KH * KW)
    block, split = rest % nnz, rest // nnz
    ky, kx = tap // KW, tap % KW
    row = tl.load(rows_ptr + block)
    col = tl.load(cols_ptr + block)
    offs_r = (sub // n_c) * TR + tl.arange(0, TR)
    offs_c = (sub % n_c) * TC + tl.arange(0, TC)
    cout, cin = row * BS + offs_r, col * BS + offs_c
    mask_r = (offs_r < BS) & (cout < COUT)
    mask_c = (offs_c < BS) & (cin < CIN_G)
    dy_channels = dy_ptr + cout.to(tl.int64)[None, :] * sdc
    x_channels = x_ptr + ((row * BS) // COUT_G * CIN_G + cin).to(tl.int64)[None, :] * sxc
    p_lo = split * p_per_split
    p_hi = tl.minimum(P, p_lo + p_per_split)
    # A block outside the grid reduces over no pixels (zeros): its channels are not read.
    block_ok = (row >= 0) & (row < n_rows) & (col >= 0) & (col < n_cols)
    p_hi = tl.where(block_ok, p_hi, p_lo)

    acc = tl.full((TR, TC), 0.0, tl.float32)
    for p0 in range(p_lo, p_hi, BM):
        offs_p = p0 + tl.arange(0, BM)
        mask_p = offs_p < p_hi
        n, rem = offs_p // (HO * WO), offs_p % (HO * WO)
        oh, ow = rem // WO, rem % WO
        ih, iw = oh * SH - PT + ky * DH, ow * SW - PL + kx * DW
        ok = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n = n.to(tl.int64)
        g = tl.load(dy_channels + (n * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[:, None],
                    mask=mask_p[:, None] & mask_r[None, :], other=0.0)
        xs = tl.load(x_channels + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None],
                     mask=ok[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            g, xs = g.to(tl.float32), xs.to(tl.float32)
        acc = tl.dot(tl.trans(g), xs, acc, input_precision=PRECISION)
    # out: (split, nnz, BS, BS, KH * KW), the layout of ``values``.
    out = (out_ptr + ((split * nnz + block).to(tl.int64) * BS + offs_r[:, None]) * (BS * KH * KW)
           + offs_c[None, :] * (KH * KW) + tap)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_r[:, None] < BS) & (offs_c[None, :] < BS))


# (BP, BN, BK, num_warps, num_stages) of forward and dX; BN/BK are clamped to the block.
_GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 3),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 4, 5),
]
# (TR, TC, BM, num_warps, num_stages) of dW; TR/TC are clamped to the block.
_SDD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 128, 4, 3),
    (32, 32, 64, 4, 4),
]
# Fixed tiles under the interpreter: small, narrower than a 32 block so sub-tiles and K chunks run.
_INTERPRET_GEMM = dict(BP=32, BN=16, BK=16)
_INTERPRET_SDD = dict(TR=16, TC=16, BM=32)
# Output pixels per dW chunk on a GPU: a multiple of every BM, large next to the partial-sum pass.
_GPU_GRAIN = 512


def _pruner(edges):
    """early_config_prune: the tile edges ``edges`` clamped to the block, duplicates dropped."""
    def prune(configs, named_args, **kwargs):
        bs = {**named_args, **kwargs}["BS"]
        kept = {}
        for config in configs:
            meta = {name: tile(value, bs) if name in edges else value for name, value in config.kwargs.items()}
            key = (*meta.values(), config.num_warps, config.num_stages)
            kept.setdefault(key, triton.Config(meta, num_warps=config.num_warps, num_stages=config.num_stages))
        return list(kept.values())
    return prune


_KERNELS = {
    "forward": (_forward_kernel, _GEMM_CONFIGS, ("BP", "BN", "BK"), ("BN", "BK")),
    "grad_input": (_grad_input_kernel, _GEMM_CONFIGS, ("BP", "BN", "BK"), ("BN", "BK")),
    "grad_weight": (_grad_weight_kernel, _SDD_CONFIGS, ("TR", "TC", "BM"), ("TR", "TC")),
}


@functools.cache
def _kernel(name, interpret):
    """The jitted kernel (triton.jit reads TRITON_INTERPRET when it decorates, hence one per
    mode); under the interpreter untuned, since autotuning would run every config."""
    fn, configs, names, edges = _KERNELS[name]
    kernel = triton.jit(fn)
    if interpret:
        return kernel
    configs = [triton.Config(dict(zip(names, c[:3])), num_warps=c[3], num_stages=c[4]) for c in configs]
    return triton.autotune(configs, key=["P_BUCKET", "BS", "KH", "KW"],
                           prune_configs_by=dict(early_config_prune=_pruner(edges)))(kernel)


def _grid(programs):
    """A 1-D grid of ``programs``: the kernels decode the program id in 32 bits."""
    if programs >= 2 ** 31:
        raise ValueError(f"this conv needs {programs} programs, more than the kernels index (2**31 - 1): "
                         "split the batch")
    return (programs,)


def _check_pixels(pixels):
    """Pixel indices are 32-bit in the kernels (their products with strides are 64-bit); the
    margin leaves room for the last tile's lanes past the end."""
    if pixels >= 2 ** 31 - 1024:
        raise ValueError(f"{pixels} pixels (batch x height x width) exceed the kernels' 32-bit pixel index: "
                         "split the batch")


def _launch(name, programs, args, meta, interpret_tile):
    """Run kernel ``name`` on ``programs(tile config)`` programs, on the device of ``args[0]``
    (triton launches on the current CUDA device)."""
    kernel = _kernel(name, interpreting())
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if interpreting():
            kernel[_grid(programs(interpret_tile))](*args, **meta, **interpret_tile)
        else:
            kernel[lambda cfg: _grid(programs(cfg))](*args, **meta)


def _common(geometry, dtype):
    """Runtime geometry arguments and constexprs shared by the three kernels."""
    (sh, sw), (pt, _, pl, _), (dh, dw) = geometry.stride, geometry.padding, geometry.dilation
    meta = dict(BS=geometry.block_size, KH=geometry.kernel_size[0], KW=geometry.kernel_size[1],
                PRECISION=dot_precision(dtype), UPCAST=upcast(dtype))
    return (sh, sw, pt, pl, dh, dw), meta


def _dense(*tensors):
    """Metadata as the kernels index it: element i at pointer + i."""
    return [t.contiguous() for t in tensors]


def _channels(geometry):
    return geometry.in_per_group, geometry.out_channels, geometry.out_per_group


def conv_forward(x, values, layout, geometry, bias=None):
    n, _, h, w = x.shape
    (ho, wo), bs, (rb, _) = geometry.output_size(h, w), geometry.block_size, layout.grid
    _check_pixels(n * ho * wo)
    y = torch.empty(n, geometry.out_channels, ho, wo, dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))
    if y.numel() == 0:
        return y
    if layout.nnz_blocks == 0:  # nothing stored: no kernel (and no empty buffer to hand it)
        y.zero_()
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1))
    pixels, (conv, meta) = n * ho * wo, _common(geometry, x.dtype)
    weight = values.permute(0, 3, 4, 2, 1).contiguous()  # (nnz, kh, kw, in, out)
    has_bias = bias is not None
    # x and y are read through their strides, the rest densely; without a bias, y stands in for
    # its pointer, which the kernel (HAS_BIAS off) never reads.
    bias = bias.contiguous() if has_bias else y
    args = (x, weight, bias, y, *_dense(layout.row_offsets, layout.col_indices), layout.nnz_blocks, rb,
            pixels, ho, wo, h, w, *_channels(geometry), *x.stride(), *y.stride(), *conv,
            triton.next_power_of_2(pixels))
    _launch("forward", lambda cfg: triton.cdiv(pixels, cfg["BP"]) * rb * triton.cdiv(bs, cfg["BN"]), args,
            dict(meta, HAS_BIAS=has_bias), _INTERPRET_GEMM)
    return y


def conv_grad_input(dy, values, layout, geometry, input_size):
    (n, _, ho, wo), (h, w) = dy.shape, input_size
    bs, (sh, sw), (rb, cb), groups = geometry.block_size, geometry.stride, layout.grid, geometry.groups
    a, b = triton.cdiv(h, sh), triton.cdiv(w, sw)  # input pixels per stride phase: (a, b) of each image
    _check_pixels(n * a * b)
    dx = torch.empty(n, geometry.in_channels, h, w, dtype=dy.dtype, device=dy.device,
                     memory_format=output_memory_format(dy))
    if dx.numel() == 0:
        return dx
    if layout.nnz_blocks == 0:
        return dx.zero_()
    pixels, (conv, meta) = n * a * b, _common(geometry, dy.dtype)
    weight = values.permute(0, 3, 4, 1, 2).contiguous()  # (nnz, kh, kw, out, in)
    args = (dy, weight, dx, *_dense(layout.col_offsets, layout.t_block_ids, layout.t_row_indices), layout.nnz_blocks,
            rb, cb, groups, pixels, a, b, h, w, ho, wo, *_channels(geometry), *dy.stride(), *dx.stride(), *conv,
            triton.next_power_of_2(pixels))
    _launch("grad_input", lambda cfg: triton.cdiv(pixels, cfg["BP"]) * sh * sw * groups * cb
            * triton.cdiv(bs, cfg["BN"]), args, meta, _INTERPRET_GEMM)
    return dx


def conv_grad_weight(dy, x, layout, geometry, bias_grad=False):
    """(dvalues, dbias or None); the bias gradient is a separate sum of dY."""
    return _values_grad(dy, x, layout, geometry), dy.sum((0, 2, 3)) if bias_grad else None


def _values_grad(dy, x, layout, geometry):
    (n, _, ho, wo), (h, w) = dy.shape, x.shape[2:]
    bs, (kh, kw), nnz, (rb, cb) = geometry.block_size, geometry.kernel_size, layout.nnz_blocks, layout.grid
    pixels = n * ho * wo
    _check_pixels(pixels)
    if nnz == 0 or pixels == 0:
        return torch.zeros(nnz, bs, bs, kh, kw, dtype=x.dtype, device=x.device)
    interpret = interpreting()
    grain = _INTERPRET_SDD["BM"] if interpret else _GPU_GRAIN
    programs = nnz * kh * kw * triton.cdiv(bs, 64) ** 2
    split, per_split = split_m(pixels, programs, parallel_slots(x.device), grain)
    out = torch.empty(split, nnz, bs, bs, kh, kw, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    conv, meta = _common(geometry, x.dtype)
    args = (dy, x, out, *_dense(layout.row_indices, layout.col_indices), nnz, rb, cb, pixels, ho, wo, h, w,
            *_channels(geometry), *dy.stride(), *x.stride(), *conv, per_split, triton.next_power_of_2(pixels))
    _launch("grad_weight", lambda cfg: triton.cdiv(bs, cfg["TR"]) * triton.cdiv(bs, cfg["TC"]) * kh * kw * nnz * split,
            args, meta, _INTERPRET_SDD)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
