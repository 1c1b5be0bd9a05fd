"""The per-step host path of the layers reads no device value.

On a GPU, ``bool(t)``, ``t.item()``, ``t.tolist()``, ``int(t)`` and ``float(t)`` wait for the
device; a training step that does one per call stalls the queue and cannot be captured in a
CUDA graph. On CPU these reads are spied on (torch.Tensor's methods wrapped) and attributed
to the package's frame that made them; on a GPU, torch's sync debug mode and a CUDA-graph
capture check the same (marked ``gpu``).
"""
import os
import sys

import pytest
import torch

import sparsekern as sk
from helpers import every_layer_kind, relative_error
from sparsekern.methods.dst.scores import install_probe
from sparsekern.methods.dst.semi_probe import SemiProbe
from sparsekern.ops import probe as probe_module

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*output block rows store no block")]

_PACKAGE = os.path.dirname(sk.__file__)
_HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that gathers (file:line, method) of every host read of a tensor's value made
    directly by the package's code outside the kernel backends (ops, nn, formats, methods)."""
    reads = []
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_PACKAGE) and not caller.startswith(os.path.join(_PACKAGE, "kernels")):
                reads.append((f"{os.path.relpath(caller, _PACKAGE)}:{sys._getframe(1).f_lineno}", _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def _steady_reads(model, x, host_reads, steps=2):
    """Host reads of ``steps`` training steps after a warm-up step (caches built)."""
    _step(model, x)
    host_reads.clear()
    for _ in range(steps):
        _step(model, x)
    return list(host_reads)


def test_the_spy_sees_host_reads(host_reads):
    from sparsekern.nn import block_structure
    block_structure.warn_if_crippled(torch.ones(2, 2, dtype=torch.bool), "layer")
    assert any(path.startswith(os.path.join("nn", "block_structure.py")) for path, _ in host_reads)


def test_every_layer_kind_steps_without_host_reads(host_reads):
    torch.manual_seed(0)
    model = every_layer_kind().double()
    assert _steady_reads(model, torch.randn(2, 4, 6, 6, dtype=torch.float64), host_reads) == []


def test_autocast_steps_without_host_reads(host_reads):
    """Under autocast the layers cast their weights (and probes, 2:4 ones included) on every call."""
    torch.manual_seed(0)
    model = every_layer_kind()
    for layer in model:
        if isinstance(layer, (sk.SparseLinear, sk.SparseConv2d)):
            install_probe(layer, torch.ones_like(layer.block_mask))
        elif isinstance(layer, sk.SemiSparseLinear) and layer.mode == "static":
            SemiProbe(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _steady_reads(model, torch.randn(2, 4, 6, 6), host_reads) == []


@pytest.mark.parametrize("probe", ["every-block", "superset"])
def test_probed_layers_step_without_host_reads(probe, host_reads):
    """A probe holding the weight's blocks (every block: dense scores; a superset: Top-KAST's
    F ∪ S) shares its gradient with the weight; whether it holds them is host state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(sk.SparseConv2d(4, 8, 3, block_size=4, density=0.5), torch.nn.Flatten(),
                                sk.SparseLinear(8 * 16, 16, block_size=4, density=0.5)).double()
    for layer in (model[0], model[2]):
        mask = torch.ones_like(layer.block_mask)
        if probe == "superset":
            mask = layer.block_mask.clone()
            mask.view(-1)[(~mask).view(-1).nonzero()[0]] = True
        install_probe(layer, mask)
    assert _steady_reads(model, torch.randn(2, 4, 6, 6, dtype=torch.float64), host_reads) == []


class TestOwnPositions:
    def _weight(self, density=0.5, seed=0):
        torch.manual_seed(seed)
        layer = sk.SparseLinear(32, 32, block_size=8, density=density)
        return layer.sparse_weight()

    def test_decided_once_per_pair_of_layouts(self, host_reads):
        weight, other = self._weight(), self._weight(seed=1).layout
        mask = weight.layout.block_mask.clone()
        mask[0] = True
        probe = sk.BlockSparseMatrix(torch.zeros(int(mask.sum()), 8, 8), sk.BlockLayout.from_block_mask(
            mask, weight.shape, weight.block_size))
        host_reads.clear()
        positions = probe_module.own_positions(probe, weight.layout)
        assert len(host_reads) == 1  # the decision: does the probe hold every block?
        assert torch.equal(probe.layout.block_keys()[positions], weight.layout.block_keys())
        # A new matrix on the same probe layout (autocast's per-call cast): no second look.
        again = sk.BlockSparseMatrix(probe.values.bfloat16(), probe.layout)
        assert probe_module.own_positions(again, weight.layout) is positions
        assert len(host_reads) == 1
        # A new weight layout (a structure change): decided again.
        probe_module.own_positions(probe, other)
        assert len(host_reads) == 2

    def test_a_probe_on_every_block_is_decided_without_a_read(self, host_reads):
        weight = self._weight()
        full = sk.BlockLayout.from_block_mask(torch.ones_like(weight.layout.block_mask), weight.shape,
                                              weight.block_size)
        host_reads.clear()
        positions = probe_module.own_positions(sk.BlockSparseMatrix(torch.zeros(16, 8, 8), full), weight.layout)
        assert host_reads == []
        assert torch.equal(full.block_keys()[positions], weight.layout.block_keys())

    def test_a_probe_missing_blocks_shares_nothing(self):
        weight = self._weight()
        mask = weight.layout.block_mask.clone()
        mask.view(-1)[mask.view(-1).nonzero()[0]] = False
        probe = sk.BlockSparseMatrix(torch.zeros(int(mask.sum()), 8, 8),
                                     sk.BlockLayout.from_block_mask(mask, weight.shape, weight.block_size))
        assert probe_module.own_positions(probe, weight.layout) is None
        assert probe_module.own_positions(probe, weight.layout) is None

    def test_the_cache_lets_layouts_go(self):
        import gc
        weight = self._weight()
        full = sk.BlockLayout.from_block_mask(torch.ones_like(weight.layout.block_mask), weight.shape,
                                              weight.block_size)
        probe_module.own_positions(sk.BlockSparseMatrix(torch.zeros(16, 8, 8), full), weight.layout)
        entries = len(probe_module._positions)
        del full
        gc.collect()
        assert len(probe_module._positions) == entries - 1


# ------------------------------------------------------------------ on a GPU

def _gpu_layer():
    torch.manual_seed(0)
    return sk.SparseLinear(256, 512, block_size=32, density=0.5, device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_probe", [False, True], ids=["plain", "probed"])
def test_gpu_step_makes_no_device_sync(with_probe):
    layer = _gpu_layer()
    if with_probe:
        install_probe(layer, torch.ones_like(layer.block_mask))
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm-up: kernels compiled and tuned, host decisions taken
        layer(x).float().square().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_forward_backward_captures_in_a_cuda_graph():
    layer = _gpu_layer()
    static_x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_dy = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            layer(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(static_dy)

    x, dy = torch.randn_like(static_x), torch.randn_like(static_dy)
    with torch.no_grad():
        static_x.copy_(x)
        static_dy.copy_(dy)
    graph.replay()
    torch.cuda.synchronize()

    w = layer.dense_weight().detach().double()
    want_y = x.double() @ w.T + layer.bias.detach().double()
    assert relative_error(static_y, want_y) < 2e-2
    assert relative_error(static_x.grad, dy.double() @ w) < 2e-2
    want_dw = sk.BlockSparseMatrix.from_dense(dy.double().T @ x.double(), layer.block_size,
                                              block_mask=layer.block_mask).values
    assert relative_error(layer.values.grad, want_dw) < 2e-2
    assert relative_error(layer.bias.grad, dy.double().sum(0)) < 2e-2
