"""torch.compile traces SemiSparseLinear (static and dynamic) through the sparsekern
custom ops without graph breaks (fullgraph=True), matching eager in the output and
every gradient; the ops' fake implementations give the real output shapes."""
import importlib

import pytest
import torch
from torch import nn

import sparsekern as sk
from helpers import output_and_grads

semi_ops = importlib.import_module("sparsekern.ops.semi_linear")


class _Model(nn.Module):
    def __init__(self, mode, transposable):
        super().__init__()
        self.fc1 = sk.SemiSparseLinear(40, 48, transposable=transposable, mode=mode)
        self.fc2 = sk.SemiSparseLinear(48, 24, bias=False, transposable=transposable, mode=mode)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
def test_compiled_model_matches_eager_without_graph_breaks(mode, transposable):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model(mode, transposable)
    x = torch.randn(2, 5, 40)
    y_eager, grads_eager = output_and_grads(model, x)
    y_compiled, grads_compiled = output_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(y_compiled, y_eager)
    assert len(grads_compiled) == len(grads_eager)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
def test_fake_shapes_match_real_outputs(transposable):
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight = torch.randn(24, 40)
    x, dy = torch.randn(7, 40), torch.randn(7, 24)
    real = semi_ops._linear_dynamic(x, weight, None, transposable, None)
    values, indices = real[1], real[2]
    real_grads = (semi_ops._grad_weight(dy, x, indices, None), semi_ops._grad_input(dy, values, indices, None, None, None))
    with FakeTensorMode() as mode:
        fx, fw, fdy = (mode.from_tensor(t) for t in (x, weight, dy))
        fake = semi_ops._linear_dynamic(fx, fw, None, transposable, None)
        fake_grads = (semi_ops._grad_weight(fdy, fx, fake[2], None),
                      semi_ops._grad_input(fdy, fake[1], fake[2], None, None, None))
    for got, want in zip((*fake, *fake_grads), (*real, *real_grads)):
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype)
