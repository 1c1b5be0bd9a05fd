"""torch.compile traces SparseLinear through the sparsekern custom ops without graph breaks.

fullgraph=True fails on any graph break, so these tests prove the op is one traced
node; the compiled model must match eager in the output and every gradient.
"""
import importlib

import pytest
import torch
from torch import nn

import sparsekern as sk
from helpers import output_and_grads


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = sk.SparseLinear(40, 48, block_size=16, density=0.5)
        self.fc2 = sk.SparseLinear(48, 24, bias=False, block_size=(8, 16), density=0.6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
def test_compiled_model_matches_eager_without_graph_breaks(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(2, 5, 40)
    with sk.use_backend(backend):
        y_eager, grads_eager = output_and_grads(model, x)
        y_compiled, grads_compiled = output_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(y_compiled, y_eager)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want)


def test_grad_probe_traces_without_graph_breaks():
    torch._dynamo.reset()
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(32, 48), 16, block_mask=torch.rand(2, 3) < 0.5)
    weight.values.requires_grad_()
    probe = sk.BlockSparseMatrix.from_dense(torch.zeros(32, 48), 16, block_mask=torch.ones(2, 3, dtype=torch.bool))
    probe.values.requires_grad_()
    x = torch.randn(6, 48)

    def step(x):
        return sk.ops.bsr_linear(x, weight, grad_probe=probe).sum()

    torch.compile(step, fullgraph=True, backend="aot_eager")(x).backward()
    compiled = weight.values.grad.clone(), probe.values.grad.clone()
    weight.values.grad = probe.values.grad = None
    step(x).backward()
    torch.testing.assert_close(compiled[0], weight.values.grad)
    torch.testing.assert_close(compiled[1], probe.values.grad)


def test_trace_time_backend_is_marked_like_assume_constant_result():
    # ops.dispatch sets the flag by hand so `import sparsekern` does not import torch._dynamo.
    module = importlib.import_module("sparsekern.ops.dispatch")  # the attribute is the function

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert vars(module.traced_backend) == vars(marked)
