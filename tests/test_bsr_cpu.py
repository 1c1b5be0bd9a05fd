"""The C++ ``cpu`` backend of the block-sparse products (csrc/bsr/) against the
reference kernels and the dense masked computation, on both microkernels
(AVX2/FMA where the CPU has it, and the portable one)."""
import pytest
import torch

import sparsekern as sk
from helpers import (TOLERANCES, assert_same_at_thread_counts, microkernel_paths, on_path, random_bsr, stored_blocks,
                     thread_count)
from sparsekern.cli.machine import l1_data_cache
from sparsekern.kernels import microkernel
from sparsekern.kernels.bsr import cpu, dense, reference

CPU = torch.device("cpu")
_REASON = cpu.unavailable(CPU, torch.float32)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend not built: {_REASON}")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
PRODUCTS = ("bsr_forward", "bsr_grad_input", "bsr_grad_weight")


@pytest.fixture(params=microkernel_paths() if _REASON is None else [None])
def isa(request):
    """Run a test on every microkernel path this CPU can check (tests/helpers.py)."""
    with on_path("bsr", request.param) as path:
        yield path


def _layout_from_rows(grid, cols_per_row):
    mask = torch.zeros(grid, dtype=torch.bool)
    for r, cols in enumerate(cols_per_row):
        mask[r, list(cols)] = True
    return mask


def _power_law_mask(grid):
    """Block row 0 full, row 1 one block, the others empty or nearly: DST's power-law rows."""
    rows = [range(grid[1]), [3], [], [0, grid[1] - 1]] + [[] for _ in range(grid[0] - 4)]
    return _layout_from_rows(grid, rows)


# name: (shape (out, in), block, density or explicit block mask builder, tokens M)
STRUCTURES = {
    "sq16-uneven-M": ((64, 96), 16, 0.5, 37),
    "sq32": ((128, 160), 32, 0.3, 50),
    "sq64-dense": ((128, 192), 64, 1.0, 13),
    "rect16x8": ((48, 80), (16, 8), 0.6, 5),
    "rect8x24": ((40, 72), (8, 24), 0.4, 19),
    "rect5x3": ((35, 33), (5, 3), 0.5, 7),
    "rect24x40": ((72, 120), (24, 40), 0.5, 11),
    "density0": ((32, 48), 16, 0.0, 9),
    "single-block": ((32, 32), 32, 1.0, 1),
    "power-law-rows": ((8 * 16, 12 * 16), 16, _power_law_mask, 23),
    "huge-block-count": ((256, 256), (2, 2), 0.5, 6),  # 8192 stored blocks
    # rows of x and dy 4 KiB apart in fp32 (one L1 set): tiles of fewer rows on AVX-512
    "rows-in-one-l1-set": ((1024, 1024), 16, 0.1, 29),
}


def _weight(name, dtype):
    shape, block, density, m = STRUCTURES[name]
    if callable(density):
        bs = (block, block) if isinstance(block, int) else block
        mask = density((shape[0] // bs[0], shape[1] // bs[1]))
        dense = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        return sk.BlockSparseMatrix.from_dense(dense, block, block_mask=mask), m
    return random_bsr(shape, block, density, dtype=dtype, seed=5), m


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_kernels_match_reference(isa, name, dtype):
    weight, m = _weight(name, dtype)
    layout, (n, k) = weight.layout, weight.shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    args = {"bsr_forward": (x, weight.values, layout), "bsr_grad_input": (dy, weight.values, layout),
            "bsr_grad_weight": (dy, x, layout, True)}  # with the bias gradient summed on dW's pass
    for product in PRODUCTS:
        got = getattr(cpu, product)(*args[product])
        want = getattr(reference, product)(*(a.double() if torch.is_tensor(a) else a for a in args[product]))
        for got_one, want_one in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want)), strict=True):
            assert got_one.dtype == dtype and got_one.shape == want_one.shape, product
            torch.testing.assert_close(got_one.double(), want_one, **TOLERANCES[dtype],
                                       msg=lambda s: f"{product}: {s}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", ["mixed", "empty rows"])
