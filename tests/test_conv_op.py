"""``sparsekern.ops.sparse_conv2d``: fp64 gradcheck on every backend, opcheck of the custom
ops (the autograd op and the compiled kernels), the floor rule's choices (measured, and the
calls it decides without measuring), and the boundary checks."""
import pytest
import torch

import sparsekern as sk
from test_conv_cases import conv_case, output_gradient
from sparsekern.kernels import floor
from sparsekern.kernels.conv import cpu
from sparsekern.kernels.floor import SAMPLES
from sparsekern.ops import conv2d as conv_op
from sparsekern.ops.conv2d import sparse_conv2d

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
_REASON = cpu.unavailable(CPU, torch.float32)
needs_cpu = pytest.mark.skipif(_REASON is not None, reason=f"conv cpu backend not built: {_REASON}")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu)]
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["3x3-uneven-channels", "stride2", "groups2-stride1x2", "same-even-kernel"])
def test_gradcheck(backend, name):
    x, values, layout, geometry, bias = conv_case(name)
    x = x[:1].to(memory_format=torch.channels_last).requires_grad_()
    values, bias = values.requires_grad_(), bias.requires_grad_()
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, v, b: sparse_conv2d(x, v, layout, geometry, b), (x, values, bias),
                                          fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_bias_gradients_without_an_input_gradient(backend):
    """A first layer (x needs no gradient): dW and the bias gradient come from one product, and
    differentiate again (dY's gradient takes the bias gradient's share)."""
    x, values, layout, geometry, bias = conv_case("stride2")
    x = x[:2].to(memory_format=torch.channels_last)
    values, bias = values.requires_grad_(), bias.requires_grad_()

    def conv(v, b):
        return sparse_conv2d(x, v, layout, geometry, b)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(conv, (values, bias), fast_mode=True)
        assert torch.autograd.gradgradcheck(conv, (values, bias), fast_mode=True)


def _op_args(name, dtype, channels_last, batch=None):
    x, values, layout, geometry, bias = conv_case(name, dtype)
    if batch is not None:
        x = x[:batch]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, values, bias, conv_op._flat(layout), geometry, layout


LAYOUTS = [(True, 2), (False, 0)]  # (channels-last, batch): both memory formats, and no images at all


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last, batch", LAYOUTS, ids=["nhwc", "nchw-batch0"])
def test_opcheck_autograd_ops(backend, channels_last, batch):
    x, values, bias, flat, geometry, _ = _op_args("groups2-stride1x2", torch.float64, channels_last, batch)
    geo = geometry.as_list()
    torch.library.opcheck(conv_op._conv2d.op, (x.requires_grad_(), values.requires_grad_(), bias, flat, geo, backend))
    dy = output_gradient(x.detach(), geometry).contiguous(memory_format=conv_op.output_memory_format(x))
    torch.library.opcheck(conv_op._grad_input.op, (dy, values.detach(), flat, geo, list(x.shape[2:]), backend))
    for bias_grad in (False, True):
        torch.library.opcheck(conv_op._grad_weight.op, (dy, x.detach(), flat, geo, bias_grad, backend))
        torch.library.opcheck(conv_op._grads.op, (dy, x.detach(), values.detach(), flat, geo, bias_grad, backend))


@needs_cpu
@pytest.mark.parametrize("dtype, channels_last, batch", [(dtype, True, 2) for dtype in FLOATS] + [
    (torch.float32, False, 0)], ids=[str(dtype) for dtype in FLOATS] + ["nchw-batch0"])
def test_opcheck_compiled_ops(dtype, channels_last, batch):
    ops = cpu.ops()
    x, values, bias, _, geometry, layout = _op_args("3x3-uneven-channels", dtype, channels_last, batch)
    geo = geometry.as_list()
    dy = output_gradient(x, geometry)
    torch.library.opcheck(ops.conv_forward_cpu.default, (x, values, layout.row_offsets, layout.col_indices, geo, bias))
    torch.library.opcheck(ops.conv_grad_input_cpu.default, (dy, values, layout.col_offsets, layout.t_block_ids,
                                                            layout.t_row_indices, geo, list(x.shape[2:])))
    for bias_grad in (False, True):
        torch.library.opcheck(ops.conv_grad_weight_cpu.default,
                              (dy, x, layout.row_indices, layout.col_indices, geo, bias_grad))


@pytest.fixture
def measured(monkeypatch):
    """The floor rule on, with a clock on which the kernels' calls take ``cost["cpu"]`` and
    the composite's 1 (the rule measures alternately, the kernels first)."""
    cost, now, calls = {"cpu": 1.0}, [0.0], [0]

    def clock():
        calls[0] += 1
        if calls[0] % 2 == 0:   # the end of a timed call: cpu, composite, cpu, ...
            now[0] += cost["cpu"] if calls[0] % 4 == 2 else 1.0
        return now[0]

    floor.reset_floor()
    monkeypatch.setattr(floor, "_mode", "measure")
    monkeypatch.setattr(floor, "_clock", clock)
    yield cost
    floor.reset_floor()


