"""bf16 conv products on tile steps (square blocks of a multiple of 16 channels): AMX tiles on
the amx path, AVX512-BF16 dot products on the avx512 path of a CPU that has them
(csrc/conv/dot_bf16.h, common/dot_rows.h), against fp64, with the bound the dense bf16 conv
sets: fp32 accumulation and one rounding on output, so the error may not exceed torch's bf16
conv on the same operands plus one bf16 rounding step. Each engine's tests skip on a CPU
without its path."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from helpers import BF16_ENGINES, assert_same_at_thread_counts, on_bf16_engine, on_path, relative_error
from test_conv_cases import conv_case, output_gradient
from sparsekern.kernels.conv import cpu, dense_conv_weight, gather_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_STEP = 2.0 ** -8  # one bf16 rounding, relative

# name: (in, out, groups, kernel, stride, padding (t, b, l, r), dilation, block, batch, (H, W), density)
CASES = {
    "3x3-partial-block-row": (64, 70, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 2, (5, 6), 0.6),
    "partial-block-column": (40, 64, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 2, (7, 5), 0.7),
    "stride2-odd-pixels": (64, 64, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 32, 1, (9, 7), 0.6),
    "dilation2-5x5": (32, 64, 1, (5, 5), (1, 1), (4, 4, 4, 4), (2, 2), 32, 2, (6, 9), 0.8),
    "groups2": (128, 64, 2, (3, 3), (1, 2), (1, 1, 0, 1), (1, 1), 32, 2, (7, 9), 0.7),
    "block64-long-rows": (128, 96, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 64, 1, (4, 29), 0.6),
    "1x1": (96, 64, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 32, 3, (5, 5), 0.6),
    "empty-block-rows": (96, 160, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 2, (6, 5), "empty-rows"),
    "batch0": (64, 64, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32, 0, (5, 6), 0.6),
    # 16-column strips: blocks of 16 and 48 channels
    "block16": (32, 48, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 2, (7, 15), 0.6),
    "block16-partial-stride2": (40, 36, 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 16, 2, (9, 7), 0.7),
    "block16-groups2": (64, 64, 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 1, (6, 13), 0.7),
    "block48": (96, 96, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 48, 2, (5, 6), 0.6),
}


@pytest.fixture(params=list(BF16_ENGINES))
def dot_path(request):
    """The conv kernels on a bf16 tile engine's path, or a skip where the CPU lacks it."""
    yield from on_bf16_engine("conv", request.param)


def _operands(name):
    """conv_case's operands in bf16, channels-last (empty-rows cases: block rows 1 and 4, column 2)."""
    x, values, layout, geometry, bias = conv_case(name, torch.bfloat16, seed=5, cases=CASES)
    x = x.contiguous(memory_format=torch.channels_last)
    dy = output_gradient(x, geometry).contiguous(memory_format=torch.channels_last)
    return x, dy, values, layout, geometry, bias


def _dense(x, values, layout, geometry, bias, dy, dtype):
    """(y, dx, dW on the stored blocks) from F.conv2d's autograd in ``dtype`` on the masked weight."""
    x = x.to(dtype).requires_grad_()
    w = dense_conv_weight(values.to(dtype), layout, geometry).detach().requires_grad_()
    t, b, l, r = geometry.padding
    y = F.conv2d(F.pad(x, (l, r, t, b)), w, bias.to(dtype), geometry.stride, 0, geometry.dilation, geometry.groups)
    if y.numel() == 0:
        return y, torch.zeros_like(x), gather_blocks(torch.zeros_like(w), layout, geometry)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(dtype))
    return y, dx, gather_blocks(dw, layout, geometry)


@pytest.mark.parametrize("name", list(CASES))
def test_products_within_the_dense_bf16_bound(dot_path, name):
    x, dy, values, layout, geometry, bias = _operands(name)
    got = (cpu.conv_forward(x, values, layout, geometry, bias),
           cpu.conv_grad_input(dy, values, layout, geometry, tuple(x.shape[2:])),
           cpu.conv_grad_weight(dy, x, layout, geometry)[0])
    want = _dense(x, values, layout, geometry, bias, dy, torch.float64)
    dense = _dense(x, values, layout, geometry, bias, dy, torch.bfloat16)
    for product, a, b, d in zip(("forward", "grad_input", "grad_weight"), got, want, dense):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, product
        if b.numel() == 0 or not bool(b.any()):
            assert not bool(a.any()), product
            continue
        bound, err = relative_error(d, b), relative_error(a, b)
        assert err <= bound + BF16_STEP, f"{product}: error {err:.2e}, dense bf16 {bound:.2e}"


@pytest.mark.parametrize("name", ["3x3-partial-block-row", "groups2", "stride2-odd-pixels", "block16-groups2"])
def test_same_as_the_widening_avx2_path(dot_path, name):
    """Both sum in fp32 and round once: they differ by at most about one bf16 step per element."""
    x, dy, values, layout, geometry, bias = _operands(name)

    def products():
        return (cpu.conv_forward(x, values, layout, geometry, bias),
                cpu.conv_grad_input(dy, values, layout, geometry, tuple(x.shape[2:])),
                cpu.conv_grad_weight(dy, x, layout, geometry)[0])
    dot = products()
    with on_path("conv", ("avx2", False)):
        widened = products()
    for a, b in zip(dot, widened):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * BF16_STEP, atol=2e-2)


def test_empty_block_rows_give_the_bias(dot_path):
    x, _, values, layout, geometry, bias = _operands("empty-block-rows")
    y = cpu.conv_forward(x, values, layout, geometry, bias)
    torch.testing.assert_close(y[:, 32:64], bias[32:64].view(1, 32, 1, 1).expand(x.shape[0], 32, *y.shape[2:]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 3])
def test_results_do_not_depend_on_thread_count(dot_path, threads):
    x, dy, values, layout, geometry, bias = _operands("block64-long-rows")
    # (dW sums per-thread parts of the pixels, in an order that depends on the thread count)
    assert_same_at_thread_counts(lambda: [cpu.conv_forward(x, values, layout, geometry, bias),
                                          cpu.conv_grad_input(dy, values, layout, geometry, tuple(x.shape[2:]))],
                                 threads)


def test_sparse_conv2d_trains_in_bf16_on_tiles(dot_path):
    torch.manual_seed(0)
    layer = sk.SparseConv2d(64, 64, 3, padding=1, block_size=32, density=0.75, dtype=torch.bfloat16)
    x = torch.randn(2, 64, 6, 7, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with sk.use_backend("cpu"):
        layer(x).float().square().sum().backward()
    ref = sk.SparseConv2d(64, 64, 3, padding=1, block_size=32, density=0.75, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    xr = x.detach().double().requires_grad_()
    ref(xr).square().sum().backward()
    assert relative_error(x.grad, xr.grad) < 2e-2
    assert relative_error(layer.values.grad, ref.values.grad) < 2e-2
