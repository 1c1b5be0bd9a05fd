"""Freezing on CNNs: PartiallyTrainableConv2d computes the dense convolution, trains only its
channel blocks (all taps) on the mask; freeze converts a CNN's convolutions and head."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import PartiallyTrainableLinear, freeze, snip_scores
from sparsekern.nn import PartiallyTrainableConv2d
from test_pruning_lottery_conv import BS, block_norms, element_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=(1, 2)).double()
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    return conv, mask, PartiallyTrainableConv2d(conv, mask, block_size=BS)


def test_forward_equals_the_dense_conv_and_only_the_masked_blocks_get_a_gradient():
    conv, mask, layer = _layer()
    x = torch.randn(3, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), conv(x))
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "delta.values"]
    dy = torch.randn_like(conv(x))
    layer(x).backward(dy)
    dx = x.grad.clone()
    x.grad = None
    conv(x).backward(dy)
    torch.testing.assert_close(dx, x.grad)
    layout = layer.delta.layout()
    assert layer.delta.values.grad.shape == (int(mask.sum()), BS, BS, 3, 3)
    for r, c, grad in zip(layout.row_indices, layout.col_indices, layer.delta.values.grad):
        torch.testing.assert_close(grad, conv.weight.grad[r * BS:(r + 1) * BS, c * BS:(c + 1) * BS])
    torch.testing.assert_close(layer.bias.grad, conv.bias.grad)
    assert layer.frozen_weight.grad is None and not layer.frozen_weight.requires_grad


def test_training_changes_only_the_trainable_blocks():
    conv, mask, layer = _layer()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    changed = layer.dense_weight().detach() != conv.weight.detach()
    assert changed.any() and not changed[~element_mask(mask, changed.shape)].any()
    torch.testing.assert_close(layer.frozen_weight, conv.weight.detach())
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d and dense.stride == (2, 2) and dense.dilation == (1, 2)
    torch.testing.assert_close(dense(x), layer(x))


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),   # stem: 3 input channels < block 4
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 10, 1, stride=2), nn.ReLU(),   # 10 outputs: an edge block row
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 6))


def test_freeze_converts_the_convolutions_and_the_head_keeping_the_function():
    model = _cnn()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 7, 7, generator=g), torch.randint(0, 6, (6,), generator=g)
    scores = snip_scores(model, x, y, F.cross_entropy)
    expected = model(x)
    for kwargs in (dict(generator=torch.Generator().manual_seed(0)), dict(scores=scores)):
        with pytest.warns(UserWarning, match=r"freeze: leaving the convolutions \['0'\] dense"):
            frozen = freeze(copy.deepcopy(model), density=0.5, block_size=BS, **kwargs)
        assert type(frozen[0]) is nn.Conv2d and isinstance(frozen[8], PartiallyTrainableLinear)
        for i in (2, 4):
            assert isinstance(frozen[i], PartiallyTrainableConv2d)
            assert frozen[i].delta.nnz_blocks == round(0.5 * frozen[i].block_mask.numel())
        torch.testing.assert_close(frozen(x), expected)
    # Scored: each layer trains its blocks of largest SNIP score norm over all taps.
    for i in (2, 4, 8):
        norms = block_norms(scores[f"{i}.weight"]).flatten()
        trainable = frozen[i].block_mask.flatten()
        assert norms[trainable].min() > norms[~trainable].max()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    F.cross_entropy(frozen(x), y).backward()
    opt.step()
    out = frozen(x)
    dense = sk.densify(frozen)
    assert [type(dense[i]) for i in (0, 2, 4, 8)] == [nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Linear]
    torch.testing.assert_close(dense(x), out)


def test_freeze_on_a_cnn_needs_a_square_block():
    with pytest.raises(ValueError, match="square block"):
        freeze(_cnn(), density=0.5, block_size=(4, 8), dense_layers=["0"])
