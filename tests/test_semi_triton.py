"""Triton 2:4 prune+compress under the interpreter (CPU), against the reference; GPU tests marked."""
import pytest
import torch

import sparsekern as sk
from sparsekern.formats.semi import decompress
from sparsekern.kernels.semi import reference, triton_prune

pytest.importorskip("triton")


@pytest.fixture
def interpreter(monkeypatch):
    """CPU runs of the Triton kernels: set per test (not per process) so other modules keep their backends."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


interpreted = pytest.mark.usefixtures("interpreter")


def _assert_same(actual, expected):
    assert len(actual) == len(expected) == 4
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if a is not None:
            assert a.dtype == e.dtype and torch.equal(a, e)


@interpreted
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("shape", [(4, 4), (4, 12), (12, 20), (8, 36), (0, 8)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(shape, transposable, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    _assert_same(triton_prune.semi_prune_compress(w, transposable), reference.semi_prune_compress(w, transposable))


@interpreted
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_ties_and_zeros_give_valid_patterns(transposable):
    w = torch.cat([torch.ones(4, 8), torch.zeros(4, 8)])
    values, indices, values_t, indices_t = triton_prune.semi_prune_compress(w, transposable)
    mask = decompress(torch.ones_like(values, dtype=torch.bool), indices, 8)
    assert bool((mask.view(8, 2, 4).sum(-1) == 2).all())
    assert torch.equal(decompress(values, indices, 8), w * mask)
    if transposable:
        assert torch.equal(decompress(values_t, indices_t, 8), (w * mask).T)


@interpreted
def test_registered_and_forced():
    w = torch.randn(8, 8)
    with sk.use_backend("triton"):
        from sparsekern.kernels import select_kernel
        name, fn = select_kernel("semi_prune_compress", w.device, w.dtype)
    assert name == "triton"
    _assert_same(fn(w, True), reference.semi_prune_compress(w, True))


def test_unavailable_reasons():
    assert "float64" in triton_prune._unavailable(torch.device("cpu"), torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_gpu_matches_reference(transposable):
    w = torch.randn(256, 512, device="cuda")
    _assert_same(triton_prune.semi_prune_compress(w, transposable), reference.semi_prune_compress(w, transposable))
