"""SparseConv2d under torch.compile(fullgraph=True): the conv ops trace as graph nodes (no graph
break) and the compiled forward and backward match eager."""
import warnings

import pytest
import torch

import sparsekern as sk

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_layer_matches_eager():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = sk.SparseConv2d(32, 32, 3, padding=1, block_size=16, density=0.5)
    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = x.grad.clone(), layer.values.grad.clone()
    x.grad, layer.values.grad = None, None
    y_eager = layer(x)
    y_eager.square().sum().backward()
    assert torch.allclose(y, y_eager, atol=1e-5)
    assert torch.allclose(grads[0], x.grad, atol=1e-5) and torch.allclose(grads[1], layer.values.grad, atol=1e-4)
