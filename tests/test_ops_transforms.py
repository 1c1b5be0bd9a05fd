"""What the layers do under autograd's and torch's other transforms: block-sparse, static 2:4 and
low-rank layers differentiate twice (gradient penalties, Hessian-vector products), the dynamic
2:4 mode and DLRT's K/L-gradient mode refuse a second backward with a clear error (never a
silently constant gradient), first-order create_graph=True training is unchanged, model.to(memory_format=...)
leaves the stored blocks as they are, and TorchScript tracing is refused by name (torch.func's
transforms: test_ops_func.py)."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern.formats.bsr import BlockSparseMatrix
from sparsekern.formats.semi import SemiStructuredMatrix
from sparsekern.kernels.conv import dense_conv_weight
from sparsekern.nn import PartiallyTrainableConv2d
from sparsekern.ops import BlockProbe

pytestmark = pytest.mark.usefixtures("one_thread")


class _Passthrough(TorchDispatchMode):
    """Sends sparsekern's ops through their torch.library custom ops instead of the eager path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _paths():
    return pytest.mark.parametrize("through_custom_op", [False, True], ids=["eager", "custom_op"])


def _input_gradient_penalty(layer, x):
    """||d sum(tanh(layer(x))) / dx||² + sum(tanh(layer(x))): its gradient needs the layer's
    backward differentiated (with respect to dY, the weights and x)."""
    y = torch.tanh(layer(x)).sum()
    g, = torch.autograd.grad(y, x, create_graph=True)
    return g.square().sum() + y


def _constant_dy_penalty(layer, x):
    """||d sum(layer(x)) / dx||²: the incoming gradient is a constant and only the weights carry
    the graph (what torch's once_differentiable does not guard)."""
    g, = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    return g.square().sum()


PENALTIES = pytest.mark.parametrize("penalty", [_input_gradient_penalty, _constant_dy_penalty])


def _block_sparse_layers():
    torch.manual_seed(0)
    conv_mask = torch.tensor([[True, False, True], [False, True, True]])
    linear = sk.SparseLinear(40, 24, block_size=8, density=0.6).double()
    conv = sk.SparseConv2d.from_dense(nn.Conv2d(12, 8, 3, padding=1, stride=2).double(), block_size=4,
                                      block_mask=conv_mask)
    return [("linear", linear, (5, 40)), ("conv", conv, (2, 12, 7, 6)),
            ("conv_channels_last", conv, (2, 12, 7, 6)),
            ("semi_transposable", sk.SemiSparseLinear(24, 16).double(), (5, 24)),
            ("semi_rowwise", sk.SemiSparseLinear(24, 16, transposable=False).double(), (5, 24))]


def _dense_form(layer, values):
    """``values`` (the layer's stored values or their gradient) as the dense weight, zero elsewhere."""
    if isinstance(layer, sk.SparseLinear):
        return BlockSparseMatrix(values, layer.layout()).to_dense()[:layer.out_features, :layer.in_features]
    if isinstance(layer, sk.SemiSparseLinear):
        return SemiStructuredMatrix(values, layer.indices, (layer.out_features, layer.in_features)).to_dense()
    return dense_conv_weight(values, layer.layout(), layer.geometry)


@PENALTIES
@_paths()
@pytest.mark.parametrize("name,layer,shape", _block_sparse_layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_second_backward_of_block_sparse_layers_matches_dense(name, layer, shape, through_custom_op, penalty):
    """The penalty's gradients equal the dense layer's, the weight's masked to the stored blocks."""
    dense = layer.to_dense()
    x = torch.randn(shape, dtype=torch.float64)
    if name == "conv_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    layer.zero_grad(set_to_none=True)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _Passthrough() if through_custom_op else contextlib.nullcontext():
        penalty(layer, xs).backward()
    penalty(dense, xd).backward()
    stored = _dense_form(layer, torch.ones_like(layer.values)) != 0
    torch.testing.assert_close(_dense_form(layer, layer.values.grad), dense.weight.grad * stored)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)
    zero = torch.zeros_like(x)  # a penalty not reaching x: None on one side, zeros on the other is the same
    torch.testing.assert_close(zero if xs.grad is None else xs.grad, zero if xd.grad is None else xd.grad)


def test_bsr_linear_gradgradcheck_with_and_without_probe():
    torch.manual_seed(1)
    layer = sk.SparseLinear(20, 12, block_size=4, density=0.5).double()
    weight = layer.sparse_weight()
    values = weight.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    probe_layout = sk.BlockLayout.from_block_mask(torch.ones_like(layer.block_mask), weight.shape, weight.block_size)
    probe = torch.zeros(probe_layout.nnz_blocks, 4, 4, dtype=torch.float64, requires_grad=True)

    def plain(x, values, bias):
        return sk.ops.bsr_linear(x, BlockSparseMatrix(values, weight.layout), bias)

    def probed(x, values, bias, probe):
        return sk.ops.bsr_linear(x, BlockSparseMatrix(values, weight.layout), bias,
                                 grad_probe=BlockSparseMatrix(probe, probe_layout))

    assert torch.autograd.gradgradcheck(plain, (x, values, bias))
    assert torch.autograd.gradgradcheck(probed, (x, values, bias, probe))


