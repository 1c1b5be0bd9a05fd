"""Triton backend (GPU; on CPU only under ``TRITON_INTERPRET=1``, for tests).

Two kernels. ``_mm`` is a tiled GEMM over strided operands (so transposes
such as dyᵀ are free views) with an optional fused bias. ``_chain`` fuses a
skinny product with the small r x r one: for a tile of tokens it accumulates
P = A B over the long dimension and, while P is still in registers, Q = P C, and
stores both; the forward uses it for (a, b) = (x V, x V Sᵀ), the backward for
(G, H) = (dy U, dy U S). Ranks above ``_CHAIN_MAX_R`` run the two products as
two ``_mm`` launches. Accumulation is fp32; fp32 operands use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` says so, like torch.

triton is imported and the kernels are compiled on first use, never at import.
The kernels use only core builtins of triton.language (tl.full, not tl.zeros):
the @jit functions of triton's standard library are fixed to interpreter or
compiled mode when triton is imported, which breaks one mode or the other in a
process that imported triton before setting TRITON_INTERPRET (e.g. torch.compile).
"""
import functools
import os

import torch

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
        rk = tl.arange(0, BK)
        acc = tl.full((BM, BN), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def chain_kernel(a_ptr, b_ptr, c_ptr, p_ptr, q_ptr, M, K, R,
                     sam, sak, sbk, sbr, scr, scs, spm, spr, sqm, sqr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        rk = tl.arange(0, BK)
        acc = tl.full((BM, BR), 0.0, tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * sbk + rr[None, :] * sbr,
                        mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        out_mask = (rm[:, None] < M) & (rr[None, :] < R)
        p = acc.to(p_ptr.dtype.element_ty)
        tl.store(p_ptr + rm[:, None] * spm + rr[None, :] * spr, p, mask=out_mask)
        c = tl.load(c_ptr + rr[:, None] * scr + rr[None, :] * scs,
                    mask=(rr[:, None] < R) & (rr[None, :] < R), other=0.0)
        if WIDEN:
            p, c = p.to(tl.float32), c.to(tl.float32)
        q = tl.dot(p, c, input_precision=PRECISION)  # P rounded like the stored copy, so Q matches two launches
        tl.store(q_ptr + rm[:, None] * sqm + rr[None, :] * sqr, q.to(q_ptr.dtype.element_ty), mask=out_mask)

    return triton, mm_kernel, chain_kernel


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


def _mm(a, b, bias=None):
    """a (M, K) @ b (K, N) [+ bias] for strided a, b."""
    triton, mm_kernel, _ = _kernels(_interpreting())
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    bm, bn, bk = _blocks(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    mm_kernel[grid](a, b, c, bias if bias is not None else c, m, n, k,
                    a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                    HAS_BIAS=bias is not None, PRECISION=_precision(a.dtype), WIDEN=_widen(a.dtype),
                    BM=bm, BN=bn, BK=bk)
    return c


def _chain(a, b, c):
    """(a @ b, (a @ b) @ c) for a (M, K), b (K, r), c (r, r); one launch when r is small."""
    triton, _, chain_kernel = _kernels(_interpreting())
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
        PRECISION=_precision(a.dtype), WIDEN=_widen(a.dtype), BM=bm, BK=bk, BR=br)
    return p, q


def lowrank_forward(x, U, S, V, bias):
    a, b = _chain(x, V, S.t())
    return _mm(b, U.t(), bias), a, b


def lowrank_backward(dy, x, a, b, U, S, V, kl_grads, needs):
    need_dx, need_du, need_ds, need_dv, need_db = needs
    g, h = _chain(dy, U, S)
    dx = _mm(h, V.t()) if need_dx else None
    ds = _mm(g.t(), a) if need_ds else None
    du = _mm(dy.t(), a if kl_grads else b) if need_du else None
    dv = _mm(x.t(), g if kl_grads else h) if need_dv else None
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_db else None
    return dx, du, ds, dv, db


register_kernel("lowrank_forward", "triton", lowrank_forward, _unavailable)
register_kernel("lowrank_backward", "triton", lowrank_backward, _unavailable)
