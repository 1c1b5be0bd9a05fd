"""Triton backend (GPU; on CPU only under ``TRITON_INTERPRET=1``, for tests).

Three kernels. ``_mm`` is a tiled GEMM over strided operands (so transposes
such as Uᵀ are free views) with an optional fused bias. ``_chain`` fuses a
skinny product with the small r x r one: for a tile of tokens it accumulates
P = A B over the long dimension and, while P is still in registers, Q = P C, and
stores both; the forward uses it for (a, b) = (x V, x V Sᵀ), the backward for
(G, H) = (dy U, dy U S). Ranks above ``_CHAIN_MAX_R`` run the two products as
two ``_mm`` launches. ``_token_reduction`` computes the weight gradients
Aᵀ B (dS = Gᵀ a, dU = dyᵀ b, dV = xᵀ H: outputs of r x r or features x r,
reduced over all tokens): their outputs are a handful of tiles, so the tokens
are split in chunks (split-K) whose fp32 partial sums are added in a fixed
order (deterministic), and its tiles are autotuned. Accumulation is fp32; fp32
operands use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` says so,
like torch. Offsets are int64 (tensors past 2^31 elements); launches run on the
inputs' device.

triton is imported and the kernels are compiled on first use, never at import.
The kernels use only core builtins of triton.language (tl.full, not tl.zeros):
the @jit functions of triton's standard library are fixed to interpreter or
compiled mode when triton is imported, which breaks one mode or the other in a
process that imported triton before setting TRITON_INTERPRET (e.g. torch.compile).
"""
import contextlib
import functools
import os

import torch

from ..bsr.triton_backend import SMEM_BUDGET, _interpreter_missing, parallel_slots
from ..registry import register_kernel

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHAIN_MAX_R = 128


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable(device, dtype):
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on cpu), got {device.type}"
    if dtype not in _DTYPES:
        return f"the triton backend supports {_DTYPES}, got {dtype}"
    if device.type == "cpu":
        return _interpreter_missing()
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