@pytest.mark.parametrize("case", ["transposable", "rowwise", "probed"])
def test_semi_linear_gradgradcheck(case):
    torch.manual_seed(3)
    layer = sk.SemiSparseLinear(16, 12, transposable=case != "rowwise").double()
    weight = layer.sparse_weight()
    values = weight.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    probe = SemiStructuredMatrix(torch.zeros_like(values, requires_grad=True), weight.indices.flip(1), weight.shape)

    def f(x, values, bias, *probe_values):
        w = SemiStructuredMatrix(values, weight.indices, weight.shape, indices_t=weight.indices_t)
        grad_probe = SemiStructuredMatrix(probe_values[0], probe.indices, weight.shape) if probe_values else None
        return sk.ops.semi_linear(x, w, bias, grad_probe=grad_probe)

    inputs = (x, values, bias) + ((probe.values,) if case == "probed" else ())
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("conv_args", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                       dict(groups=2, padding=1), dict(kernel_size=1)],
                         ids=["pad1", "stride2", "dilation2", "groups2", "1x1"])
@pytest.mark.parametrize("probed", [False, True], ids=["plain", "probed"])
def test_sparse_conv2d_gradgradcheck(conv_args, probed):
    torch.manual_seed(2)
    conv_args = {"kernel_size": 3, **conv_args}
    groups = conv_args.get("groups", 1)
    conv = nn.Conv2d(8, 8, **conv_args).double()
    mask = torch.tensor([[True, False], [True, True]])[:, :8 // groups // 4]
    layer = sk.SparseConv2d.from_dense(conv, block_size=4, block_mask=mask)
    layout, geometry = layer.layout(), layer.geometry
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    full = sk.BlockLayout.from_block_mask(torch.ones_like(layer.block_mask), layout.shape, layout.block_size)
    probe = torch.zeros(full.nnz_blocks, *values.shape[1:], dtype=torch.float64, requires_grad=True)
    if probed:
        def f(x, values, bias, probe):
            return sk.ops.sparse_conv2d(x, values, layout, geometry, bias, grad_probe=BlockProbe(probe, full))
        inputs = (x, values, bias, probe)
    else:
        def f(x, values, bias):
            return sk.ops.sparse_conv2d(x, values, layout, geometry, bias)
        inputs = (x, values, bias)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("conv_args", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2)],
                         ids=["pad1", "stride2", "dilation2"])
def test_low_rank_gradgradcheck(conv_args):
    torch.manual_seed(4)
    U, S, V = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in ((12, 3), (3, 3), (10, 3)))
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(sk.ops.low_rank_linear, (x, U, S, V, bias))
    conv = sk.LowRankConv2d(4, 6, 3, rank=2, **conv_args).double()
    params = [p.detach().clone().requires_grad_() for p in (conv.U, conv.S, conv.V, conv.bias)]
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)

    def f(x, U, S, V, bias):
        return torch.func.functional_call(conv, {"U": U, "S": S, "V": V, "bias": bias}, (x,))

    assert torch.autograd.gradgradcheck(f, (x, *params))


def _in_dlrt_mode(layer):
    layer.kl_grads = True
    return layer


def _first_order_layers():
    torch.manual_seed(0)
    return [
        ("sparsekern::semi_linear_dynamic", sk.SemiSparseLinear(24, 16, mode="dynamic"), (5, 24)),
        (r"sparsekern::low_rank_linear in DLRT mode \(kl_grads=True\)",
         _in_dlrt_mode(sk.LowRankLinear(24, 16, rank=3)), (5, 24)),
        (r"LowRankConv2d in DLRT mode \(kl_grads=True\)",
         _in_dlrt_mode(sk.LowRankConv2d(12, 8, 3, rank=2, padding=1)), (2, 12, 5, 6)),
    ]


@PENALTIES
@_paths()
@pytest.mark.parametrize("name,layer,shape", _first_order_layers(), ids=["semi_dynamic", "low_rank_dlrt",
                                                                         "low_rank_conv_dlrt"])
def test_second_backward_of_first_order_modes_is_refused_by_name(name, layer, shape, through_custom_op, penalty):
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with _Passthrough() if through_custom_op else contextlib.nullcontext():
        p = penalty(layer, x)
        with pytest.raises(RuntimeError, match=f"{name} is differentiable once.*gradient penalty"):
            p.backward()


_TWICE = [case for case in _block_sparse_layers() if case[0] != "conv_channels_last"] + [
    ("low_rank", sk.LowRankLinear(24, 16, rank=3), (5, 24)),
    ("low_rank_conv", sk.LowRankConv2d(12, 8, 3, rank=2, padding=1), (2, 12, 5, 6))]
