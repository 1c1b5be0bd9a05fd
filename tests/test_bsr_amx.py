"""bf16 block-sparse products on AMX tiles (the amx path, csrc/bsr/amx_products.h) against fp64,
with the bound the dense bf16 GEMM sets: fp32 accumulation, one rounding on output, so the
error may not exceed torch's bf16 matmul on the same operands (plus one bf16 rounding step)."""
import pytest
import torch

import sparsekern as sk
from helpers import on_path, random_bsr, relative_error, stored_blocks
from sparsekern.kernels import microkernel
from sparsekern.kernels.bsr import cpu, reference

pytestmark = pytest.mark.skipif("amx" not in (microkernel.runnable_isas()
                                              if microkernel.microkernel_isa("bsr") != "unavailable" else ()),
                                reason="needs a CPU with AMX-TILE, AMX-BF16 and AVX512-BF16")

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
}


@pytest.fixture(params=[("amx", False)], ids=["amx"])
def amx(request):
    with on_path("bsr", request.param):
        assert microkernel.microkernel_isa("bsr") == "avx512f+amx"
        yield


def _operands(name):
    shape, block, density, m, empty_rows = CASES[name]
    weight = random_bsr(shape, block, density, dtype=torch.bfloat16, seed=11, empty_rows=empty_rows)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(m, shape[1], generator=g).bfloat16()
    dy = torch.randn(m, shape[0], generator=g).bfloat16()
    bias = torch.randn(shape[0], generator=g).bfloat16()
    return weight, x, dy, bias


@pytest.mark.parametrize("name", list(CASES))
def test_products_within_the_dense_bf16_bound(amx, name):
    weight, x, dy, bias = _operands(name)
    layout, values = weight.layout, weight.values
    w = weight.to_dense()
    cases = {  # (ours, fp64 reference, torch's dense bf16 product of the same operands)
        "forward": (cpu.bsr_forward(x, values, layout, bias),
                    reference.bsr_forward(x.double(), values.double(), layout, bias.double()), x @ w.T + bias),
        "grad_input": (cpu.bsr_grad_input(dy, values, layout),
                       reference.bsr_grad_input(dy.double(), values.double(), layout), dy @ w),
        "grad_weight": (cpu.bsr_grad_weight(dy, x, layout),
                        reference.bsr_grad_weight(dy.double(), x.double(), layout), stored_blocks(dy.T @ x, layout)),
    }
    for product, (got, want, dense) in cases.items():
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, product
        if want.numel() == 0:
            continue
        bound = relative_error(dense, want)
        err = relative_error(got, want)
        assert err <= bound + BF16_STEP, f"{product}: error {err:.2e}, dense bf16 {bound:.2e}"


@pytest.mark.parametrize("name", ["b32-M100", "b64x32-M64"])
def test_same_as_the_fp32_accumulating_avx512_path(name):
    """Both paths sum in fp32 and round once: they differ by at most one bf16 step per element."""
    weight, x, dy, bias = _operands(name)
    layout, values = weight.layout, weight.values
    results = {}
    for path in (("amx", False), ("avx512", False)):
        with on_path("bsr", path):
            results[path[0]] = [cpu.bsr_forward(x, values, layout, bias), cpu.bsr_grad_input(dy, values, layout),
                                cpu.bsr_grad_weight(dy, x, layout)]
    for a, b in zip(results["amx"], results["avx512"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * BF16_STEP, atol=1e-2)


def test_empty_block_rows_give_the_bias(amx):
    weight, x, _, bias = _operands("b32-M31-empty-row")
    y = cpu.bsr_forward(x, weight.values, weight.layout, bias)
    torch.testing.assert_close(y[:, 32:64], bias[32:64].expand(x.shape[0], 32), rtol=0, atol=0)


@pytest.mark.parametrize("m", [0, 1])
def test_degenerate_token_counts(amx, m):
    weight = random_bsr((64, 96), 32, 0.5, dtype=torch.bfloat16)
    x, dy = torch.randn(m, 96).bfloat16(), torch.randn(m, 64).bfloat16()
    assert cpu.bsr_forward(x, weight.values, weight.layout).shape == (m, 64)
    assert cpu.bsr_grad_input(dy, weight.values, weight.layout).shape == (m, 96)
    dw = cpu.bsr_grad_weight(dy, x, weight.layout)
    torch.testing.assert_close(dw.float(), reference.bsr_grad_weight(dy.float(), x.float(), weight.layout),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_thread_count(amx, threads):
    weight, x, dy, bias = _operands("b32-M100")
    before = torch.get_num_threads()
    runs = []
    try:
        for t in (1, threads):
            torch.set_num_threads(t)
            runs.append([cpu.bsr_forward(x, weight.values, weight.layout, bias),
                         cpu.bsr_grad_input(dy, weight.values, weight.layout),
                         cpu.bsr_grad_weight(dy, x, weight.layout)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sparse_linear_trains_in_bf16_on_amx(amx):
    torch.manual_seed(0)
    layer = sk.SparseLinear(96, 64, block_size=32, density=0.5, dtype=torch.bfloat16)
    x = torch.randn(40, 96, dtype=torch.bfloat16, requires_grad=True)
    with sk.use_backend("cpu"):
        y = layer(x)
        y.float().square().sum().backward()
    ref = sk.SparseLinear(96, 64, block_size=32, density=0.5, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    yr.square().sum().backward()
    assert relative_error(y, yr) < 1e-2
    assert relative_error(x.grad, xr.grad) < 2e-2
    assert relative_error(layer.values.grad, ref.values.grad) < 2e-2
