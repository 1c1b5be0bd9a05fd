"""The CUDA 2:4 products keep a static weight's compressed operand across calls.

What is cached, and when it is rebuilt, is plain Python: on CPU the products run with
torch's semi-structured conversion stubbed (it counts its calls and returns the dense
weight, so ``F.linear`` computes the same product) and the sparse tensor cores reported
present. The real conversion runs in the tests marked ``gpu``.
"""
import gc

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from helpers import TOLERANCES
from sparsekern.formats.semi import decompress
from sparsekern.formats.semi_prune import prune_2to4
from sparsekern.kernels.semi import cuda

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def conversions(monkeypatch):
    """The list of weights handed to torch's conversion (stubbed)."""
    seen = []

    def convert(dense):
        seen.append(dense)
        return dense

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert, raising=False)
    monkeypatch.setattr(cuda, "_sparse_tensor_cores", lambda device, dtype, rows, cols: True)
    return seen


def _layer(seed=0, transposable=True):
    torch.manual_seed(seed)
    return sk.SemiSparseLinear(16, 8, transposable=transposable, dtype=torch.float64)


def _forward(layer, x):
    return cuda.semi_forward(x, layer.values, layer.indices)


def _grad_input(layer, dy):
    weight = layer.sparse_weight()
    return cuda.semi_grad_input(dy, layer.values, layer.indices, layer.indices_t, weight.transpose_map())


def _dense(layer):
    return decompress(layer.values.detach(), layer.indices, layer.in_features)


def test_a_static_weight_is_compressed_once(conversions):
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    assert len(conversions) == 1


def test_a_value_update_recompresses(conversions):
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    _forward(layer, x)
    with torch.no_grad():
        layer.values.mul_(2)  # an optimizer step: in place, a new version
    torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    assert len(conversions) == 2
    layer.values.data = layer.values.detach() + 1  # .data swapped: another storage, same version
    torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    assert len(conversions) == 3


def test_a_mask_change_recompresses(conversions):
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    _forward(layer, x)
    dense = torch.randn(8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layer.set_mask(prune_2to4(dense, transposable=True))  # new index tensors
    torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    assert len(conversions) == 2
    with torch.no_grad():  # indices written in place (load_state_dict copies into the buffer)
        layer.indices.copy_(_layer(seed=3).indices)
    torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    assert len(conversions) == 3


def test_the_transposed_operand_is_cached_apart(conversions):
    layer, dy = _layer(), torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(_grad_input(layer, dy), dy @ _dense(layer))
        _forward(layer, x)
    assert len(conversions) == 2  # one of Wᵀ, one of W
    with torch.no_grad():
        layer.values.add_(1)
    torch.testing.assert_close(_grad_input(layer, dy), dy @ _dense(layer))
    assert len(conversions) == 3


def test_transient_values_are_not_cached(conversions):
    """The dynamic layer's fresh compression and autocast's cast are new tensors every call."""
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    plain = layer.values.detach().clone()
    cast = layer.values * 1  # a non-leaf, as a differentiable cast
    for _ in range(2):
        torch.testing.assert_close(cuda.semi_forward(x, plain, layer.indices), x @ _dense(layer).T)
        cuda.semi_forward(x, cast, layer.indices)
    assert len(conversions) == 4
    assert plain not in cuda._FORWARD and cast not in cuda._FORWARD


def test_a_frozen_parameter_is_cached(conversions):
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    layer.requires_grad_(False)
    for _ in range(2):
        _forward(layer, x)
    assert len(conversions) == 1


def test_the_operand_goes_with_the_weight(conversions):
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    _forward(layer, x)
    _grad_input(layer, torch.randn(5, 8, dtype=torch.float64))
    assert layer.values in cuda._FORWARD and layer.values in cuda._TRANSPOSED
    before = len(cuda._FORWARD), len(cuda._TRANSPOSED)
    del layer
    gc.collect()
    assert (len(cuda._FORWARD), len(cuda._TRANSPOSED)) == (before[0] - 1, before[1] - 1)


def test_the_dense_fallback_converts_nothing(conversions, monkeypatch):
    monkeypatch.setattr(cuda, "_sparse_tensor_cores", lambda device, dtype, rows, cols: False)
    layer, x = _layer(), torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(_forward(layer, x), x @ _dense(layer).T)
    dy = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(_grad_input(layer, dy), dy @ _dense(layer))
    assert conversions == []


def test_rowwise_grad_input_is_dense(conversions):
    layer, dy = _layer(transposable=False), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(cuda.semi_grad_input(dy, layer.values, layer.indices), dy @ _dense(layer))
    assert conversions == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_training_and_a_mask_change_never_use_a_stale_operand(dtype):
    """SGD steps and a mask change between calls: every forward and dX matches the dense
    product on the current weight (a stale cached operand would not)."""
    torch.manual_seed(0)
    layer = sk.SemiSparseLinear(256, 128, device="cuda", dtype=dtype)
    # A loss linear in y (y · dy): every step moves each weight by lr x (dyᵀx), about 0.1 next
    # to initial weights of 0.06, without the growth a quadratic loss would compound.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    dy = torch.randn(64, 128, device="cuda", dtype=dtype)
    tol = TOLERANCES[dtype]
    for step in range(4):
        if step == 2:
            dense = torch.randn(128, 256, device="cuda", dtype=dtype)
            layer.set_mask(prune_2to4(dense, transposable=True))
        xg = x.clone().requires_grad_(True)
        x_ref = x.clone().requires_grad_(True)
        y = layer(xg)
        y_ref = F.linear(x_ref, layer.dense_weight().detach(), layer.bias.detach())
        torch.testing.assert_close(y, y_ref, **tol)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(xg.grad, x_ref.grad, **tol)
        optimizer.step()
        optimizer.zero_grad()
    assert layer.values in cuda._FORWARD and layer.values in cuda._TRANSPOSED