LAYERS = [layer for _, layer, _ in _TWICE] + [layer for _, layer, _ in _first_order_layers()]
SHAPES = [shape for _, _, shape in _TWICE] + [shape for _, _, shape in _first_order_layers()]
IDS = [name for name, _, _ in _TWICE] + ["semi_dynamic", "low_rank_dlrt", "low_rank_conv_dlrt"]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("layer,shape", list(zip(LAYERS, SHAPES)), ids=IDS)
def test_first_order_gradients_unchanged_under_create_graph(layer, shape):
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    grads = []
    for create_graph in (False, True):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward(create_graph=create_graph)
        grads.append([xi.grad.detach()] + [p.grad.detach() for p in layer.parameters()])
    for plain, graphed in zip(*grads):  # the low-rank layers' run on torch's products under create_graph
        torch.testing.assert_close(graphed, plain)


def _cnn():
    torch.manual_seed(1)
    stem = nn.Conv2d(3, 16, 3, padding=1)
    sparse = sk.SparseConv2d(16, 16, 3, padding=1, block_size=8, density=0.5)
    frozen = PartiallyTrainableConv2d(nn.Conv2d(16, 16, 3, padding=1), torch.tensor([[True, False], [False, True]]),
                                      block_size=8)
    low_rank = sk.LowRankConv2d(16, 8, 3, rank=4, padding=1)
    return nn.Sequential(stem, nn.ReLU(), sparse, nn.ReLU(), frozen, nn.ReLU(), low_rank, nn.Flatten(),
                         sk.SparseLinear(8 * 6 * 6, 10, block_size=16, density=0.5))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_module_to_memory_format_keeps_the_block_storage(memory_format):
    model = _cnn()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    converted = model.to(memory_format=memory_format)
    assert converted is model
    for module in model.modules():
        if isinstance(module, sk.SparseConv2d):
            assert module.values.dim() == 5 and module.values.is_contiguous()
    if memory_format == torch.channels_last:
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert model[2].values.grad.shape == model[2].values.shape


def test_module_to_dtype_and_memory_format_together():
    model = _cnn()
    model[2].values.grad = torch.ones_like(model[2].values)
    values = model[2].values
    model.to(torch.float64, memory_format=torch.channels_last)
    assert model[2].values is values  # the Parameter object is kept, as nn.Module.to does
    assert values.dtype == torch.float64 and values.is_contiguous()
    assert values.grad.dtype == torch.float64 and values.grad.shape == values.shape
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert model(x).dtype == torch.float64


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_is_refused_by_name():
    layer = sk.SparseLinear(16, 16, block_size=8)
    with pytest.raises(RuntimeError, match="sparsekern::bsr_linear cannot be traced by torch.jit.trace.*export"):
        torch.jit.trace(layer, (torch.randn(3, 16),))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_second_backward_on_the_triton_kernels(kind):
    """The same penalty on the Triton backend (interpreted on CPU), fp32, against the dense layer."""
    torch.manual_seed(5)
    if kind == "linear":
        layer, x = sk.SparseLinear(32, 32, block_size=16, density=0.5), torch.randn(8, 32)
    else:
        layer = sk.SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1), block_size=16,
                                           block_mask=torch.tensor([[True, False], [True, True]]))
        x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    dense = layer.to_dense()
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with sk.use_backend("triton"):
        _input_gradient_penalty(layer, xs).backward()
    _input_gradient_penalty(dense, xd).backward()
    stored = _dense_form(layer, torch.ones_like(layer.values)) != 0
    torch.testing.assert_close(_dense_form(layer, layer.values.grad), dense.weight.grad * stored, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["linear", "conv", "low_rank"])
def test_gpu_second_backward_matches_dense(kind, monkeypatch):
    """A gradient penalty through each layer on a GPU (the Triton kernels, autotuned) against the
    dense layer: the weights' gradients (masked to the stored blocks) and the input's."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(6)
    if kind == "linear":
        layer, x = sk.SparseLinear(256, 192, block_size=32, density=0.5), torch.randn(64, 256)
    elif kind == "conv":
        layer = sk.SparseConv2d(64, 96, 3, padding=1, block_size=32, density=0.5, bias=False)
        x = torch.randn(4, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    else:
        layer, x = sk.LowRankLinear(256, 192, rank=16), torch.randn(64, 256)
    layer, x = layer.cuda(), x.cuda()
    dense = layer.to_dense()
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    _input_gradient_penalty(layer, xs).backward()
    _input_gradient_penalty(dense, xd).backward()
    if kind != "low_rank":
        stored = _dense_form(layer, torch.ones_like(layer.values)) != 0
        torch.testing.assert_close(_dense_form(layer, layer.values.grad), dense.weight.grad * stored,
                                   rtol=1e-2, atol=1e-3)  # TF32 may be on
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-2, atol=1e-3)
