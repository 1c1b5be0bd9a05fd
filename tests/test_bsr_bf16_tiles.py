"""bf16 block-sparse products on tile steps (csrc/bsr/bf16_products.h) against fp64, on both
engines: AMX tiles (the amx path) and AVX512-BF16 dot products (the avx512 path of a CPU with
AVX512-BF16); blocks of a multiple of 16 that are not whole 32 x 32 tiles run 16-column strips
on each (half-depth AMX tiles, or dot products). The bound is the dense bf16 GEMM's: fp32 accumulation, one rounding on
output, so the error may not exceed torch's bf16 matmul on the same operands (plus one bf16
rounding step). Each engine's tests skip on a CPU that cannot run it."""
import os
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsekern as sk
from fuzz_strategies import bool_tensor, fuzz_settings, seeds
from helpers import (BF16_ENGINES, assert_same_at_thread_counts, on_bf16_engine, on_path, random_bsr, relative_error,
                     stored_blocks, thread_count)
from sparsekern.kernels import microkernel
from sparsekern.kernels.bsr import cpu, reference

pytestmark = pytest.mark.skipif(microkernel.microkernel_isa("bsr") == "unavailable",
                                reason="the block-sparse extension is not built")
BF16_STEP = 2.0 ** -8  # one bf16 rounding, relative

# (out, in), block (rows, cols), density, tokens M, empty block rows
CASES = {
    "b32-M100": ((128, 160), 32, 0.4, 100, ()),
    "b32-M1": ((64, 96), 32, 0.5, 1, ()),
    "b32-M31-empty-row": ((96, 64), 32, 0.5, 31, (1,)),
    "b32-M33": ((64, 64), 32, 1.0, 33, ()),
    "b64-M70": ((128, 192), 64, 0.5, 70, ()),
    "b32x64-M45": ((96, 128), (32, 64), 0.6, 45, ()),
    "b64x32-M64": ((128, 96), (64, 32), 0.6, 64, (0,)),
    # rows of x and dy 4 KiB apart (one L1 set): the dot engine's register blocks of 8 rows
    "b32-M45-rows-in-one-l1-set": ((2048, 2048), 32, 0.05, 45, ()),
    # sides of a multiple of 16, not whole 32 x 32 tiles: 16-column strips, 16 x 16 dW tiles
    "b16-M100": ((128, 160), 16, 0.4, 100, ()),
    "b16-M31-empty-row": ((64, 48), 16, 0.5, 31, (2,)),
    "b48-M70": ((96, 144), 48, 0.5, 70, ()),
    "b16x32-M45": ((96, 128), (16, 32), 0.6, 45, ()),
    "b32x16-M64": ((128, 96), (32, 16), 0.6, 64, (0,)),
    "b16-M45-rows-in-one-l1-set": ((2048, 2048), 16, 0.05, 45, ()),
    # dW's dYᵀ packed 32 columns at a time: 80 output features end on a group of 16
    "b16-N80-M45": ((80, 48), 16, 0.5, 45, ()),
}


@pytest.fixture(params=list(BF16_ENGINES))
def engine(request):
    yield from on_bf16_engine("bsr", request.param)


def _operands(name):
    shape, block, density, m, empty_rows = CASES[name]
    weight = random_bsr(shape, block, density, dtype=torch.bfloat16, seed=11, empty_rows=empty_rows)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(m, shape[1], generator=g).bfloat16()
    dy = torch.randn(m, shape[0], generator=g).bfloat16()
    bias = torch.randn(shape[0], generator=g).bfloat16()
    return weight, x, dy, bias


def _engine_paths():
    """The paths whose bf16 engine this CPU runs."""
    paths = []
    for path, reported in BF16_ENGINES.values():
        if path in microkernel.runnable_isas():
            with on_path("bsr", (path, False)):
                if microkernel.microkernel_isa("bsr") == reported:
                    paths.append(path)
    return paths


def _check_within_the_dense_bf16_bound(weight, x, dy, bias):
    layout, values = weight.layout, weight.values
    w = weight.to_dense()
    dw, db = cpu.bsr_grad_weight(dy, x, layout, True)
    want_dw, want_db = reference.bsr_grad_weight(dy.double(), x.double(), layout, True)
    cases = {  # (ours, fp64 reference, torch's dense bf16 product of the same operands)
        "forward": (cpu.bsr_forward(x, values, layout, bias),
                    reference.bsr_forward(x.double(), values.double(), layout, bias.double()), x @ w.T + bias),
        "grad_input": (cpu.bsr_grad_input(dy, values, layout),
                       reference.bsr_grad_input(dy.double(), values.double(), layout), dy @ w),
        "grad_weight": (dw, want_dw, stored_blocks(dy.T @ x, layout)),
        "bias_grad": (db, want_db, dy.sum(0)),  # summed on the packing of dYᵀ
    }
    _assert_within_the_dense_bf16_bound(cases)


