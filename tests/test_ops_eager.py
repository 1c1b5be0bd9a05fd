"""sparsekern/ops/eager.py: plain eager calls run an op's body under an autograd.Function, every
other call (a TorchDispatchMode, fake tensors) the torch.library custom op; both give the
same output and gradients, for every family."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern.ops.eager import direct

pytestmark = pytest.mark.usefixtures("one_thread")


class _OpLog(TorchDispatchMode):
    """Records the ops dispatched below it (and so sends sparsekern's ops through the custom op)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _layers():
    torch.manual_seed(0)
    mask = torch.rand(5, 3) < 0.5
    mask[torch.arange(5), torch.arange(5) % 3] = True   # a block in every block row
    conv = sk.SparseConv2d.from_dense(torch.nn.Conv2d(12, 20, 3, padding=1).double(), block_size=4, block_mask=mask)
    x_conv = torch.randn(2, 12, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return [
        ("sparsekern.conv2d", conv, x_conv),
        ("sparsekern.bsr_linear", sk.SparseLinear(24, 16, block_size=8, density=0.5).double(),
         torch.randn(5, 24, dtype=torch.float64)),
        ("sparsekern.semi_linear", sk.SemiSparseLinear(24, 16).double(), torch.randn(5, 24, dtype=torch.float64)),
        ("sparsekern.low_rank_linear", sk.LowRankLinear(24, 16, rank=3).double(),
         torch.randn(5, 24, dtype=torch.float64)),
    ]


def _graph(node, names):
    """The names of the autograd nodes ``node`` leads to."""
    if node is not None and type(node).__name__ not in names:
        names.add(type(node).__name__)
        for child, _ in node.next_functions:
            _graph(child, names)
    return names


def _step(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    nodes = " ".join(_graph(y.grad_fn, set()))
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters()], nodes


@pytest.mark.parametrize("op,layer,x", _layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_eager_calls_skip_the_custom_op_and_match_it(op, layer, x):
    eager = _step(layer, x)
    log = _OpLog()
    with log:
        through_op = _step(layer, x)
    assert op + ".default" in log.ops
    assert "_function" in eager[3] and "_function" not in through_op[3]
    torch.testing.assert_close(eager[:3], through_op[:3], rtol=0, atol=0)


def test_only_plain_tensors_outside_compilation_and_modes_run_directly():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(2, 3)
    assert direct((x, [x], torch.nn.Parameter(x), None, [1, 2]))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not direct((x, [fake]))
    with _OpLog():
        assert not direct((x,))


def test_fake_tensors_go_through_the_custom_ops_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = sk.SparseLinear(24, 16, block_size=8, density=0.5)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(torch.empty(5, 24))
    assert y.shape == (5, 16) and type(y) is not torch.Tensor
