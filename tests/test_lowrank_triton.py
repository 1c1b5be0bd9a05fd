"""The triton backend of the low-rank products, in triton's interpreter on CPU.

TRITON_INTERPRET=1 is set per test (other modules keep their backend lists) and
every buffer ``torch.empty`` hands out is NaN-filled, so an element a kernel fails
to write fails the test. Shapes are small and awkward (ranks below and above the
fused-chain limit, ragged tiles, no tokens).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import sparsekern as sk
from helpers import relative_error
from sparsekern.kernels.lowrank import triton_lowrank
from sparsekern.ops import low_rank_linear

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
_empty = torch.empty


@pytest.fixture(autouse=True)
def interpret_and_nan_fill(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def nan_empty(*args, **kwargs):
        out = _empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def _run(backend, inputs, dy, kl_grads):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with sk.use_backend(backend):
        y = low_rank_linear(*inputs, kl_grads=kl_grads)
        return [y, *torch.autograd.grad(y, inputs, dy)]


@pytest.mark.parametrize("m,k,n,r", [(37, 29, 23, 3), (20, 18, 33, 17), (0, 8, 5, 2),
                                     (5, 6, 7, triton_lowrank._CHAIN_MAX_R + 2)],
                         ids=["r3", "r17", "no-tokens", "r-above-chain"])
@pytest.mark.parametrize("kl_grads", [False, True], ids=["factors", "kl"])
def test_triton_matches_reference(m, k, n, r, kl_grads):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*s, generator=g) for s in ((m, k), (n, r), (r, r), (k, r), (n,))]
    dy = torch.randn(m, n, generator=g)
    got, want = _run("triton", inputs, dy, kl_grads), _run("reference", inputs, dy, kl_grads)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        assert a.shape == b.shape and (b.numel() == 0 or relative_error(a, b) < 1e-5)


def test_triton_bf16():
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*s, generator=g).bfloat16() for s in ((19, 21), (17, 6), (6, 6), (21, 6), (17,))]
    dy = torch.randn(19, 17, generator=g).bfloat16()
    for a, b in zip(_run("triton", inputs, dy, False), _run("reference", inputs, dy, False)):
        assert a.dtype == torch.bfloat16 and relative_error(a, b) < 2e-2


def test_triton_refuses_fp64_and_cpu_without_interpreter(monkeypatch):
    x = torch.randn(3, 4, dtype=torch.float64)
    with sk.use_backend("triton"), pytest.raises(sk.BackendUnavailableError, match="float64"):
        low_rank_linear(x, torch.randn(5, 2).double(), torch.randn(2, 2).double(), torch.randn(4, 2).double())
    monkeypatch.delenv("TRITON_INTERPRET")
    with sk.use_backend("triton"), pytest.raises(sk.BackendUnavailableError, match="CUDA"):
        low_rank_linear(x.float(), torch.randn(5, 2), torch.randn(2, 2), torch.randn(4, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_gpu_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch, "empty", _empty)
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(*s, generator=g, device="cuda", dtype=dtype)
              for s in ((300, 520), (260, 64), (64, 64), (520, 64), (260,))]
    dy = torch.randn(300, 260, generator=g, device="cuda", dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # TF32 may be on
    for a, b in zip(_run("triton", inputs, dy, False), _run("reference", inputs, dy, False)):
        assert relative_error(a, b) < tol



def compile_for_sm90():
    """Compile both kernels to cubin for sm_90 (ptxas ships with triton); no GPU needed.
    Must run where triton was imported without TRITON_INTERPRET (see the test)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    _, mm_kernel, chain_kernel = triton_lowrank._kernels(False)
    for fn, dtype, constants in [(mm_kernel, "fp32", dict(HAS_BIAS=True, BM=128, BN=128, BK=32, PRECISION="tf32")),
                                 (chain_kernel, "bf16", dict(BM=64, BK=32, BR=128, PRECISION="ieee"))]:
        constants["WIDEN"] = False
        signature = {n: "constexpr" if n in constants else (f"*{dtype}" if n.endswith("_ptr") else "i32")
                     for n in inspect.signature(fn.fn).parameters}
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, num_stages=3))
        assert compiled.asm["cubin"]


def test_kernels_compile_for_sm90(tmp_path):
    """The GPU-only paths (tensor-core dots, bf16, tf32) are at least valid: compiled in a
    fresh process, since triton imported under the interpreter cannot compile for GPUs."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))  # private cache: other processes compile too
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    code = "import test_lowrank_triton as t; t.compile_for_sm90()"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(__file__))
