"""``sparsekern.ops.sparse_conv2d``: fp64 gradcheck on every backend, opcheck of the custom
ops (the autograd op and the compiled kernels), the floor-rule choice of kernel, and the
boundary checks."""
import pytest
import torch

import sparsekern as sk
from test_conv_cases import conv_case, output_gradient
from sparsekern.kernels.conv import cpu, policy
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
    torch.library.opcheck(conv_op._conv2d, (x.requires_grad_(), values.requires_grad_(), bias, flat, geo, backend))
    dy = output_gradient(x.detach(), geometry).contiguous(memory_format=conv_op.output_memory_format(x))
    torch.library.opcheck(conv_op._grad_input, (dy, values.detach(), flat, geo, list(x.shape[2:]), backend))
    torch.library.opcheck(conv_op._grad_weight, (dy, x.detach(), flat, geo, backend))
    torch.library.opcheck(conv_op._grads, (dy, x.detach(), values.detach(), flat, geo, backend))


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
    torch.library.opcheck(ops.conv_grad_weight_cpu.default, (dy, x, layout.row_indices, layout.col_indices, geo))


@needs_cpu
def test_floor_rule_chooses_the_composite_where_kernels_lose():
    x, values, layout, geometry, _ = conv_case("wide-blocks", torch.float32)
    mask = torch.zeros_like(layout.block_mask)
    mask[0, 1] = mask[2, 0] = True  # effective density 2 * 16² / (36 * 40) = 0.36
    layout = type(layout).from_block_mask(mask, layout.shape, layout.block_size)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    pick = lambda product, like, lay=layout, geo=geometry, pixels=256, forced=None: policy.conv_kernel(  # noqa: E731
        product, like, forced, lay, geo, conv_op._channels_last(like), pixels)[0]
    assert pick("conv_forward", nhwc) == "cpu"
    assert pick("conv_grad_input", nhwc) == pick("conv_grad_weight", nhwc) == "cpu"
    assert pick("conv_forward", nhwc, pixels=1) == "reference"  # one-pixel images
    _, _, dense_layout, dense_geometry, _ = conv_case("valid-non-square", torch.float32)
    assert pick("conv_forward", nhwc, dense_layout, dense_geometry) == "reference"  # density 1
    assert pick("conv_grad_input", x, dense_layout, dense_geometry) == "reference"  # density 1, NCHW
    assert pick("conv_grad_weight", nhwc, dense_layout, dense_geometry) == "cpu"
    assert pick("conv_forward", nhwc.to(torch.bfloat16), dense_layout, dense_geometry) == "cpu"  # dense bf16 is slow
    _, _, strided_layout, strided_geometry, _ = conv_case("stride2", torch.float32)
    strided_layout = type(strided_layout).from_block_mask(strided_layout.block_mask & False, strided_layout.shape,
                                                          strided_layout.block_size)
    assert pick("conv_grad_input", nhwc, strided_layout, strided_geometry) == "reference"
    assert pick("conv_forward", x, forced="cpu") == "cpu"  # a forced backend is obeyed


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