def _layout(mask, like):
    return type(like).from_block_mask(mask, like.shape, like.block_size)


def _decided(product):
    return {key[-1][1:]: choice for key, choice in floor.floor_decisions().items() if key[0] == product}


@needs_cpu
@pytest.mark.parametrize("kernel_cost,winner", [(2.0, "reference"), (0.5, "cpu")])
def test_floor_rule_measures_conv_calls_and_keeps_the_faster(measured, kernel_cost, winner):
    measured["cpu"] = kernel_cost
    x, values, layout, geometry, bias = conv_case("valid-non-square", torch.float32)   # density 1
    x = x.contiguous(memory_format=torch.channels_last)
    want = conv_case_reference(x, values, layout, geometry, bias)
    for _ in range(2 * SAMPLES + 1):
        torch.testing.assert_close(sparse_conv2d(x, values, layout, geometry, bias), want)
    assert list(_decided("conv_forward").values()) == [winner]


@needs_cpu
def test_conv_calls_decided_without_measuring(measured):
    measured["cpu"] = 100.0   # the clock would send every measured call to the composite
    x, values, layout, geometry, bias = conv_case("wide-blocks", torch.float32)   # 40 -> 36, block 16, 3x3
    mask = torch.zeros_like(layout.block_mask)
    mask[0, 1] = True   # effective density 16² / (36 * 40) = 0.18: a sure win
    quarter = _layout(mask, layout)
    values = values[:1].contiguous().requires_grad_()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    sparse_conv2d(x, values, quarter, geometry, bias).sum().backward()
    assert set(_decided("conv_forward").values()) == set(_decided("conv_grads").values()) == {"cpu"}
    floor.reset_floor()
    one_pixel = x.detach()[:, :, :1, :1]   # 1 x 1 images: the composite, surely
    sparse_conv2d(one_pixel, values.detach(), quarter, geometry, bias)
    assert set(_decided("conv_forward").values()) == {"reference"}


@needs_cpu
@pytest.mark.parametrize("dtype,native_fp16", [(torch.bfloat16, False), (torch.float16, True)], ids=str)
def test_half_precision_conv_calls_are_measured_where_the_cpu_has_half_arithmetic(measured, dtype, native_fp16,
                                                                                  monkeypatch):
    # The kernels widen half types to fp32; a CPU's native half-precision conv (oneDNN on AMX or
    # AVX512-FP16) can beat them at a quarter of the work, so no sure win there.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_fp16": native_fp16}, raising=False)
    measured["cpu"] = 100.0
    x, values, layout, geometry, bias = conv_case("wide-blocks", torch.float32)
    mask = torch.zeros_like(layout.block_mask)
    mask[0, 1] = True   # effective density 0.18: a sure win in fp32 (above)
    x = x.contiguous(memory_format=torch.channels_last).to(dtype)
    sparse_conv2d(x, values[:1].to(dtype).contiguous(), _layout(mask, layout), geometry, bias.to(dtype))
    assert list(_decided("conv_forward").values()) == ["measuring"]


@needs_cpu
def test_fp16_conv_calls_run_the_kernel_unmeasured_where_the_cpu_lacks_fp16_arithmetic(measured, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_fp16": False, "amx_fp16": False},
                        raising=False)
    measured["cpu"] = 100.0   # the clock would pick the composite
    x, values, layout, geometry, bias = conv_case("wide-blocks", torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).half()
    sparse_conv2d(x, values.half(), layout, geometry, bias.half())
    assert list(_decided("conv_forward").values()) == ["cpu"]


