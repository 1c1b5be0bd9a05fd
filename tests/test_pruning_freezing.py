import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats.bsr import values_to_dense
from sparsekern.methods import PartiallyTrainableLinear, expand_block_mask, freeze, snip_scores


def _layer(seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(13, 10).double()
    mask = torch.tensor([[True, False, False, True], [False, False, True, False], [False, True, False, False]])
    return linear, mask, PartiallyTrainableLinear.from_dense(linear, mask, block_size=4)


def test_forward_equals_dense_and_only_subset_trains():
    linear, mask, layer = _layer()
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), linear(x))
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "delta.values"]
    # Gradients: dX dense, dW only on the trainable blocks, equal to the masked dense dW.
    dy = torch.randn(2, 3, 10, dtype=torch.float64)
    layer(x).backward(dy)
    dx = x.grad.clone()
    x.grad = None
    linear(x).backward(dy)
    torch.testing.assert_close(dx, x.grad)
    assert layer.delta.values.grad.shape[0] == int(mask.sum())
    grad_delta = values_to_dense(layer.delta.values.grad, layer.delta.layout())[:10, :13]
    torch.testing.assert_close(grad_delta, linear.weight.grad * expand_block_mask(mask, 4, (10, 13)))
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad)
    assert layer.frozen_weight.grad is None and not layer.frozen_weight.requires_grad


def test_training_changes_only_trainable_blocks():
    linear, mask, layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x, target = torch.randn(8, 13, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    changed = layer.dense_weight().detach() != linear.weight.detach()
    element_mask = expand_block_mask(mask, 4, (10, 13))
    assert changed.any() and not changed[~element_mask].any()
    torch.testing.assert_close(layer.frozen_weight, linear.weight.detach())


def test_freeze_model_random_and_scored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(6, 20), torch.randint(0, 4, (6,))
    scores = snip_scores(model, x, y, F.cross_entropy)
    expected = model(x)
    for kwargs in (dict(), dict(scores=scores)):
        frozen = freeze(copy.deepcopy(model), density=0.25, block_size=4, dense_layers=("2",), **kwargs)
        assert isinstance(frozen[0], PartiallyTrainableLinear) and isinstance(frozen[2], nn.Linear)
        assert frozen[0].trainable_fraction == pytest.approx(0.25)
        torch.testing.assert_close(frozen(x), expected)
    with pytest.raises(ValueError, match="density"):
        freeze(model, density=2.0)
