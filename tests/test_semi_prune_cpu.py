"""The C++ prune+compress of the 2:4 cpu backend against sparsekern.prune_2to4 + compress.

Integer-valued weights (many exact ties) must give bit-identical masks, values
and packed indices, for W and Wᵀ: the same tie-breaking as the reference (lower
index first; the first of the 90 transposable patterns in their order). On
random weights the kept magnitude is the optimum up to fp32 rounding.
"""
import pytest
import torch

import sparsekern as sk
from sparsekern.kernels.semi import cpu, reference
from sparsekern.formats.semi_prune import transposable_patterns

pytestmark = [pytest.mark.skipif(cpu._unavailable(torch.device("cpu"), torch.float32) is not None,
                                 reason="the 2:4 cpu backend cannot run here"),
              pytest.mark.usefixtures("one_thread")]

SHAPES = [(4, 4), (8, 12), (36, 20), (12, 260), (132, 64)]


def test_pattern_order_is_the_reference_order():
    assert torch.equal(cpu.transposable_pattern_table(), transposable_patterns())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_ties_and_compression_match_the_reference_exactly(shape, transposable, dtype):
    w = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = cpu.semi_prune_compress(w, transposable)
    want = reference.semi_prune_compress(w, transposable)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if r is not None:
            assert g.dtype == r.dtype and torch.equal(g, r)


@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_half_weights_prune_as_the_reference_does(transposable):
    w = torch.randn(36, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    for got, want in zip(cpu.semi_prune_compress(w, transposable), reference.semi_prune_compress(w, transposable)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_random_weights_keep_the_optimal_magnitude(transposable):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    values, indices, values_t, indices_t = cpu.semi_prune_compress(w, transposable)
    matrix = sk.SemiStructuredMatrix(values, indices, tuple(w.shape), values_t=values_t, indices_t=indices_t)
    mask = matrix.mask
    sk.SemiStructuredMatrix.from_dense(w * mask, mask=mask, with_transpose=transposable)  # a valid pattern
    assert torch.equal(matrix.to_dense(), w * mask)
    if transposable:
        assert torch.equal(sk.SemiStructuredMatrix(values_t, indices_t, (512, 256)).to_dense(), (w * mask).T)
    best = w.abs()[sk.prune_2to4(w, transposable=transposable)].sum()
    assert w.abs()[mask].sum() >= best * (1 - 1e-6)


def test_rejects_what_the_kernel_cannot_prune():
    with pytest.raises(RuntimeError, match="multiples of 4"):
        cpu.semi_prune_compress(torch.randn(6, 8), True)
    with pytest.raises(RuntimeError, match="last dim a multiple of 4"):
        cpu.semi_prune_compress(torch.randn(6, 10), False)
    with pytest.raises(RuntimeError, match="float32"):
        cpu.semi_prune_compress(torch.randn(8, 8, dtype=torch.float64), False)