@needs_cpu
@pytest.mark.filterwarnings("ignore:.*store no block")
@pytest.mark.parametrize("in_channels,kernel,density,decision", [
    (32, 3, 0.0, "cpu"),          # no stored block: the kernels only write the bias, a sure win
    (32, 1, 0.125, "measuring"),  # one block: 4 multiply-adds per input element; the composite's are 32
    (4, 1, 1.0, "reference"),     # the dense conv itself does 4 per input element: a sure loss
])
def test_low_density_alone_never_sends_a_call_to_the_composite(measured, in_channels, kernel, density, decision):
    layer = sk.SparseConv2d(in_channels, 64, kernel, padding=kernel // 2, block_size=16, density=density)
    x = torch.randn(2, in_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    y = sparse_conv2d(x, layer.values.detach(), layer.layout(), layer.geometry, layer.bias.detach())
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, layer.dense_weight().detach(), layer.bias.detach(),
                                                             padding=kernel // 2))
    assert list(_decided("conv_forward").values()) == [decision]


@needs_cpu
def test_input_gradient_density_decides_alike_at_any_stride(measured):
    # dX runs by stride phases (no stride-dilated copy): its work is the layout's, whatever the stride.
    x, values, layout, geometry, bias = conv_case("stride2", torch.float32)   # 10 -> 13, block 4, stride 2
    dy = output_gradient(x, geometry).float()
    decisions = []
    for nnz in (1, 3):   # density 16 / 130 (2 sixteenths: a sure win), then 48 / 130 (measured)
        mask = torch.zeros_like(layout.block_mask)
        mask.view(-1)[:nnz] = True
        sparse = _layout(mask, layout)
        conv_op._grad_input(dy, values[:nnz].contiguous(), conv_op._flat(sparse), geometry.as_list(),
                            list(x.shape[2:]), None)
        decisions += _decided("conv_grad_input").values()
    assert decisions == ["cpu", "cpu", "measuring"]


def _step(x, values, bias, layout, geometry, dy):
    """One layer step; (y, dx, dvalues, dbias)."""
    for t in (x, values, bias):
        t.grad = None
    y = sparse_conv2d(x, values, layout, geometry, bias)
    y.backward(dy)
    return y.detach(), x.grad, values.grad, bias.grad


def _custom_op_ran(y_grad_fn):
    return "conv2d" in type(y_grad_fn).__name__


@needs_cpu
@pytest.mark.parametrize("name", ["valid-non-square", "same-even-kernel"])
def test_calls_settled_on_the_composite_run_plain_autograd(measured, name):
    measured["cpu"] = 2.0   # the composite wins every measurement
    x, values, layout, geometry, bias = conv_case(name, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    values, bias = values.requires_grad_(), bias.requires_grad_()
    dy = output_gradient(x.detach(), geometry).contiguous(memory_format=torch.channels_last)
    for _ in range(2 * SAMPLES):   # the rule measures the forward and conv_grads, then keeps the composite
        _step(x, values, bias, layout, geometry, dy)
    assert set(_decided("conv_forward").values()) == set(_decided("conv_grads").values()) == {"reference"}
    assert not _custom_op_ran(sparse_conv2d(x, values, layout, geometry, bias).grad_fn)
    got = _step(x, values, bias, layout, geometry, dy)
    with sk.use_backend("reference"):   # the ops' composite, as forced (a forced backend runs the ops)
        assert _custom_op_ran(sparse_conv2d(x, values, layout, geometry, bias).grad_fn)
        want = _step(x, values, bias, layout, geometry, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.use_deterministic_algorithms(True)
    try:   # deterministic: the kernels, through the ops
        assert _custom_op_ran(sparse_conv2d(x, values, layout, geometry, bias).grad_fn)
    finally:
        torch.use_deterministic_algorithms(False)


@needs_cpu
def test_a_backward_not_yet_settled_keeps_the_ops(measured, monkeypatch):
    measured["cpu"] = 2.0
    x, values, layout, geometry, bias = conv_case("valid-non-square", torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2 * SAMPLES):
            sparse_conv2d(x, values, layout, geometry, bias)
    assert set(_decided("conv_forward").values()) == {"reference"} and not _decided("conv_grads")
    y = sparse_conv2d(x, values.requires_grad_(), layout, geometry, bias)
    assert _custom_op_ran(y.grad_fn)   # dW still to be measured: through the ops

    want = conv_case_reference(x, values.detach(), layout, geometry, bias)

    def no_op(*args):
        raise AssertionError("the custom op ran")
    monkeypatch.setattr(conv_op, "_conv2d", no_op)
    with torch.no_grad():   # inference needs the forward's decision only
        torch.testing.assert_close(sparse_conv2d(x, values, layout, geometry, bias), want)


def conv_case_reference(x, values, layout, geometry, bias):
    with sk.use_backend("reference"):
        return sparse_conv2d(x, values, layout, geometry, bias)


def test_boundary_errors_name_the_offending_value():
    x, values, layout, geometry, bias = conv_case("3x3-uneven-channels", torch.float32)
    with pytest.raises(ValueError, match="has 11 channels"):
        sparse_conv2d(torch.randn(2, 11, 5, 6), values, layout, geometry)
    with pytest.raises(ValueError, match=r"4-D .* got shape \(10, 5, 6\)"):
        sparse_conv2d(x[0], values, layout, geometry)
    with pytest.raises(TypeError, match="torch.float64 but the weight has dtype torch.float32"):
        sparse_conv2d(x.double(), values, layout, geometry)
    with pytest.raises(ValueError, match=r"bias has shape \(12,\)"):
        sparse_conv2d(x, values, layout, geometry, bias[:12])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparse_conv2d(torch.randn(1, 10, 1, 6)[:, :, :0], values, layout, geometry)
    with pytest.raises(ValueError, match="values has shape"):
        sparse_conv2d(x, values[1:], layout, geometry)
