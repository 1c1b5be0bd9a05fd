"""The triton backend of the low-rank products, in triton's interpreter on CPU.

The ``interpreter`` fixture sets TRITON_INTERPRET=1 per test (other modules keep
their backend lists) and NaN-fills every buffer ``torch.empty`` hands out, so an
element a kernel fails to write fails the test; it skips where the interpreter
cannot run (triton < 3.9 with numpy >= 2.4). Shapes are small and awkward (rank 1,
ranks that are not multiples of 16 and above the fused-chain limit, ragged tiles,
0 and 1 tokens, and enough tokens for the weight gradients to split them). Compile checks for GPU
targets are in test_triton_grad_compile.py.
"""
import importlib.util

import pytest
import torch

import sparsekern as sk
from helpers import relative_error
from sparsekern.kernels.lowrank import triton_lowrank
from sparsekern.ops import low_rank_linear

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
uses_interpreter = pytest.mark.usefixtures("interpreter")  # conftest: TRITON_INTERPRET=1, NaN-filled empty


def _run(backend, inputs, dy, kl_grads):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with sk.use_backend(backend):
        y = low_rank_linear(*inputs, kl_grads=kl_grads)
        return [y, *torch.autograd.grad(y, inputs, dy)]


SHAPES = {  # (m, k, n, r)
    "r1": (37, 29, 23, 1),
    "r3": (37, 29, 23, 3),
    "r17": (20, 18, 33, 17),
    "r33-one-token": (1, 40, 35, 33),
    "no-tokens": (0, 8, 5, 2),
    "r-above-chain": (5, 6, 7, triton_lowrank._CHAIN_MAX_R + 2),
    "many-tokens-split": (300, 21, 19, 5),
}


def _inputs(m, k, n, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (n, r), (r, r), (k, r), (n,))]
    return inputs, torch.randn(m, n, generator=g).to(dtype)


@uses_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kl_grads", [False, True], ids=["factors", "kl"])
def test_triton_matches_reference(shape, kl_grads):
    inputs, dy = _inputs(*SHAPES[shape])
    got, want = _run("triton", inputs, dy, kl_grads), _run("reference", inputs, dy, kl_grads)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        assert a.shape == b.shape and (b.numel() == 0 or relative_error(a, b) < 1e-5)


@uses_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", ["r1", "r17", "r33-one-token", "many-tokens-split"])
def test_triton_half_types(shape, dtype):
    inputs, dy = _inputs(*SHAPES[shape], dtype=dtype, seed=1)
    for a, b in zip(_run("triton", inputs, dy, False), _run("reference", inputs, dy, False)):
        assert a.dtype == dtype and relative_error(a, b) < 2e-2


def test_split_k_for_many_tokens_and_small_rank(monkeypatch):
    """On a 132-SM GPU the r x r and features x r reductions split their tokens;
    one large output or few tokens does not."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_lowrank, "parallel_slots", lambda device: 132)
    cuda = torch.device("cuda")
    for p, r in [(16, 16), (64, 64), (4096, 8)]:
        split, per_split = triton_lowrank.token_split(65536, p, r, cuda)
        assert split > 1 and per_split >= 512 and split * per_split >= 65536
    assert triton_lowrank.token_split(65536, 32768, 256, cuda)[0] == 1
    assert triton_lowrank.token_split(600, 16, 16, cuda)[0] <= 2


@uses_interpreter
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "column-strided"])
@pytest.mark.parametrize("p,r", [(5, 5), (70, 3), (1, 1), (33, 40)])
def test_token_reduction_in_chunks(p, r, strided):
    """aᵀ b over 300 tokens: several chunks in the interpreter (4 slots, 16-token grain)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, p, generator=g), torch.randn(300, r, generator=g)
    assert triton_lowrank.token_split(300, p, r, a.device)[0] > 1
    if strided:
        a, b = a.T.contiguous().T, b.T.contiguous().T
    got = triton_lowrank._token_reduction(a, b)
    torch.testing.assert_close(got.double(), a.double().T @ b.double(), rtol=1e-5, atol=1e-5)


@uses_interpreter
def test_triton_refuses_fp64_and_cpu_without_interpreter(monkeypatch):
    x = torch.randn(3, 4, dtype=torch.float64)
    with sk.use_backend("triton"), pytest.raises(sk.BackendUnavailableError, match="float64"):
        low_rank_linear(x, torch.randn(5, 2).double(), torch.randn(2, 2).double(), torch.randn(4, 2).double())
    monkeypatch.delenv("TRITON_INTERPRET")
    with sk.use_backend("triton"), pytest.raises(sk.BackendUnavailableError, match="CUDA"):
        low_rank_linear(x.float(), torch.randn(5, 2), torch.randn(2, 2), torch.randn(4, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [300, 20000], ids=["m300", "m20000-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_gpu_matches_reference(monkeypatch, dtype, m):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    # Factors scaled by 1/sqrt(fan-in), as a trained layer's are: unscaled, the weight gradients
    # summed over 20000 tokens exceed fp16's range (65504) in the reference too.
    inputs = [torch.randn(*s, generator=g, device="cuda").div(scale).to(dtype)
              for s, scale in (((m, 520), 1), ((260, 64), 8), ((64, 64), 8), ((520, 64), 520 ** 0.5), ((260,), 1))]
    dy = torch.randn(m, 260, generator=g, device="cuda", dtype=dtype)
    tol = 2e-3 if dtype == torch.float32 else 1e-2  # TF32 may be on
    for a, b in zip(_run("triton", inputs, dy, False), _run("reference", inputs, dy, False)):
        assert relative_error(a, b) < tol