@functools.cache
def _kernels(interpret):
    """The jitted kernels, one set per mode: triton.jit reads TRITON_INTERPRET when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                  sam, sak, sbk, sbn, scm, scn,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
        rk = tl.arange(0, BK)
        acc = tl.full((BM, BN), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kk64 = kk.to(tl.int64)
            a = tl.load(a_ptr + rm64[:, None] * sam + kk64[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk64[:, None] * sbk + rn64[None, :] * sbn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm64[:, None] * scm + rn64[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def chain_kernel(a_ptr, b_ptr, c_ptr, p_ptr, q_ptr, M, K, R,
                     sam, sak, sbk, sbr, scr, scs, spm, spr, sqm, sqr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rm64 = rm.to(tl.int64)
        rr = tl.arange(0, BR)
        rr64 = rr.to(tl.int64)
        rk = tl.arange(0, BK)
        acc = tl.full((BM, BR), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kk64 = kk.to(tl.int64)
            a = tl.load(a_ptr + rm64[:, None] * sam + kk64[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk64[:, None] * sbk + rr64[None, :] * sbr,
                        mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        out_mask = (rm[:, None] < M) & (rr[None, :] < R)
        p = acc.to(p_ptr.dtype.element_ty)
        tl.store(p_ptr + rm64[:, None] * spm + rr64[None, :] * spr, p, mask=out_mask)
        c = tl.load(c_ptr + rr64[:, None] * scr + rr64[None, :] * scs,
                    mask=(rr[:, None] < R) & (rr[None, :] < R), other=0.0)
        if WIDEN:
            p, c = p.to(tl.float32), c.to(tl.float32)
        q = tl.dot(p, c, input_precision=PRECISION)  # P rounded like the stored copy, so Q matches two launches
        tl.store(q_ptr + rm64[:, None] * sqm + rr64[None, :] * sqr, q.to(q_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def reduction_kernel(a_ptr, b_ptr, c_ptr, M, P, R, sam, sbm, scs, scp, m_per_split, M_BUCKET,
                         PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                         BP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        """c[split] (P, R) = a[chunk]ᵀ b[chunk] over the tokens of chunk ``split`` (axis 2).
        a (M, P) and b (M, R) have unit column stride. The wide side P is the dot's M
        (wgmma needs 64 rows), the rank side R its N."""
        rp = tl.program_id(0) * BP + tl.arange(0, BP)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        split = tl.program_id(2)
        mask_p, mask_r = rp < P, rr < R
        m_lo = split * m_per_split
        m_hi = tl.minimum(M, m_lo + m_per_split)
        acc = tl.full((BP, BR), 0.0, tl.float32)
        for m0 in range(m_lo, m_hi, BK):
            rm = m0 + tl.arange(0, BK)
            mask_m = rm < m_hi
            rm64 = rm.to(tl.int64)[:, None]
            a = tl.load(a_ptr + rm64 * sam + rp[None, :], mask=mask_m[:, None] & mask_p[None, :], other=0.0)
            b = tl.load(b_ptr + rm64 * sbm + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        c = c_ptr + split.to(tl.int64) * scs + rp.to(tl.int64)[:, None] * scp + rr[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])

    if interpret:  # untuned: autotuning would run every config in the interpreter
        return triton, mm_kernel, chain_kernel, reduction_kernel
    configs = [triton.Config(dict(BP=bp, BR=br, BK=bk), num_warps=w, num_stages=st)
               for bp, br, bk, w, st in _REDUCTION_CONFIGS]
    reduction = triton.autotune(configs, key=["P", "R", "M_BUCKET"],
                                prune_configs_by=dict(early_config_prune=_prune_reduction))(reduction_kernel)
    return triton, mm_kernel, chain_kernel, reduction


# (BP, BR, BK, num_warps, num_stages); BP/BR are clamped to the output by _prune_reduction.
_REDUCTION_CONFIGS = [
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (256, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (128, 32, 128, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 32, 128, 4, 4),
]
# Tokens per split chunk on a GPU: a multiple of every BK, long enough that the
# partial sums (P x R fp32 per chunk) stay small next to the chunk's reads.
_GPU_GRAIN = 512
_INTERPRET_REDUCTION = dict(BP=16, BR=16, BK=16)


def _edge(limit, size):
    """Tile edge for an output edge ``size``: a power of two >= 16 (tl.dot's minimum), <= limit."""
    return min(limit, max(16, 1 << max(0, size - 1).bit_length()))


def _prune_reduction(configs, named_args, **kwargs):
    import triton
    args = {**named_args, **kwargs}
    size = args["a_ptr"].element_size()
    seen, kept = set(), []
    for config in configs:
        bp, br, bk = _edge(config.kwargs["BP"], args["P"]), _edge(config.kwargs["BR"], args["R"]), config.kwargs["BK"]
        stages = min(config.num_stages, SMEM_BUDGET // (bk * (bp + br) * size))
        key = (bp, br, bk, config.num_warps, stages)
        if stages >= 2 and key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(BP=bp, BR=br, BK=bk), num_warps=key[3], num_stages=stages))
    return kept


def _widen(dtype):
    """Widen bf16 tiles to fp32 before tl.dot under the interpreter only: its numpy
    dot misreads bf16 operands (numpy has no bf16). GPUs take bf16 natively."""
    return dtype == torch.bfloat16 and _interpreting()


def _precision(dtype):
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting()
    return "tf32" if tf32 else "ieee"


def _blocks(m, n):
    if _interpreting():  # small tiles keep the interpreter fast on test shapes
        return 16, 16, 16
    return (128 if m >= 128 else 64), (128 if n >= 128 else 64), 32


def _warps(accumulated):
    """8 warps where the fp32 accumulators of a program pass 64 per thread of 4 warps
    (the 128 x 128 GEMM tile, the chain's two 64 x 128 tiles), which spill otherwise."""
    return 8 if accumulated > 64 * 128 else 4