def _assert_within_the_dense_bf16_bound(cases):
    """cases: product -> (ours, fp64 reference, torch's dense bf16 product of the same operands)."""
    for product, (got, want, dense) in cases.items():
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, product
        if want.numel() == 0:
            continue
        bound = relative_error(dense, want)
        err = relative_error(got, want)
        assert err <= bound + BF16_STEP, f"{product}: error {err:.2e}, dense bf16 {bound:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_products_within_the_dense_bf16_bound(engine, name):
    _check_within_the_dense_bf16_bound(*_operands(name))


@pytest.mark.skipif(microkernel.microkernel_isa("bsr") == "unavailable" or not _engine_paths(),
                    reason="no bf16 engine on this CPU")
@fuzz_settings(30)
@given(block=st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([16, 32, 48])),
       grid=st.tuples(st.integers(1, 3), st.integers(1, 3)), tokens=st.integers(0, 70), seed=seeds, data=st.data())
def test_random_masks_within_the_dense_bf16_bound(block, grid, tokens, seed, data):
    """Block shapes of multiples of 16 (whole 32 x 32 tiles or 16-column strips), random masks
    (no block, empty block rows and columns, every block), any token count, on every engine."""
    (br, bc), (rb, cb) = block, grid
    layout = sk.BlockLayout.from_block_mask(bool_tensor(data.draw, grid), (rb * br, cb * bc), (br, bc))
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rb * br, cb * bc, generator=g).bfloat16()
    weight = sk.BlockSparseMatrix.from_dense(dense, (br, bc), block_mask=layout.block_mask)
    x = torch.randn(tokens, cb * bc, generator=g).bfloat16()
    dy = torch.randn(tokens, rb * br, generator=g).bfloat16()
    bias = torch.randn(rb * br, generator=g).bfloat16()
    for path in _engine_paths():
        with on_path("bsr", (path, False)):
            _check_within_the_dense_bf16_bound(weight, x, dy, bias)


def _products(weight, x, dy, bias):
    layout, values = weight.layout, weight.values
    return [cpu.bsr_forward(x, values, layout, bias), cpu.bsr_grad_input(dy, values, layout),
            cpu.bsr_grad_weight(dy, x, layout)[0]]


@pytest.mark.parametrize("name", ["b32-M100", "b64x32-M64", "b16-M100", "b32x16-M64"])
def test_same_as_the_fp32_accumulating_avx2_path(engine, name):
    """Both sum in fp32 and round once: they differ by at most one bf16 step per element."""
    operands = _operands(name)
    tiles = _products(*operands)
    with on_path("bsr", ("avx2", False)):
        widened = _products(*operands)
    for a, b in zip(tiles, widened):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * BF16_STEP, atol=1e-2)


@pytest.mark.parametrize("name, rows", [("b32-M31-empty-row", slice(32, 64)), ("b16-M31-empty-row", slice(32, 48))])
def test_empty_block_rows_give_the_bias(engine, name, rows):
    weight, x, _, bias = _operands(name)
    y = cpu.bsr_forward(x, weight.values, weight.layout, bias)
    width = rows.stop - rows.start
    torch.testing.assert_close(y[:, rows], bias[rows].expand(x.shape[0], width), rtol=0, atol=0)


@pytest.mark.parametrize("m", [0, 1])
@pytest.mark.parametrize("block", [32, 16])
def test_degenerate_token_counts(engine, m, block):
    weight = random_bsr((64, 96), block, 0.5, dtype=torch.bfloat16)
    x, dy = torch.randn(m, 96).bfloat16(), torch.randn(m, 64).bfloat16()
    assert cpu.bsr_forward(x, weight.values, weight.layout).shape == (m, 64)
    assert cpu.bsr_grad_input(dy, weight.values, weight.layout).shape == (m, 96)
    dw = cpu.bsr_grad_weight(dy, x, weight.layout)[0]
    torch.testing.assert_close(dw.float(), reference.bsr_grad_weight(dy.float(), x.float(), weight.layout)[0],
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["b32-M100", "b16-M100"])
def test_results_do_not_depend_on_thread_count(engine, threads, name):
    weight, x, dy, bias = _operands(name)
    assert_same_at_thread_counts(lambda: [cpu.bsr_forward(x, weight.values, weight.layout, bias),
                                          cpu.bsr_grad_input(dy, weight.values, weight.layout),
                                          cpu.bsr_grad_weight(dy, x, weight.layout)[0]], threads)


