"""The conv products of every backend the machine runs (reference, C++ cpu on the run-time
microkernel and on the forced portable one) against the dense masked computation, on
awkward geometries, every dtype and both memory formats; and the C++ ops' refusal of
malformed metadata."""
import pytest
import torch
import torch.nn.functional as F

from test_conv_cases import CASES, conv_case, output_gradient
from helpers import microkernel_paths, on_path, relative_error
from sparsekern import BlockLayout
from sparsekern.cli.machine import cpu_flags
from sparsekern.kernels import microkernel
from sparsekern.kernels.conv import ConvGeometry, cpu, dense_conv_weight, gather_blocks, reference

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
_REASON = cpu.unavailable(CPU, torch.float32)
needs_cpu = pytest.mark.skipif(_REASON is not None, reason=f"conv cpu backend not built: {_REASON}")
# Relative error (norm) bounds against the fp64 dense computation.
BOUNDS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


_PATHS = microkernel_paths() if _REASON is None else [pytest.param(None, id="cpu")]


@pytest.fixture(params=[pytest.param("reference", id="reference")] + _PATHS)
def backend(request):
    """The products of one backend; the cpu backend on every microkernel path this CPU can check."""
    if request.param == "reference":
        yield reference
        return
    if _REASON is not None:
        pytest.skip(f"conv cpu backend not built: {_REASON}")
    with on_path("conv", request.param):
        yield cpu


def _dense_products(x, values, layout, geometry, bias, dy):
    """(y, dx, dvalues) from F.conv2d's autograd in fp64 on the dense masked weight."""
    x64 = x.double().requires_grad_()
    w = dense_conv_weight(values.double(), layout, geometry).detach().requires_grad_()
    t, b, l, r = geometry.padding
    y = F.conv2d(F.pad(x64, (l, r, t, b)), w, bias.double(), geometry.stride, 0, geometry.dilation, geometry.groups)
    dx, dw = torch.autograd.grad(y, (x64, w), dy.double()) if y.numel() else (torch.zeros_like(x64),
                                                                              torch.zeros_like(w))
    return y, dx, gather_blocks(dw, layout, geometry)


def _check(actual, expected, dtype):
    assert actual.shape == expected.shape and actual.dtype == dtype
    if expected.numel():
        assert relative_error(actual, expected) < BOUNDS[dtype]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_products_match_dense_fp64(backend, name, channels_last):
    _run(backend, name, torch.float64, channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["3x3-uneven-channels", "groups2-stride1x2", "wide-blocks"])
def test_products_match_dense_low_precision(backend, name, dtype):
    _run(backend, name, dtype, True)