def test_forward_adds_the_bias_in_registers(isa, name, dtype):
    mask = {"mixed": _layout_from_rows((4, 5), [[0, 2, 4], [1], [0, 1, 2, 3, 4], [3]]),
            "empty rows": _layout_from_rows((4, 5), [[1, 3], [], [1], []])}[name]
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(40, 50, dtype=torch.float64).to(dtype), 10, block_mask=mask)
    x, bias = torch.randn(13, 50, dtype=torch.float64).to(dtype), torch.randn(40, dtype=torch.float64).to(dtype)
    got = cpu.bsr_forward(x, weight.values, weight.layout, bias)
    want = reference.bsr_forward(x.double(), weight.values.double(), weight.layout, bias.double())
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    with pytest.raises(RuntimeError, match="bias has 39 entries, expected 40"):
        cpu.bsr_forward(x, weight.values, weight.layout, bias[:39].contiguous())


def test_empty_block_rows_and_columns_give_zero_outputs(isa):
    mask = _layout_from_rows((4, 5), [[1, 3], [], [1], []])  # block rows 1, 3 and columns 0, 2, 4 empty
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(32, 40), 8, block_mask=mask)
    x, dy = torch.randn(10, 40), torch.randn(10, 32)
    y = cpu.bsr_forward(x, weight.values, weight.layout).view(10, 4, 8)
    dx = cpu.bsr_grad_input(dy, weight.values, weight.layout).view(10, 5, 8)
    assert (y[:, [1, 3]] == 0).all() and (dx[:, [0, 2, 4]] == 0).all()
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()


def test_unstored_blocks_are_absent_not_zero(isa):
    """A non-finite input reaches only outputs a stored block connects it to (docs/design.md),
    as in the reference; the dense composite (explicit zeros) spreads it over the whole row."""
    mask = _layout_from_rows((2, 2), [[0], [1]])  # block row 0 reads input block 0 only
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(16, 16), 8, block_mask=mask)
    x = torch.randn(3, 16)
    x[:, 8] = float("nan")  # input block 1
    y = cpu.bsr_forward(x, weight.values, weight.layout)
    assert torch.isfinite(y[:, :8]).all() and torch.isnan(y[:, 8:]).all()
    torch.testing.assert_close(reference.bsr_forward(x, weight.values, weight.layout), y, equal_nan=True)
    assert torch.isnan(dense.bsr_forward(x, weight.values, weight.layout)).all()


