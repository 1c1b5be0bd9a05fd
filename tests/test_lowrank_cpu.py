"""The C++ products of the low-rank cpu backend (csrc/lowrank/, as dispatcher ops).

matmul: a @ b and a @ bᵀ (+ bias); transposed_matmul: aᵀ b (+ a's column sums).
Against torch on shapes that leave partial output tiles (rows not a multiple of
6, widths not a multiple of 16), several token and column blocks, empty and
one-wide operands, every dtype, on the AVX2/FMA microkernel and the portable one.
"""
import pytest
import torch

from helpers import microkernel_paths, on_path, relative_error
from sparsekern.kernels.lowrank import cpu as ext

pytestmark = [pytest.mark.skipif(ext.ops() is None, reason="the compiled low-rank extension is not built"),
              pytest.mark.usefixtures("one_thread")]

# (tokens, inner, width): width is r for a @ b with b (inner, r), N for a @ bᵀ with b (N, r)
SHAPES = [(1, 1, 1), (7, 5, 3), (37, 29, 70), (64, 48, 16), (13, 130, 33), (6, 16, 48), (200, 64, 17)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(params=microkernel_paths() if ext.ops() is not None else [None])
def microkernel(request):
    with on_path("lowrank", request.param) as path:
        yield path


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("transpose_b", [False, True], ids=["ab", "abT"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matmul_matches_torch(microkernel, shape, transpose_b, dtype, with_bias):
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, k, generator=g, dtype=torch.float64) if transpose_b else torch.randn(k, n, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64) if with_bias else None
    want = a @ (b.T if transpose_b else b) + (0 if bias is None else bias)
    got = ext.matmul(a.to(dtype), b.to(dtype), transpose_b, None if bias is None else bias.to(dtype))
    assert got.dtype == dtype and got.shape == (m, n)
    assert relative_error(got, want) < TOL[dtype]


@pytest.mark.parametrize("n", [4096, 4100], ids=["rows-aligned", "rows-unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matmul_streams_large_outputs_exactly(microkernel, n, dtype):
    # An output of >= 16 MiB is written with non-temporal stores where every row starts on a
    # vector boundary (n = 4096), with plain stores where not (4100); two threads fence theirs.
    m = (16 << 20) // (n * dtype.itemsize) + 1
    g = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((m, 8), (n, 8), (n,)))
    torch.set_num_threads(2)
    try:
        got = ext.matmul(a, b, True, bias)
    finally:
        torch.set_num_threads(1)
    assert relative_error(got, torch.addmm(bias, a, b.T)) < TOL[dtype]


def test_matmul_threads_split_tokens_exactly():
    a, b, bias = torch.randn(1001, 96), torch.randn(300, 96), torch.randn(300)
    torch.set_num_threads(2)
    try:
        got = ext.matmul(a, b, True, bias)
    finally:
        torch.set_num_threads(1)
    assert relative_error(got, torch.addmm(bias, a, b.T)) < 1e-5


@pytest.mark.parametrize("m,k,n", [(0, 4, 3), (5, 0, 3), (5, 4, 0)])
def test_matmul_empty_operands(m, k, n):
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    torch.testing.assert_close(ext.matmul(a, b, False), a @ b)
    torch.testing.assert_close(ext.matmul(a, b, False, bias), a @ b + bias)


def test_matmul_rejects_bad_operands():
    a = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"cannot multiply"):
        ext.matmul(a, torch.randn(5, 2), False)
    with pytest.raises(RuntimeError, match=r"dtype mismatch"):
        ext.matmul(a, torch.randn(3, 2, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match=r"contiguous"):
        ext.matmul(a, torch.randn(2, 3).T, False)
    with pytest.raises(RuntimeError, match=r"bias must be .* 2 entries"):
        ext.matmul(a, torch.randn(3, 2), False, torch.randn(3))
    with pytest.raises(RuntimeError, match=r"unsupported dtype"):
        ext.matmul(a.int(), torch.randn(3, 2).int(), False)


# (tokens, features, r) for aᵀ b with a (tokens, features), b (tokens, r): more than one
# token block (256) and column block (192), partial 6 x 16 tiles.
REDUCTION_SHAPES = [(1, 1, 1), (7, 13, 5), (300, 389, 17), (513, 200, 33), (257, 6, 16), (40, 193, 70)]


@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("column_sums", [False, True], ids=["nosums", "sums"])
def test_transposed_matmul_matches_torch(microkernel, shape, dtype, column_sums):
    t, m, n = shape
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(t, m, generator=g, dtype=torch.float64), torch.randn(t, n, generator=g, dtype=torch.float64)
    got, sums = ext.transposed_matmul(a.to(dtype), b.to(dtype), column_sums)
    assert got.dtype == dtype and got.shape == (m, n)
    assert relative_error(got, a.T @ b) < TOL[dtype]
    if column_sums:
        assert sums.dtype == dtype and sums.shape == (m,)
        assert relative_error(sums, a.sum(0)) < TOL[dtype]
    else:
        assert sums is None


def test_transposed_matmul_threads_split_columns_exactly():
    a, b = torch.randn(700, 1001), torch.randn(700, 40)
    torch.set_num_threads(2)
    try:
        got, sums = ext.transposed_matmul(a, b, True)
    finally:
        torch.set_num_threads(1)
    assert relative_error(got, a.T @ b) < 1e-5 and relative_error(sums, a.sum(0)) < 1e-5


@pytest.mark.parametrize("t,m,n", [(0, 4, 3), (5, 0, 3), (5, 4, 0)])
def test_transposed_matmul_empty_operands(t, m, n):
    a, b = torch.randn(t, m), torch.randn(t, n)
    got, sums = ext.transposed_matmul(a, b, True)
    torch.testing.assert_close(got, a.T @ b)
    torch.testing.assert_close(sums, a.sum(0))


def test_transposed_matmul_rejects_bad_operands():
    a = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"as many rows.*\[4, 3\].*\[5, 2\]"):
        ext.transposed_matmul(a, torch.randn(5, 2))
    with pytest.raises(RuntimeError, match=r"dtype mismatch"):
        ext.transposed_matmul(a, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"contiguous"):
        ext.transposed_matmul(a, torch.randn(2, 4).T)
