"""``sparsify`` on CNNs: nn.Conv2d becomes SparseConv2d (channel blocks with all their taps),
ERK counts the kernel dims, convolutions that blocks do not fit stay dense with a warning."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import erk_densities, expand_block_mask

METHODS = ["uniform", "er", "erk", "random", "magnitude", "snip", "grasp", "synflow"]


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),               # stem: 3 input channels < block 8
        nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU(),    # 24 = 3 blocks of 8
        nn.Conv2d(24, 20, 5, padding="same"), nn.ReLU(),         # 20 channels: edge blocks
        nn.Conv2d(20, 16, 1, groups=2), nn.ReLU(),               # 8 output channels per group
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 10, 9, generator=g), torch.randint(0, 10, (6,), generator=g)


def _sparsify(model, **kwargs):
    with pytest.warns(UserWarning, match=r"leaving the convolutions \['0'\] dense"):
        return sk.sparsify(model, **kwargs)


def _masked_forward(dense, sparse, x):
    """The dense model with every converted layer's weight masked to its kept blocks."""
    for d, s in zip(dense, sparse):
        if isinstance(s, sk.SparseConv2d):
            mask = expand_block_mask(s.block_mask, 8, d.weight.shape)
            x = F.conv2d(x, d.weight * mask, d.bias, d.stride, d.padding, d.dilation, d.groups)
        elif isinstance(s, sk.SparseLinear):
            x = F.linear(x, d.weight * expand_block_mask(s.block_mask, 8, d.weight.shape), d.bias)
        else:
            x = d(x)
    return x


@pytest.mark.parametrize("method", METHODS)
def test_convs_become_sparse_conv2d_computing_the_masked_dense_model(method):
    dense = _cnn()
    x, y = _batch()
    model = _sparsify(copy.deepcopy(dense), density=0.4, method=method, block_size=8, inputs=x, targets=y,
                      input_shape=(3, 10, 9), synflow_iterations=5)
    kinds = [type(m).__name__ for m in model if not isinstance(m, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten))]
    assert kinds == ["Conv2d", "SparseConv2d", "SparseConv2d", "SparseConv2d", "SparseLinear"]
    torch.testing.assert_close(model(x), _masked_forward(dense, model, x), rtol=1e-4, atol=1e-5)


def test_erk_counts_the_kernel_dims_and_the_dense_stem():
    model = _sparsify(_cnn(), density=0.3, method="erk", block_size=8)
    shapes = [tuple(m.weight.shape) for m in _cnn() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = erk_densities(shapes, 0.3, dense_layers=[0])
    sparse = [m for m in model if isinstance(m, (sk.SparseConv2d, sk.SparseLinear))]
    for layer, d in zip(sparse, expected[1:]):
        assert layer.nnz_blocks == round(d * layer.block_mask.numel())
    assert expected[1] < expected[3]  # a 3x3 kernel's layer is sparser than the 1x1 one (ERK's kernel term)


def test_the_sparse_cnn_trains_and_densifies_back():
    model = _sparsify(_cnn(), density=0.5, method="erk", block_size=8)
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = model(x)
    dense = sk.densify(model)
    assert not any(isinstance(m, (sk.SparseConv2d, sk.SparseLinear)) for m in dense.modules())
    torch.testing.assert_close(dense(x), out, rtol=1e-4, atol=1e-5)


def test_grouped_conv_whose_groups_split_a_block_stays_dense():
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 12, 3, groups=2))  # 6 outputs per group
    with pytest.warns(UserWarning, match=r"leaving the convolutions \['1'\] dense"):
        sk.sparsify(model, density=0.5, method="erk", block_size=8)
    assert isinstance(model[0], sk.SparseConv2d) and type(model[1]) is nn.Conv2d


def test_conv_with_another_padding_mode_stays_dense_and_says_so():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), nn.Conv2d(16, 16, 3))
    with pytest.warns(UserWarning, match=r"leaving the convolutions \['0'\] dense: their padding_mode"):
        sk.sparsify(model, density=0.5, method="erk", block_size=8)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], sk.SparseConv2d)


def test_listing_the_stem_as_dense_silences_the_warning(recwarn):
    sk.sparsify(_cnn(), density=0.5, method="erk", block_size=8, dense_layers=["0"])
    assert not [w for w in recwarn if "leaving the convolutions" in str(w.message)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="synflow"), r"input_shape=\(C, H, W\)"),
    (dict(method="erk", block_size=(8, 16)), "square block"),
])
def test_conv_specific_errors(kwargs, match):
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 10))
    with pytest.raises(ValueError, match=match):
        sk.sparsify(model, density=0.5, **{"block_size": 8, **kwargs})
