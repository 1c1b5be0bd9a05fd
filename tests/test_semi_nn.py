"""SemiSparseLinear: drop-in behaviour in both modes, training, state_dict, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk

from helpers import TOLERANCES


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_from_dense_matches_masked_linear(mode, transposable, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(24, 12).to(dtype)
    layer = sk.SemiSparseLinear.from_dense(linear, transposable=transposable, mode=mode)
    mask = sk.prune_2to4(linear.weight.detach(), transposable=transposable)
    assert torch.equal(layer.mask, mask)
    assert torch.equal(layer.dense_weight().detach(), linear.weight.detach() * mask)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, linear.weight.detach() * mask, linear.bias)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad, **tol)
    dense_dw = dy.reshape(-1, 12).T.double() @ x.detach().reshape(-1, 24).double()
    if mode == "static":
        assert layer.values.shape == (12, 12)
        kept = sk.SemiStructuredMatrix.from_dense(dense_dw * mask, mask=mask).values
        torch.testing.assert_close(layer.values.grad.double(), kept, **tol)
    else:
        torch.testing.assert_close(layer.weight.grad.double(), dense_dw, **tol)


def test_static_training_keeps_mask_and_halves_parameters():
    torch.manual_seed(0)
    layer = sk.SemiSparseLinear(32, 16)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 16 + 16
    mask = layer.mask.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.mask, mask)
    assert bool((layer.dense_weight()[~mask] == 0).all())


def test_dynamic_mask_follows_weights():
    layer = sk.SemiSparseLinear(8, 4, mode="dynamic", transposable=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3, 2, 1, 1, 2, 3, 4]] * 4))
    assert layer.mask[0].tolist() == [True, True, False, False, False, False, True, True]
    with torch.no_grad():
        layer.weight[:, 0] = 0.0
    assert layer.mask[0].tolist() == [False, True, True, False, False, False, True, True]


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = sk.SemiSparseLinear(16, 8), sk.SemiSparseLinear(16, 8)
    assert not torch.equal(a.mask, b.mask)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mask, a.mask) and torch.equal(b.dense_weight(), a.dense_weight())
    x = torch.randn(3, 16, requires_grad=True)
    b(x).sum().backward()   # Wᵀ's gather map is rebuilt for the loaded structure
    torch.testing.assert_close(x.grad, torch.ones(3, 8) @ a.dense_weight().detach())


def test_sparse_weight_cached_per_structure():
    layer = sk.SemiSparseLinear(8, 8)
    first = layer.sparse_weight()
    assert first.has_transpose and layer.sparse_weight() is first
    with torch.no_grad():
        layer.values.mul_(2.0)          # optimizer-style in-place update: same structure
    assert layer.sparse_weight() is first
    layer.load_state_dict(sk.SemiSparseLinear(8, 8).state_dict())
    assert layer.sparse_weight() is not first
    assert not sk.SemiSparseLinear(8, 6, transposable=False).sparse_weight().has_transpose


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_features=10, out_features=8), ValueError, r"\(8, 10\)"),
    (dict(in_features=8, out_features=6), ValueError, r"\(6, 8\)"),
    (dict(in_features=8, out_features=8, mode="sometimes"), ValueError, "mode"),
    (dict(in_features=8, out_features=8, dtype=torch.int32), TypeError, "int32"),
    (dict(in_features=0, out_features=8), ValueError, "in_features"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        sk.SemiSparseLinear(**kwargs)


def test_rowwise_allows_any_out_features_and_bad_input():
    layer = sk.SemiSparseLinear(8, 6, transposable=False, bias=False)
    assert layer(torch.randn(2, 8)).shape == (2, 6)
    with pytest.raises(ValueError, match=r"\(2, 7\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="nn.Linear"):
        sk.SemiSparseLinear.from_dense(layer)
    assert "mode='static'" in repr(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_layer_matches_masked_linear(mode, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, device="cuda", dtype=dtype)
    layer = sk.SemiSparseLinear.from_dense(linear, mode=mode)
    x = torch.randn(64, 256, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, layer.dense_weight().detach(), linear.bias.detach())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def _transposable_layer(seed):
    torch.manual_seed(seed)
    return sk.SemiSparseLinear(16, 8, transposable=True)


def test_a_transpose_from_another_layer_is_refused_by_the_matrix_and_by_load_state_dict():
    a, b = _transposable_layer(0), _transposable_layer(1)
    with pytest.raises(ValueError, match="indices_t is not the transpose of indices"):
        sk.SemiStructuredMatrix(a.values.detach(), a.indices, (8, 16), indices_t=b.indices_t)
    mixed = {**a.state_dict(), "indices_t": b.indices_t}
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(RuntimeError, match="bad 2:4 structure.*not the transpose"):
        a.load_state_dict(mixed)
    for key, value in a.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing was copied in
    a.load_state_dict(b.state_dict())  # a consistent pair loads


def test_malformed_indices_are_refused():
    layer = _transposable_layer(0)
    bad = layer.indices.clone()
    bad[0, 0] = 0  # both positions of group 0 at 0
    with pytest.raises(ValueError, match="group 0 of row 0 does not hold two distinct ascending positions"):
        sk.SemiStructuredMatrix(layer.values.detach(), bad, (8, 16))


def test_backward_across_set_mask_is_refused_and_0d_input_gets_a_clear_error():
    layer = _transposable_layer(0)
    loss = layer(torch.randn(3, 16)).sum()
    layer.set_mask(sk.prune_2to4(torch.randn(8, 16), transposable=True))
    with pytest.raises(RuntimeError, match="replaced or modified in place before the backward"):
        loss.backward()
    with pytest.raises(ValueError, match=r"input has shape \(\), expected last dim 16"):
        layer(torch.tensor(1.0))


def test_meta_device_is_refused_in_static_mode_only():
    with pytest.raises(ValueError, match=r"SemiSparseLinear \(static mode\) cannot be built on the meta device"):
        sk.SemiSparseLinear(64, 48, device="meta")
    layer = sk.SemiSparseLinear(64, 48, mode="dynamic", device="meta")  # a dense master weight: no stored structure
    assert layer.weight.device.type == "meta"
    layer.to_empty(device="cpu")
    assert layer(torch.randn(2, 64)).shape == (2, 48)
