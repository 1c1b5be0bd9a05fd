"""What the compiler makes of the DSD kernel (forward and dX) on Hopper and Ampere,
checked without a GPU: the kernel is compiled to PTX/cubin for sm_90 and sm_80 and
the TTGIR/PTX/ptxas report are read (tests/gpu_compile.py).

On sm_90 the main loop must keep >= 3 shared-memory buffers per operand (the block
index is loaded one step ahead, so it does not cut the pipeline), use wgmma with
tokens as N >= 128, fit in shared memory and spill no registers. Compiling is slow
on a CPU (5-15 s a kernel), so the default run compiles a representative subset
(REPRESENTATIVE: each block size, both products, 128- and 256-token tiles, 4 and
8 warps, the fewest and the most stages); SPARSEKERN_COMPILE_ALL=1 compiles every
shipped config of blocks 64 and 128 for both products.
"""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SM90_BUFFERS = 3
A100_SHARED = 166912
MIN_TOKENS_N = 128


def _forward():
    from sparsekern.kernels.bsr import triton_forward
    return triton_forward


def dsd_signature(dtype):
    """Runtime arguments of ``_dsd_kernel`` as a launch on whole tensors specializes them
    (pointers and the row strides 16-aligned, a unit column stride of the dense operand)."""
    signature = dict(a_ptr=f"*{dtype}", v_ptr=f"*{dtype}", out_ptr=f"*{dtype}", part_ptr="*fp32", bias_ptr=f"*{dtype}",
                     items_ptr="*i32", prefix_ptr="*i32", slices_ptr="*i32", ids_ptr="*i64", gather_ptr="*i64",
                     n_items="i32", per_row="i32", rows_per_round="i32", n_programs="i32", M="i32",
                     stride_am="i32", stride_om="i32", M_BUCKET="i32", D_BUCKET="i32")
    aligned = [name for name, kind in signature.items() if kind.startswith("*")] + ["stride_am", "stride_om"]
    return signature, aligned


def compile_dsd(block, config, arch=90, dtype="bf16", forward=True):
    """Compile the DSD kernel for a square ``block`` as the forward (y = x Wᵀ, with bias)
    or dX (dx = dy W, W read transposed through strides) launch would."""
    import gpu_compile
    signature, aligned = dsd_signature(dtype)
    constexprs = dict(OUT_B=block, IN_B=block, V_STRIDE_OUT=block if forward else 1,
                      V_STRIDE_IN=1 if forward else block,
                      IDENTITY=forward, HAS_BIAS=forward, PRECISION="tf32" if dtype == "fp32" else "ieee",
                      UPCAST=False, stride_ak=1, **config.kwargs)
    return gpu_compile.compile_kernel(_forward()._dsd_kernel, signature, constexprs, arch=arch,
                                      num_warps=config.num_warps, num_stages=config.num_stages, aligned=aligned)


def _shipped(block, elem_size=2):
    forward = _forward()
    return forward.configs_for(block, block, elem_size, forward.SM90_SHARED)


def _key(config):
    return (config.kwargs["BT"], config.kwargs["BO"], config.kwargs["BK"], config.num_warps, config.num_stages)


# (block, (BT, BO, BK, warps, stages), product): a subset of the shipped configs.
REPRESENTATIVE = [
    (64, (128, 64, 64, 4, 3), "forward"),
    (64, (256, 64, 64, 8, 4), "dx"),
    (128, (128, 64, 32, 4, 7), "forward"),
    (128, (128, 128, 64, 8, 4), "dx"),
]


def _cases():
    if os.environ.get("SPARSEKERN_COMPILE_ALL") == "1":
        return [(block, _key(config), product) for block in (64, 128) for config in _shipped(block)
                for product in ("forward", "dx")]
    return REPRESENTATIVE


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    """Compiled (not interpreted) kernels, in a private cache (other processes compile too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_cache")))
        yield compile_dsd


def test_representative_configs_are_shipped():
    for block, key, _ in REPRESENTATIVE:
        assert key in {_key(config) for config in _shipped(block)}, (block, key)


@pytest.mark.parametrize("block", [64, 128])
def test_shipped_configs_span_tiles_stages_and_warps(block):
    forward = _forward()
    configs = [_key(config) for config in _shipped(block)]
    assert {bt for bt, *_ in configs} == {128, 256}
    assert {warps for *_, warps, _ in configs} == {4, 8}
    assert {stages for *_, stages in configs} == set(range(3, 8))
    for bt, bo, bk, warps, stages in configs:
        assert forward.warpgroup_n(bt, bo, warps) >= MIN_TOKENS_N
        assert forward.shared_bytes(bt, bo, bk, stages, 2) <= forward.SM90_SHARED


@pytest.mark.parametrize("block,key,product", _cases(), ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_sm90_main_loop_is_pipelined_on_wgmma_without_spills(compiler, block, key, product):
    import gpu_compile
    import triton
    bt, bo, bk, warps, stages = key
    config = triton.Config(dict(BT=bt, BO=bo, BK=bk), num_warps=warps, num_stages=stages)
    compiled = compiler(block, config, arch=90, forward=product == "forward")
    buffers = gpu_compile.smem_buffers(compiled)
    assert len(buffers) == 2 and min(buffers) >= SM90_BUFFERS, buffers  # both operands multi-buffered
    assert min(buffers) == stages  # the index load costs no stage
    shapes = gpu_compile.wgmma_shapes(compiled)
    assert shapes and all(m == 64 and n >= MIN_TOKENS_N for m, n, _ in shapes), shapes
    assert gpu_compile.spills(compiled) == (0, 0)
    shared = compiled.metadata.shared
    assert shared <= _forward().shared_bytes(bt, bo, bk, stages, 2) <= _forward().SM90_SHARED


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm80(compiler, dtype):
    """sm_80 pipelines with one buffer fewer than num_stages; the prune's estimate for
    it must still bound the shared memory used."""
    import gpu_compile
    forward, size = _forward(), 4 if dtype == "fp32" else 2
    config = forward.configs_for(64, 64, size, A100_SHARED, hopper=False)[0]
    compiled = compiler(64, config, arch=80, dtype=dtype, forward=False)
    assert compiled.asm["cubin"] and gpu_compile.mma_shapes(compiled)
    assert gpu_compile.smem_buffers(compiled) == [config.num_stages - 1] * 2
    assert compiled.metadata.shared <= forward.shared_bytes(*_key(config)[:3], config.num_stages, size, hopper=False)


def test_integer_arguments_equal_to_one_compile(compiler):
    """A launch specializes integer arguments equal to 1 as constexprs (one token, one
    row per round, one item, a unit row stride ...): the kernel must not call tensor
    methods on them."""
    import gpu_compile
    signature, aligned = dsd_signature("bf16")
    ones = ["M", "n_items", "per_row", "rows_per_round", "stride_am", "stride_om"]
    for name in ones:
        signature.pop(name)
    constexprs = dict(OUT_B=64, IN_B=64, V_STRIDE_OUT=64, V_STRIDE_IN=1, IDENTITY=True, HAS_BIAS=True,
                      PRECISION="ieee", UPCAST=False, stride_ak=1, BT=128, BO=64, BK=64, **dict.fromkeys(ones, 1))
    compiled = gpu_compile.compile_kernel(_forward()._dsd_kernel, signature, constexprs, arch=90,
                                          aligned=[name for name in aligned if name in signature])
    assert compiled.asm["cubin"] and gpu_compile.smem_buffers(compiled)