def _mm(a, b, bias=None):
    """a (M, K) @ b (K, N) [+ bias] for strided a, b."""
    triton, mm_kernel, _, _ = _kernels(_interpreting())
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    bm, bn, bk = _blocks(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    mm_kernel[grid](a, b, c, bias if bias is not None else c, m, n, k,
                    a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                    HAS_BIAS=bias is not None, PRECISION=_precision(a.dtype), WIDEN=_widen(a.dtype),
                    BM=bm, BN=bn, BK=bk, num_warps=_warps(bm * bn))
    return c


def _chain(a, b, c):
    """(a @ b, (a @ b) @ c) for a (M, K), b (K, r), c (r, r); one launch when r is small."""
    triton, _, chain_kernel, _ = _kernels(_interpreting())
    (m, k), r = a.shape, b.shape[1]
    if r > _CHAIN_MAX_R:
        p = _mm(a, b)
        return p, _mm(p, c)
    p = torch.empty(m, r, dtype=a.dtype, device=a.device)
    q = torch.empty_like(p)
    if m == 0:
        return p, q
    br = max(16, triton.next_power_of_2(r))
    bm, bk = (16, 16) if _interpreting() else (64, 32)
    chain_kernel[(triton.cdiv(m, bm),)](
        a, b, c, p, q, m, k, r, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        PRECISION=_precision(a.dtype), WIDEN=_widen(a.dtype), BM=bm, BK=bk, BR=br, num_warps=_warps(2 * bm * br))
    return p, q


def token_split(m, p, r, device):
    """(token chunks, tokens per chunk) of a reduction to a (p, r) output: enough programs
    for ~2 waves at a nominal 128 x 64 tile, chunks of >= the grain (16 in the interpreter)."""
    from ..bsr.triton_grad import split_m
    grain = _INTERPRET_REDUCTION["BK"] if _interpreting() else _GPU_GRAIN
    programs = -(-p // 128) * -(-r // 64)
    return split_m(m, programs, parallel_slots(device), grain)


def _unit_columns(t):
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _token_reduction(a, b):
    """aᵀ b (P, R) for a (M, P), b (M, R), reduced over the M tokens in split chunks."""
    triton, _, _, kernel = _kernels(_interpreting())
    a, b = _unit_columns(a), _unit_columns(b)
    (m, p), r = a.shape, b.shape[1]
    if m == 0 or p == 0 or r == 0:
        return torch.zeros(p, r, dtype=a.dtype, device=a.device)
    split, per_split = token_split(m, p, r, a.device)
    # One chunk writes the output; several write fp32 partials, summed in chunk order.
    out = torch.empty(split, p, r, dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
    args = (a, b, out, m, p, r, a.stride(0), b.stride(0), p * r, r, per_split, triton.next_power_of_2(m))
    meta = dict(PRECISION=_precision(a.dtype), WIDEN=_widen(a.dtype))

    def grid(cfg):
        return (triton.cdiv(p, cfg["BP"]), triton.cdiv(r, cfg["BR"]), split)

    if _interpreting():
        kernel[grid(_INTERPRET_REDUCTION)](*args, **meta, **_INTERPRET_REDUCTION)
    else:
        kernel[grid](*args, **meta)
    return out[0] if split == 1 else out.sum(0).to(a.dtype)


def _on_device(device):
    """Launch on ``device``, whatever the current CUDA device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lowrank_forward(x, U, S, V, bias):
    with _on_device(x.device):
        a, b = _chain(x, V, S.t())
        return _mm(b, U.t(), bias), a, b


def lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs):
    need_dx, need_du, need_ds, need_dv, need_db = needs
    with _on_device(dy.device):
        g, h = _chain(dy, U, S)
        dx = _mm(h, V.t()) if need_dx else None
        ds = _token_reduction(g, a) if need_ds else None
        du = _token_reduction(dy, a if kl_grads else b) if need_du else None
        dv = _token_reduction(x, g if kl_grads else h) if need_dv else None
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_db else None
    return dx, du, ds, dv, db


register_kernel("lowrank_forward", "triton", lowrank_forward, _unavailable)
register_kernel("lowrank_backward", "triton", lowrank_backward, _unavailable)
