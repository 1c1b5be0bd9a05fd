"""What the compiler makes of the weight-gradient kernels on Hopper and Ampere, checked
without a GPU: the SDD kernel (sampled dW, kernels/bsr/triton_grad.py) and the
low-rank kernels (kernels/lowrank/triton_lowrank.py: the split-K token reduction of
the weight gradients, the GEMM and the fused chain) compiled for sm_90 and sm_80
through tests/gpu_compile.py, at the shipped configs as the autotuner's prune
leaves them.

Every compiled config must spill no registers; on sm_90 the dots must be wgmma and
the main loop multi-buffered in shared memory, on sm_80 mma.sync. The instruction
shapes are printed (``pytest -s``). In the TTIR, no index may be multiplied by a
stride or element count in 32 bits. Compiling is slow on a CPU (1-8 s a kernel), so
the default run compiles the widest and the narrowest config of each case;
SPARSEKERN_COMPILE_ALL=1 compiles every shipped config.
"""
import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ALL = os.environ.get("SPARSEKERN_COMPILE_ALL") == "1"
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _Arg:
    """What the autotuner's prune reads of a tensor argument."""
    def __init__(self, dtype):
        self.dtype = _TORCH_DTYPES[dtype]

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.fixture(scope="module")
def compiled_mode(tmp_path_factory):
    """Compiled (not interpreted) kernels, in a private cache (other processes compile too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_cache")))
        yield


def _chosen(configs):
    return configs if ALL else [configs[0], configs[-1]]


def _describe(config):
    return f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"


def _check(compiled, arch, what, pipelined=2):
    """Assert no spills, and on sm_90 wgmma with ``pipelined`` operand tiles multi-buffered
    in shared memory, on sm_80 mma.sync; print the instruction shapes."""
    import gpu_compile
    spills = gpu_compile.spills(compiled)
    wgmma, mma = gpu_compile.wgmma_shapes(compiled), gpu_compile.mma_shapes(compiled)
    print(f"sm_{arch} {what}: wgmma {sorted(wgmma)} mma {sorted(mma)} spills {spills} "
          f"registers {gpu_compile.registers(compiled)} shared {compiled.metadata.shared}")
    assert spills == (0, 0), what
    if arch >= 90:
        assert wgmma and not mma, what
        buffers = gpu_compile.smem_buffers(compiled)
        assert len(buffers) == pipelined and min(buffers) >= 2, (what, buffers)
    else:
        assert mma and not wgmma, what
    return wgmma or mma


# ---- SDD ---------------------------------------------------------------------------

def _grad():
    from sparsekern.kernels.bsr import triton_grad
    return triton_grad


def sdd_configs(block, dtype, fill=16):
    """The shipped SDD configs for a square ``block`` as the prune leaves them."""
    grad = _grad()
    kernel = grad._kernel(False)
    return grad._prune(kernel.configs, dict(dy_ptr=_Arg(dtype), FILL=fill), BR=block, BC=block)


def compile_sdd(block, config, arch, dtype):
    """Compile the SDD kernel as a launch on whole tensors specializes it (pointers and
    row strides 16-aligned)."""
    import gpu_compile
    signature = dict(dy_ptr=f"*{dtype}", x_ptr=f"*{dtype}", out_ptr=f"*{dtype}", rows_ptr="*i64", cols_ptr="*i64",
                     items_ptr="*i32", nnz="i32", M="i32", stride_dy="i32", stride_x="i32", m_per_split="i32",
                     M_BUCKET="i32", FILL="i32")
    aligned = [name for name, kind in signature.items() if kind.startswith("*")] + ["stride_dy", "stride_x"]
    constexprs = dict(BR=block, BC=block, PRECISION="tf32" if dtype == "fp32" else "ieee", UPCAST=False,
                      **config.kwargs)
    return gpu_compile.compile_kernel(_grad()._sdd_kernel, signature, constexprs, arch=arch,
                                      num_warps=config.num_warps, num_stages=config.num_stages, aligned=aligned)


SDD_CASES = [(block, dtype) for block in (16, 32, 64, 128) for dtype in ("bf16", "fp32")] + [(64, "fp16")]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("block,dtype", SDD_CASES, ids=lambda v: str(v))
def test_sdd_configs_compile_without_spills(compiled_mode, block, dtype, arch):
    configs = sdd_configs(block, dtype)
    assert max(c.kwargs["GROUP"] * c.kwargs["TC"] for c in configs) == 256  # a gathered wide tile is shipped
    for config in _chosen(configs):
        shapes = _check(compile_sdd(block, config, arch, dtype), arch, f"SDD {dtype} block {block} {_describe(config)}")
        if arch >= 90:
            # The gathered columns are the wgmma's M side; N is the block-row tile.
            assert all(m == 64 and n == config.kwargs["TR"] for m, n, _ in shapes), shapes


# ---- low rank ----------------------------------------------------------------------

def _lowrank():
    from sparsekern.kernels.lowrank import triton_lowrank
    return triton_lowrank


def reduction_configs(p, r, dtype):
    lowrank = _lowrank()
    kernel = lowrank._kernels(False)[3]
    return lowrank._prune_reduction(kernel.configs, dict(a_ptr=_Arg(dtype)), P=p, R=r)


def _specialized(values):
    """The integer arguments a launch marks as multiples of 16 (triton specializes them)."""
    return [name for name, value in values.items() if value % 16 == 0]


def compile_reduction(p, r, config, arch, dtype, m=65536):
    """Compile the token reduction as ``_token_reduction`` launches it on contiguous
    a (m, p) and b (m, r)."""
    import gpu_compile
    values = dict(M=m, P=p, R=r, sam=p, sbm=r, scs=p * r, scp=r, m_per_split=512, M_BUCKET=m)
    signature = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}", **{n: "i32" for n in values})
    aligned = ["a_ptr", "b_ptr", "c_ptr", *_specialized(values)]
    constexprs = dict(PRECISION="tf32" if dtype == "fp32" else "ieee", WIDEN=False, **config.kwargs)
    return gpu_compile.compile_kernel(_lowrank()._kernels(False)[3].fn, signature, constexprs, arch=arch,
                                      num_warps=config.num_warps, num_stages=config.num_stages, aligned=aligned)


# (P, R): dS (r x r), dU / dV (features x r) at ranks 16, 17 (padded to 32), 64 and 128.
REDUCTION_CASES = [(16, 16), (4096, 17), (4096, 64), (4096, 128)]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("p,r", REDUCTION_CASES, ids=lambda v: str(v))
def test_lowrank_reduction_configs_compile_without_spills(compiled_mode, p, r, dtype, arch):
    import gpu_compile
    # A 16-bit operand with odd rows cannot be copied in pieces of >= 4 bytes, so its
    # tile is not pipelined (cp.async); the other one still is.
    pipelined = 1 if dtype != "fp32" and r % 2 else 2
    for config in _chosen(reduction_configs(p, r, dtype)):
        what = f"token reduction {dtype} P={p} R={r} {_describe(config)}"
        compiled = compile_reduction(p, r, config, arch, dtype)
        if arch >= 90 and config.kwargs["BP"] < 64:  # no wgmma shape below 64 rows: mma.sync
            assert gpu_compile.spills(compiled) == (0, 0) and gpu_compile.mma_shapes(compiled), what
            print(f"sm_{arch} {what}: mma {sorted(gpu_compile.mma_shapes(compiled))}")
            continue
        shapes = _check(compiled, arch, what, pipelined)
        if arch >= 90:
            assert all(n == config.kwargs["BR"] for _, n, _ in shapes), shapes


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lowrank_products_compile_without_spills(compiled_mode, dtype, arch):
    """The GEMM (y = b Uᵀ: 8192 tokens, 4096 features, rank 64) and the chain (rank 128)
    at the tiles and warps their launchers pick on a GPU, unit strides specialized."""
    import gpu_compile
    lowrank = _lowrank()
    _, mm, chain, _ = lowrank._kernels(False)
    common = dict(PRECISION="tf32" if dtype == "fp32" else "ieee", WIDEN=False)
    values = dict(M=8192, N=4096, K=64, sam=64, sbn=64, scm=4096)
    signature = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}", bias_ptr=f"*{dtype}",
                     **{n: "i32" for n in values})
    compiled = gpu_compile.compile_kernel(
        mm, signature, dict(HAS_BIAS=True, BM=128, BN=128, BK=32, sak=1, sbk=1, scn=1, **common), arch=arch,
        num_warps=lowrank._warps(128 * 128), aligned=["a_ptr", "b_ptr", "c_ptr", "bias_ptr", *_specialized(values)])
    _check(compiled, arch, f"mm {dtype} 128 x 128 x 32")
    values = dict(M=8192, K=4096, R=128, sam=4096, sbk=128, scs=128, spm=128, sqm=128)
    signature = {**{f"{n}_ptr": f"*{dtype}" for n in "abcpq"}, **{n: "i32" for n in values}}
    compiled = gpu_compile.compile_kernel(
        chain, signature, dict(BM=64, BK=32, BR=128, sak=1, sbr=1, scr=1, spr=1, sqr=1, **common), arch=arch,
        num_warps=lowrank._warps(2 * 64 * 128), aligned=[f"{n}_ptr" for n in "abcpq"] + _specialized(values))
    _check(compiled, arch, f"chain {dtype} 64 x 32, rank 128")


# ---- 64-bit offsets --------------------------------------------------------------

def _compile_all_strides(kernel):
    """One config of ``kernel`` for sm_90 with every stride a runtime argument, and the
    stride/size arguments whose products with indices must be 64-bit."""
    import gpu_compile
    if kernel == "sdd":
        config = sdd_configs(64, "bf16")[0]
        return compile_sdd(64, config, 90, "bf16"), ["stride_dy", "stride_x", "nnz"]
    if kernel == "reduction":
        config = reduction_configs(4096, 64, "bf16")[0]
        return compile_reduction(4096, 64, config, 90, "bf16"), ["sam", "sbm", "scs", "scp"]
    _, mm, chain, _ = _lowrank()._kernels(False)
    common = dict(PRECISION="ieee", WIDEN=False)
    if kernel == "mm":
        strides = ["sam", "sak", "sbk", "sbn", "scm", "scn"]
        signature = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", bias_ptr="*bf16",
                         **{n: "i32" for n in ["M", "N", "K", *strides]})
        constexprs = dict(HAS_BIAS=True, BM=128, BN=128, BK=32, **common)
        return gpu_compile.compile_kernel(mm, signature, constexprs, num_warps=8), strides
    strides = ["sam", "sak", "sbk", "sbr", "scr", "scs", "spm", "spr", "sqm", "sqr"]
    signature = {**{f"{n}_ptr": "*bf16" for n in "abcpq"}, **{n: "i32" for n in ["M", "K", "R", *strides]}}
    return gpu_compile.compile_kernel(chain, signature, dict(BM=64, BK=32, BR=64, **common)), strides


@pytest.mark.parametrize("kernel", ["sdd", "reduction", "mm", "chain"])
def test_offsets_are_computed_in_64_bits(compiled_mode, kernel):
    """No product of an index (program id, loop counter, arange) and a stride or element
    count is computed in 32 bits: tensors past 2**31 elements would wrap around."""
    import gpu_compile
    compiled, sizes = _compile_all_strides(kernel)
    assert gpu_compile.narrow_index_products(compiled, sizes) == []


def test_narrow_offset_check_flags_a_32_bit_product(compiled_mode):
    import gpu_compile
    import triton.language as tl

    def wrapping(a_ptr, M, stride, BK):
        for m0 in range(0, M, BK):
            rows = m0 + tl.arange(0, BK)
            tl.store(a_ptr + rows * stride, tl.load(a_ptr + rows))

    compiled = gpu_compile.compile_kernel(wrapping, dict(a_ptr="*fp32", M="i32", stride="i32"), dict(BK=16))
    assert any("arith.muli" in line for line in gpu_compile.narrow_index_products(compiled, ["stride"]))