@pytest.mark.parametrize("shape, block", [((2048, 64), 32), ((2056, 64), 8)], ids=["rows-aligned", "rows-unaligned"])
def test_large_outputs_are_streamed_exactly(isa, shape, block):
    # y and dx of >= 16 MiB are written with non-temporal stores where every row starts on a
    # vector boundary (2048 columns), with plain ones where not (2056); two threads fence theirs.
    weight = random_bsr(shape, block, 0.5, dtype=torch.float32, seed=2)
    m = (16 << 20) // (shape[0] * 4) + 3
    g = torch.Generator().manual_seed(4)
    x, bias = torch.randn(m, shape[1], generator=g), torch.randn(shape[0], generator=g)
    weight_t = random_bsr(shape[::-1], block, 0.5, dtype=torch.float32, seed=6)  # dx of width shape[0]
    dy = torch.randn(m, shape[1], generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu.bsr_forward(x, weight.values, weight.layout, bias)
        dx = cpu.bsr_grad_input(dy, weight_t.values, weight_t.layout)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, reference.bsr_forward(x, weight.values, weight.layout, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, reference.bsr_grad_input(dy, weight_t.values, weight_t.layout), rtol=1e-5,
                               atol=1e-4)


def test_tiles_hold_no_more_rows_of_one_l1_set_than_it_has_ways(isa):
    cache = l1_data_cache()
    if cache is None:
        pytest.skip("no L1 data cache geometry in sysfs")
    ways, span = cache["ways"], cache["sets"] * cache["line"]
    rows = 12 if microkernel.microkernel_isa("bsr").startswith(("avx512", "portable-wide")) else 6
    assert microkernel.tile_rows("bsr", 4 * 64) == rows  # consecutive rows: few shared sets
    assert microkernel.tile_rows("bsr", span + 64) == rows  # every row in a set of its own
    assert microkernel.tile_rows("bsr", span) == min(rows, ways)  # every row in one set
    assert microkernel.tile_rows("bsr", 4 * span) == min(rows, ways)


@pytest.mark.parametrize("m", [0, 1])
def test_degenerate_token_counts(isa, m):
    weight = random_bsr((32, 48), 16, 0.5, dtype=torch.float32)
    x, dy = torch.randn(m, 48), torch.randn(m, 32)
    assert cpu.bsr_forward(x, weight.values, weight.layout).shape == (m, 32)
    assert cpu.bsr_grad_input(dy, weight.values, weight.layout).shape == (m, 48)
    dw, db = cpu.bsr_grad_weight(dy, x, weight.layout, True)
    torch.testing.assert_close(dw, reference.bsr_grad_weight(dy, x, weight.layout)[0])
    torch.testing.assert_close(db, torch.zeros(32) if m == 0 else dy[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bias_gradient_counts_every_row_once(isa, threads, dtype):
    """dW's threads sum the bias gradient each over their own block rows: the rows before,
    between and after the stored blocks, and a block row whose blocks two threads share."""
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[3] = True  # six of the seven blocks: split between the threads
    mask[5, 1] = True
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(128, 96, dtype=torch.float64).to(dtype), 16, block_mask=mask)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 96, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(500, 128, generator=g, dtype=torch.float64).to(dtype)
    with thread_count(threads):
        dw, db = cpu.bsr_grad_weight(dy, x, weight.layout, True)
    want_dw, want_db = reference.bsr_grad_weight(dy.double(), x.double(), weight.layout, True)
    torch.testing.assert_close(db.double(), want_db, **TOLERANCES[dtype])
    torch.testing.assert_close(dw.double(), want_dw, **TOLERANCES[dtype])


# fp32 and fp64 forward and dX of at least 4 x 24 tokens on the AVX-512 geometry run 24-row
# tiles on a packed A (common/packed_rows_product.h): its SIMD loops on the avx512 and amx paths,
# its portable loops at that geometry; the in-place tiles elsewhere (m = 95 below).
PACKED_ROWS = {  # name: (shape (out, in), block, density or mask builder, dtype)
    "block16": ((96, 128), 16, 0.5, torch.float32),
    "block32": ((128, 160), 32, 0.4, torch.float32),
    "rect16x32": ((64, 128), (16, 32), 0.5, torch.float32),
    "rect32x16": ((128, 64), (32, 16), 0.5, torch.float32),
    "rect8x24-cols-past-16": ((40, 72), (8, 24), 0.5, torch.float32),
    "fp64-block8": ((48, 40), 8, 0.6, torch.float64),
    "fp64-block16": ((64, 48), 16, 0.5, torch.float64),
    "power-law-rows": ((8 * 16, 12 * 16), 16, _power_law_mask, torch.float32),  # empty block rows and columns
    "rect48x16": ((96, 64), (48, 16), 0.5, torch.float32),  # dW: two 24-row tiles of a narrow strip
}


@pytest.fixture(params=microkernel_paths() + [pytest.param(("avx512", True), id="avx512-tiles-portable-loops")]
                if _REASON is None else [None])
def wide_path(request):
    """Every path this CPU runs natively, and the AVX-512 geometry on the portable loops."""
    with on_path("bsr", request.param) as path:
        yield path


@pytest.mark.parametrize("m", [95, 96, 100, 217])
@pytest.mark.parametrize("name", list(PACKED_ROWS))
def test_packed_rows_products_match_reference(wide_path, name, m):
    """The forward and dX on packed rows (from 96 tokens), and dW, whose narrow strips run tiles
    of up to 24 rows on the AVX-512 geometry."""
    shape, block, density, dtype = PACKED_ROWS[name]
    if callable(density):
        mask = density((shape[0] // block, shape[1] // block))
        dense = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        weight = sk.BlockSparseMatrix.from_dense(dense, block, block_mask=mask)
    else:
        weight = random_bsr(shape, block, density, dtype=dtype, seed=7)
    g = torch.Generator().manual_seed(m)
    x, dy = torch.randn(m, shape[1], generator=g, dtype=dtype), torch.randn(m, shape[0], generator=g, dtype=dtype)
    bias = torch.randn(shape[0], generator=g, dtype=dtype)
    torch.testing.assert_close(cpu.bsr_forward(x, weight.values, weight.layout, bias),
                               reference.bsr_forward(x, weight.values, weight.layout, bias), **TOLERANCES[dtype])
    torch.testing.assert_close(cpu.bsr_grad_input(dy, weight.values, weight.layout),
                               reference.bsr_grad_input(dy, weight.values, weight.layout), **TOLERANCES[dtype])
    torch.testing.assert_close(cpu.bsr_grad_weight(dy, x, weight.layout)[0],
                               reference.bsr_grad_weight(dy, x, weight.layout)[0], **TOLERANCES[dtype])


def test_packed_rows_products_do_not_depend_on_thread_count(wide_path):
    weight = random_bsr((256, 512), 16, 0.3, dtype=torch.float32, seed=8)
    g = torch.Generator().manual_seed(9)
    x, dy = torch.randn(1000, 512, generator=g), torch.randn(1000, 256, generator=g)
    assert_same_at_thread_counts(lambda: (cpu.bsr_forward(x, weight.values, weight.layout),
                                          cpu.bsr_grad_input(dy, weight.values, weight.layout)), 2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_thread_count(threads):
    weight, _ = _weight("power-law-rows", torch.float64)
    m = 400  # enough work for the kernels to use every thread and split the heavy block row
    x, dy = torch.randn(m, weight.shape[1], dtype=torch.float64), torch.randn(m, weight.shape[0], dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = [cpu.bsr_forward(x, weight.values, weight.layout), cpu.bsr_grad_input(dy, weight.values, weight.layout),
               cpu.bsr_grad_weight(dy, x, weight.layout)[0]]
    finally:
        torch.set_num_threads(before)
    want = [reference.bsr_forward(x, weight.values, weight.layout),
            reference.bsr_grad_input(dy, weight.values, weight.layout), reference.bsr_grad_weight(dy, x, weight.layout)[0]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


def _dense_masked(x, weight, bias, dy):
    x = x.detach().double().requires_grad_()
    w = weight.to_dense().detach().double().requires_grad_()
    y = x @ w.T + bias.detach().double()
    y.backward(dy.double())
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("lead", [(9,), (2, 3, 5)], ids=["M9", "batch2x3x5"])
def test_op_with_cpu_backend_matches_dense_masked(dtype, lead):
    weight = random_bsr((48, 80), (16, 8), 0.5, dtype=dtype, seed=2, empty_rows=(1,), empty_cols=(0, 4))
    weight.values.requires_grad_()
    probe = sk.BlockSparseMatrix.from_dense(torch.zeros(weight.shape, dtype=dtype), weight.block_size,
                                            block_mask=torch.ones(weight.layout.grid, dtype=torch.bool))
    probe.values.requires_grad_()
    g = torch.Generator().manual_seed(3)
    # Non-contiguous x: a transposed view; bsr_linear makes it contiguous once.
    x = torch.randn(80, *lead, generator=g, dtype=torch.float64).to(dtype).movedim(0, -1).requires_grad_()
    bias = torch.randn(48, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(*lead, 48, generator=g, dtype=torch.float64).to(dtype)
    assert not x.is_contiguous()
    with sk.use_backend("cpu"):
        y = sk.ops.bsr_linear(x, weight, bias, grad_probe=probe)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = _dense_masked(x.reshape(-1, 80), weight, bias, dy.reshape(-1, 48))
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.reshape(-1, 48).double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.reshape(-1, 80).double(), dx_ref, **tol)
    torch.testing.assert_close(weight.values.grad.double(), stored_blocks(dw_ref, weight.layout), **tol)
    torch.testing.assert_close(probe.values.grad.double(), stored_blocks(dw_ref, probe.layout), **tol)


def test_sparse_linear_uses_cpu_backend_by_default():
    assert sk.kernels.select_kernel("bsr_forward", CPU, torch.float32)[0] == "cpu"
    layer = sk.SparseLinear(50, 70, block_size=16, density=0.5)
    x = torch.randn(4, 50)
    results = []
    for backend in (None, "reference"):  # None: automatic selection
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with sk.use_backend(backend):
            y = layer(xg)
        y.backward(torch.ones_like(y))
        results.append((y, xg.grad, layer.values.grad))
    for auto, ref in zip(*results):
        torch.testing.assert_close(auto, ref)


def test_gradcheck_fp64_cpu_backend():
    weight = random_bsr((24, 40), (8, 5), 0.5, seed=4)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    values = weight.values.clone().requires_grad_()

    def f(x, values, bias):
        return sk.ops.bsr_linear(x, sk.BlockSparseMatrix(values, weight.layout), bias)

    with sk.use_backend("cpu"):
        assert torch.autograd.gradcheck(f, (x, values, bias))


def test_bad_layout_is_rejected_by_the_extension():
    weight = random_bsr((32, 32), 16, 1.0, dtype=torch.float32)
    bad_cols = weight.layout.col_indices.clone()
    bad_cols[0] = 7
    with pytest.raises(RuntimeError, match="col_indices"):
        cpu.ops().bsr_forward_cpu(torch.randn(2, 32), weight.values, weight.layout.row_offsets, bad_cols, 32)


def test_unavailable_reasons():
    assert "CPU tensors only" in cpu.unavailable(torch.device("cuda"), torch.float32)
    assert "not supported" in cpu.unavailable(CPU, torch.int32)
