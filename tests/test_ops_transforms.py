"""What the layers do under autograd's and torch's other transforms: a second backward is refused
with a clear error (never a silently constant gradient), first-order create_graph=True training is
unchanged, model.to(memory_format=...) leaves the stored blocks as they are, and TorchScript
tracing and torch.func transforms are refused by name."""
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern.nn import PartiallyTrainableConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


class _Passthrough(TorchDispatchMode):
    """Sends sparsekern's ops through their torch.library custom ops instead of the eager path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _layers():
    torch.manual_seed(0)
    conv_mask = torch.tensor([[True, False, True], [False, True, True]])
    return [
        ("sparsekern::bsr_linear", sk.SparseLinear(24, 16, block_size=8, density=0.75), (5, 24)),
        ("sparsekern::semi_linear", sk.SemiSparseLinear(24, 16), (5, 24)),
        ("sparsekern::semi_linear_dynamic", sk.SemiSparseLinear(24, 16, mode="dynamic"), (5, 24)),
        ("sparsekern::low_rank_linear", sk.LowRankLinear(24, 16, rank=3), (5, 24)),
        ("sparsekern::conv2d", sk.SparseConv2d.from_dense(nn.Conv2d(12, 8, 3, padding=1), block_size=4,
                                                          block_mask=conv_mask), (2, 12, 5, 6)),
        ("LowRankConv2d", sk.LowRankConv2d(12, 8, 3, rank=2, padding=1), (2, 12, 5, 6)),
    ]


LAYERS = _layers()
IDS = [name for name, _, _ in LAYERS]


def _input_gradient_penalty(layer, shape):
    """||d sum(tanh(layer(x))) / dx||²: its gradient needs the layer's backward differentiated."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(torch.tanh(layer(x)).sum(), x, create_graph=True)
    return g.square().sum()


def _constant_dy_penalty(layer, shape):
    """||d sum(layer(x)) / dx||²: the incoming gradient is a constant and only the weights carry
    the graph (what torch's once_differentiable does not guard)."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    return g.square().sum()


@pytest.mark.parametrize("penalty", [_input_gradient_penalty, _constant_dy_penalty])
@pytest.mark.parametrize("through_custom_op", [False, True], ids=["eager", "custom_op"])
@pytest.mark.parametrize("name,layer,shape", LAYERS, ids=IDS)
def test_second_backward_is_refused_by_name(name, layer, shape, through_custom_op, penalty):
    layer = layer.double()
    with _Passthrough() if through_custom_op else contextlib.nullcontext():
        p = penalty(layer, shape)
        with pytest.raises(RuntimeError, match=f"{name} is differentiable once.*gradient penalty"):
            p.backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name,layer,shape", LAYERS, ids=IDS)
def test_first_order_gradients_unchanged_under_create_graph(name, layer, shape):
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    grads = []
    for create_graph in (False, True):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        layer(xi).square().sum().backward(create_graph=create_graph)
        grads.append([xi.grad.detach()] + [p.grad.detach() for p in layer.parameters()])
    for plain, graphed in zip(*grads):
        torch.testing.assert_close(graphed, plain, rtol=0, atol=0)


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


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_are_refused_by_name(transform):
    layer = sk.SparseLinear(16, 16, block_size=8)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 16)

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi,)).sum()

    run = (lambda: torch.func.grad(loss)(params, x)) if transform == "grad" else (
        lambda: torch.func.vmap(loss, in_dims=(None, 0))(params, x[:, None]))
    with pytest.raises(RuntimeError, match="sparsekern::bsr_linear does not support torch.func transforms"):
        run()
    assert torch.func.functional_call(layer, params, (x,)).shape == (3, 16)
