"""SparseConv2d under torch.compile(fullgraph=True): the conv ops trace as graph nodes (no graph
break) and the compiled forward and backward match eager."""
import warnings

import pytest
import torch

import sparsekern as sk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("input_grad", [True, False], ids=["with-dx", "first-layer"])
def test_compiled_layer_matches_eager(input_grad):
    """Both backwards: dX with dW and the bias (conv2d_grads), and dW with the bias alone (a
    first layer: conv2d_grad_weight)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = sk.SparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.5)
    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last).requires_grad_(input_grad)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    leaves = ([x] if input_grad else []) + [layer.values, layer.bias]
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    y_eager = layer(x)
    y_eager.square().sum().backward()
    assert torch.allclose(y, y_eager, atol=1e-5)
    for got, leaf in zip(grads, leaves):
        assert torch.allclose(got, leaf.grad, atol=1e-4)