def _run(backend, name, dtype, channels_last):
    x, values, layout, geometry, bias = conv_case(name, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    dy = output_gradient(x, geometry).contiguous(memory_format=fmt)
    y_ref, dx_ref, dw_ref = _dense_products(x, values, layout, geometry, bias, dy)
    y = backend.conv_forward(x, values, layout, geometry, bias)
    dx = backend.conv_grad_input(dy, values, layout, geometry, tuple(x.shape[2:]))
    dw, no_db = backend.conv_grad_weight(dy, x, layout, geometry)
    _check(y, y_ref, dtype)
    _check(dx, dx_ref, dtype)
    _check(dw, dw_ref, dtype)
    assert no_db is None
    db_ref = dy.double().sum((0, 2, 3))
    dw_with, db = backend.conv_grad_weight(dy, x, layout, geometry, bias_grad=True)
    _check(dw_with, dw_ref, dtype)
    _check(db, db_ref, dtype)
    _check(backend.conv_grads(dy, x, values, layout, geometry, bias_grad=True)[2], db_ref, dtype)
    unambiguous = x.shape[0] > 0
    if unambiguous:  # memory format as F.conv2d's for that input
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def test_unstored_blocks_are_absent_not_zero(backend):
    """A non-finite input channel reaches only the output channels a stored block connects it
    to (docs/design.md); the reference, dense on explicit zeros, spreads it to every output."""
    geometry = ConvGeometry(16, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8)
    layout = BlockLayout.from_block_mask(torch.tensor([[True, False], [False, True]]), (16, 16), (8, 8))
    values = torch.randn(2, 8, 8, 3, 3)
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    x[:, 12] = float("nan")  # a channel of input block 1, which only output block 1 reads
    y = backend.conv_forward(x, values, layout, geometry)
    assert torch.isnan(y[:, 8:]).all()
    assert torch.isnan(y[:, :8]).all() if backend is reference else torch.isfinite(y[:, :8]).all()


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_gives_both_gradients_and_the_bias_at_once(backend, name, channels_last):
    """conv_grads: the composite's one dense backward (the bias gradient inside it, as
    nn.Conv2d's), the cpu kernels' dX and dW (the bias summed on dW's pass over dY)."""
    x, values, layout, geometry, bias = conv_case(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    dy = output_gradient(x, geometry).contiguous(memory_format=fmt)
    _, dx_ref, dw_ref = _dense_products(x, values, layout, geometry, bias, dy)
    assert backend.conv_grads(dy, x, values, layout, geometry)[2] is None
    dx, dw, db = backend.conv_grads(dy, x, values, layout, geometry, bias_grad=True)
    _check(dx, dx_ref, torch.float64)
    _check(dw, dw_ref, torch.float64)
    _check(db, dy.sum((0, 2, 3)), torch.float64)
    assert x.shape[0] == 0 or dx.is_contiguous(memory_format=fmt)


@needs_cpu
def test_cpu_microkernel_switch():
    best = microkernel.microkernel_isa("conv")
    avx512 = "avx512f+avx512_bf16" if cpu_flags()["avx512_bf16"] else "avx512f"  # bf16 on dot products
    assert best == {"amx": "avx512f+amx", "avx512": avx512, "avx2": "avx2-fma",
                    "portable": "portable"}[microkernel.cpu_isa()]
    for name, portable_loops, runs in [("portable", False, "portable"), ("avx512", True, "portable-wide")]:
        microkernel.set_isa("conv", name, portable_loops)
        assert microkernel.microkernel_isa("conv") == runs
    microkernel.set_isa("conv", None)
    assert microkernel.microkernel_isa("conv") == best


@needs_cpu
@pytest.mark.parametrize("field, value, message", [
    ("col_indices", 99, "col_indices"),
    ("col_indices", -1, "col_indices"),
    ("row_offsets", None, "row_offsets"),
])
def test_cpu_refuses_malformed_metadata(field, value, message):
    x, values, layout, geometry, bias = conv_case("3x3-uneven-channels")
    row_offsets, col_indices = layout.row_offsets.clone(), layout.col_indices.clone()
    if field == "col_indices":
        col_indices[0] = value
    else:
        row_offsets[1] = row_offsets[2] + 1  # not monotone
    with pytest.raises(RuntimeError, match=message):
        cpu.ops().conv_forward_cpu(x, values, row_offsets, col_indices, geometry.as_list(), bias)


@needs_cpu
def test_cpu_refuses_bad_transpose_metadata_and_geometry():
    x, values, layout, geometry, _ = conv_case("3x3-uneven-channels")
    dy = output_gradient(x, geometry)
    ids = layout.t_block_ids.clone()
    ids[0] = values.shape[0]
    with pytest.raises(RuntimeError, match="t_block_ids"):
        cpu.ops().conv_grad_input_cpu(dy, values, layout.col_offsets, ids, layout.t_row_indices,
                                      geometry.as_list(), list(x.shape[2:]))
    rows = layout.row_indices.clone()
    rows[-1] = 1000
    with pytest.raises(RuntimeError, match="row_indices"):
        cpu.ops().conv_grad_weight_cpu(dy, x, rows, layout.col_indices, geometry.as_list())
    straddling = geometry.as_list()
    straddling[:3] = [10, 26, 2]  # 13 output channels per group, blocks of 4: a block row would span groups
    with pytest.raises(RuntimeError, match="multiple of the block size"):
        cpu.ops().conv_forward_cpu(x, values, layout.row_offsets, layout.col_indices, straddling, None)