@pytest.mark.parametrize("block", [32, 16])
def test_sparse_linear_trains_in_bf16_on_tiles(engine, block):
    torch.manual_seed(0)
    layer = sk.SparseLinear(96, 64, block_size=block, density=0.5, dtype=torch.bfloat16)
    x = torch.randn(40, 96, dtype=torch.bfloat16, requires_grad=True)
    with sk.use_backend("cpu"):
        y = layer(x)
        y.float().square().sum().backward()
    ref = sk.SparseLinear(96, 64, block_size=block, density=0.5, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    yr.square().sum().backward()
    assert relative_error(y, yr) < 1e-2
    assert relative_error(x.grad, xr.grad) < 2e-2
    assert relative_error(layer.values.grad, ref.values.grad) < 2e-2


@pytest.mark.parametrize("mib", [4, 16])
@pytest.mark.parametrize("block", [32, 16])
def test_large_outputs_are_streamed_exactly(engine, block, mib):
    """y and dx of >= 4 MiB (AMX) or 16 MiB (dot products): 32-column tiles stream whole lines
    with non-temporal stores, two threads fencing theirs, 16-column ones store their half lines
    plainly; the same bound against fp64 as every other output."""
    m = (mib << 20) // (2048 * 2) + 3
    g = torch.Generator().manual_seed(7)
    weight = random_bsr((2048, 64), block, 0.5, dtype=torch.bfloat16, seed=8)  # y: m x 2048
    weight_t = random_bsr((64, 2048), block, 0.5, dtype=torch.bfloat16, seed=9)  # dx: m x 2048
    x, dy = torch.randn(m, 64, generator=g).bfloat16(), torch.randn(m, 64, generator=g).bfloat16()
    bias = torch.randn(2048, generator=g).bfloat16()
    with thread_count(2):
        y = cpu.bsr_forward(x, weight.values, weight.layout, bias)
        dx = cpu.bsr_grad_input(dy, weight_t.values, weight_t.layout)
    cases = {"forward": (y, reference.bsr_forward(x.double(), weight.values.double(), weight.layout, bias.double()),
                         x @ weight.to_dense().T + bias),
             "grad_input": (dx, reference.bsr_grad_input(dy.double(), weight_t.values.double(), weight_t.layout),
                            dy @ weight_t.to_dense())}
    assert y.shape == dx.shape == (m, 2048)
    _assert_within_the_dense_bf16_bound(cases)


@pytest.mark.parametrize("block", [32, 16])
def test_grad_weight_over_several_token_chunks(engine, block):
    """dW sums tokens in chunks of 16 MB of packed X: 131072 columns make 64-token chunks, so
    100 tokens take two, the second accumulating onto the first's fp32 tiles."""
    weight = random_bsr((64, 131072), block, 0.01, dtype=torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 131072, generator=g).bfloat16()
    dy = torch.randn(100, 64, generator=g).bfloat16()
    got = cpu.bsr_grad_weight(dy, x, weight.layout)[0]
    want = reference.bsr_grad_weight(dy.double(), x.double(), weight.layout)[0]
    dense = stored_blocks(dy.T @ x, weight.layout)
    assert relative_error(got, want) <= relative_error(dense, want) + BF16_STEP


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_grad_weight_runs_on_every_thread(engine):
    """The sampled dW splits its tiles over the threads by their multiply-adds: weighted one
    per tile, the total fell under the per-thread minimum and dW ran on one thread at half
    the forward's speed. Two busy threads show as process CPU time near twice the wall time
    (one thread with the other spinning after the packing regions: 1.1-1.5); best of 3 tries,
    so a descheduled thread on a loaded machine does not fail the test."""
    weight = random_bsr((2048, 2048), 32, 0.5, dtype=torch.bfloat16, seed=1)
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(2048, 2048, generator=g).bfloat16(), torch.randn(2048, 2048, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu.bsr_grad_weight(dy, x, weight.layout)[0]
        ratios = []
        for _ in range(3):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for _ in range(3):
                cpu.bsr_grad_weight(dy, x, weight.layout)[0]
            ratios.append((time.process_time() - cpu_start) / (time.perf_counter() - wall_start))
            if ratios[-1] > 1.75:
                break
    finally:
        torch.set_num_threads(threads)
    assert max(ratios) > 1.75, f"CPU time / wall time {ratios}: dW did not run on both threads"


@pytest.mark.parametrize("path, portable", [("amx", False), ("avx512", False), ("avx512", True), ("avx2", False),
                                            ("portable", False)])
def test_bf16_engine_names_what_computes_each_block_shape(path, portable):
    """cpu.bf16_engine (what the benchmarks and `sparsekern info` report) follows the dispatch:
    whole 32 x 32 tiles on the path's tile engine, other multiples of 16 on its 16-column
    strips, the rest widened."""
    if path not in microkernel.runnable_isas():
        pytest.skip(f"the {path} path does not run on this CPU")
    with on_path("bsr", (path, portable)):
        isa = microkernel.microkernel_isa("bsr")
        tiles = {"avx512f+amx": "amx tiles", "avx512f+avx512_bf16": "dot-product tiles"}.get(isa, "widened to fp32")
        strips = {"avx512f+amx": "amx strips", "avx512f+avx512_bf16": "dot-product strips"}.get(isa, "widened to fp32")
        assert [cpu.bf16_engine(b) for b in (32, 64, (32, 64))] == [tiles] * 3
        assert [cpu.bf16_engine(b) for b in (16, 48, (16, 32), (32, 16))] == [strips] * 4
        assert [cpu.bf16_engine(b) for b in (8, (32, 8), 24, 1)] == ["widened to fp32"] * 4
