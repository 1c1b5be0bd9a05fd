"""Triton 2:4 prune+compress under the interpreter (CPU), against the reference; GPU tests marked."""
import contextlib
import importlib.util
import inspect
from types import SimpleNamespace

import pytest
import torch

import sparsekern as sk
from gpu_compile import narrow_index_products
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


@interpreted
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("view", ["column-strided", "transposed"])
def test_strided_input_matches_reference(view, transposable):
    """The kernels read W row-major: a strided view is made contiguous first."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 40, generator=g)[:, ::2] if view == "column-strided" else torch.randn(20, 12, generator=g).T
    assert not w.is_contiguous()
    _assert_same(triton_prune.semi_prune_compress(w, transposable),
                 reference.semi_prune_compress(w.contiguous(), transposable))


@pytest.mark.parametrize("kernel", ["prune_rows", "prune_tiles"])
def test_offsets_are_computed_in_64_bits(kernel, monkeypatch, tmp_path):
    """Compiled for sm_90 without a GPU: no program-id x size product in 32 bits (a weight of
    more than 2**31 elements would wrap around). The checker flags such a kernel."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # private: other processes compile too
    # A fresh copy of the module: triton.jit fixes each function to the mode in force when it
    # decorates, and an interpreter test may have imported the module first.
    spec = importlib.util.find_spec("sparsekern.kernels.semi._triton_prune_jit")
    jit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jit)
    sizes = ("rows", "cols", "index_cols", "index_rows")
    types = dict(w_ptr="*fp32", values_ptr="*fp32", indices_ptr="*u8", patterns_ptr="*fp32", bias_ptr="*fp32",
                 bits_ptr="*i32", values_t_ptr="*fp32", indices_t_ptr="*u8", **dict.fromkeys(sizes, "i32"))
    fn = getattr(jit, kernel)
    params = list(inspect.signature(fn.fn).parameters)
    source = ASTSource(fn, {name: types.get(name, "constexpr") for name in params}, {"BLOCK": 64})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert narrow_index_products(compiled, sizes) == []
    assert len(narrow_index_products(SimpleNamespace(asm={"ttir": _WRAPPING_TTIR}), sizes)) == 2


# The row-wise kernel's row offset as it was compiled before the widening.
_WRAPPING_TTIR = """
    %row = tt.get_program_id x : i32 loc(#loc83)
    %base = arith.muli %row, %cols : i32 loc(#loc88)
    %base_12 = tt.addptr %w_ptr, %base : !tt.ptr<f32>, i32 loc(#loc89)
"""


def test_launches_on_the_tensors_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    triton_prune._on_device(torch.device("cuda", 1))
    assert entered == [torch.device("cuda", 1)]
    with triton_prune._on_device(torch.device("cpu")):
        pass
    assert len(entered) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_runs_on_a_tensor_off_the_current_device():
    w = torch.randn(64, 128, device="cuda:1")
    with torch.cuda.device(0):
        _assert_same(triton_prune.semi_prune_compress(w, True), reference.semi_prune_compress(w, True))
