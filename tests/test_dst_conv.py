"""Dynamic sparse training on SparseConv2d layers: the dense-gradient block scores of the conv
probe, every driver restructuring convolutions with their optimizer state, and Top-KAST's and
DPF's shadow blocks trained with the dense weight gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import DPF, GGR, SET, SNFS, RigL, TopKAST
from sparsekern.methods.dst.scores import ScoreProbe
from sparsekern.kernels.conv import gather_blocks
from sparsekern.methods.pruning.masks import block_scores


def _dense_grad_block_rms(layer, xs):
    """Block RMS of the dense weight gradient of sum(layer(x).sum() for x in xs), by autograd."""
    weight = layer.dense_weight().detach().requires_grad_()
    bias = layer.bias.detach()
    loss = sum(F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups).pow(2).sum()
               for x in xs)
    (grad,) = torch.autograd.grad(loss, weight)
    cells = layer.block_size * layer.block_size * layer.kernel_size[0] * layer.kernel_size[1]
    rows, cols = layer.block_mask.shape
    padded = F.pad(grad, (0, 0, 0, 0, 0, cols * layer.block_size - grad.shape[1],
                          0, rows * layer.block_size - grad.shape[0]))
    return block_scores(padded, layer.block_size) / cells ** 0.5


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=12, out_channels=20, kernel_size=3, padding=1),
    dict(in_channels=10, out_channels=16, kernel_size=(3, 2), stride=2, dilation=(1, 2)),
    dict(in_channels=16, out_channels=16, kernel_size=3, padding="same", groups=2),
])
def test_conv_probe_scores_are_the_dense_weight_gradient_block_rms(kwargs):
    torch.manual_seed(0)
    layer = sk.SparseConv2d(**kwargs, block_size=4, density=0.8, dtype=torch.float64)
    probe = ScoreProbe(layer, "gram")  # a convolution always takes the product route
    xs = [torch.randn(3, kwargs["in_channels"], 9, 7, dtype=torch.float64) for _ in range(2)]  # two calls
    sum(layer(x).pow(2).sum() for x in xs).backward()
    torch.testing.assert_close(probe.scores("conv"), _dense_grad_block_rms(layer, xs))
    # The weight's own gradient is read out of the probe's, the bias gradient summed on the
    # probe's pass: the same as without a probe.
    own, own_bias = layer.values.grad.clone(), layer.bias.grad.clone()
    probe.remove()
    assert layer.grad_probe is None and not layer._forward_hooks and not layer._forward_pre_hooks
    layer.values.grad = layer.bias.grad = None
    sum(layer(x).pow(2).sum() for x in xs).backward()
    torch.testing.assert_close(own, layer.values.grad)
    torch.testing.assert_close(own_bias, layer.bias.grad)
    dense = nn.Conv2d(**kwargs, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    sum(dense(x).pow(2).sum() for x in xs).backward()
    torch.testing.assert_close(own_bias, dense.bias.grad)


def test_conv_probe_without_a_backward_says_so():
    layer = sk.SparseConv2d(8, 8, 3, block_size=4)
    probe = ScoreProbe(layer)
    with pytest.raises(RuntimeError, match="no gradient reached the probe of layer 'c'"):
        probe.scores("c")


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(sk.SparseConv2d(8, 16, 3, padding=1, block_size=4), nn.ReLU(),
                         sk.SparseConv2d(16, 24, 3, stride=2, block_size=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), sk.SparseLinear(24, 10, block_size=4))


def _train(model, driver, optimizer, steps):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 8, 9, 9, generator=g), torch.randint(0, 10, (16,), generator=g)
    changes = 0
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        changes += driver.step()
    return changes


@pytest.mark.parametrize("cls", [SET, RigL, SNFS, GGR, TopKAST, DPF])
def test_drivers_restructure_convolutions_with_their_optimizer_state(cls):
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    driver = cls(model, opt, density=0.4, delta=3, t_end=12, seed=0)
    counts = [layer.nnz_blocks for _, layer in driver.layers]
    stored = sum(layer.values.numel() for _, layer in driver.layers)
    before = [layer.block_mask.clone() for _, layer in driver.layers]
    assert _train(model, driver, opt, 13) == 3  # steps 3, 6, 9 (t_end 12)
    if cls is DPF:  # starts dense, reaches the ERK targets at its last update
        for name, layer in driver.layers:
            assert layer.nnz_blocks == round(driver.targets[name] * layer.block_mask.numel())
    elif cls in (SNFS, GGR):  # move weights between layers: a conv block holds 9 linear blocks' weights
        largest = max(layer.values[0].numel() for _, layer in driver.layers)
        assert stored - largest < sum(layer.values.numel() for _, layer in driver.layers) <= stored
    else:
        assert [layer.nnz_blocks for _, layer in driver.layers] == counts
    assert any(not torch.equal(b, layer.block_mask) for b, (_, layer) in zip(before, driver.layers))
    for _, layer in driver.layers:
        state = opt.state[layer.values]
        assert state["exp_avg"].shape == layer.values.shape == state["exp_avg_sq"].shape


def test_rigl_grows_the_conv_blocks_of_largest_dense_gradient(monkeypatch):
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: growth follows the scores alone
    driver = RigL(model, opt, density=0.4, delta=1, t_end=10, alpha=0.5, seed=0)
    seen = []
    grad_scores = driver._grad_scores
    monkeypatch.setattr(driver, "_grad_scores", lambda: seen.append(grad_scores()) or seen[-1])
    conv, old = model[0], model[0].block_mask.clone()
    assert _train(model, driver, opt, 1) == 1
    scores, grown, still_empty = seen[0][0], conv.block_mask & ~old, ~conv.block_mask & ~old
    assert grown.any() and still_empty.any()
    assert scores[grown].min() >= scores[still_empty].max()


def _dense_weight_grads(model, x, y):
    """Autograd's dense weight gradient of every SparseConv2d at the model's masked weights."""
    convs = [m for m in model if isinstance(m, sk.SparseConv2d)]
    weights = [c.dense_weight().detach().requires_grad_() for c in convs]
    h = x
    for module in model:
        if isinstance(module, sk.SparseConv2d):
            w = weights[convs.index(module)]
            h = F.conv2d(h, w, module.bias, module.stride, module.padding, module.dilation, module.groups)
        else:
            h = module(h)
    F.cross_entropy(h, y).backward()
    return [w.grad for w in weights]


@pytest.mark.parametrize("cls, options", [(TopKAST, {"penalty": 0.0}), (DPF, {})], ids=["TopKAST", "DPF"])
def test_shadow_drivers_train_conv_shadow_blocks_with_the_dense_weight_gradient(cls, options):
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = cls(model, opt, density=0.4, delta=2, t_end=20, seed=0, **options)
    assert _train(model, dst, opt, 2) == 1  # the step-2 update moved blocks between F and S
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 8, 9, 9, generator=g), torch.randint(0, 10, (16,), generator=g)
    grads = _dense_weight_grads(model, x, y)
    convs = [(name, layer) for name, layer in dst.layers if isinstance(layer, sk.SparseConv2d)]
    before = {name: dst.shadow[name][0].detach().clone() for name, _ in convs}
    _train(model, dst, opt, 1)  # step 3: no update, every shadow block takes one SGD step
    for (name, layer), grad in zip(convs, grads):
        param, layout = dst.shadow[name]
        assert layout.nnz_blocks > 0 and not bool((layout.block_mask & layer.block_mask).any())
        expected = gather_blocks(grad, layout, layer.geometry)
        torch.testing.assert_close(param.detach(), before[name] - 0.1 * expected)
    assert _train(model, dst, opt, 5) == 3
    for _, layer in dst.layers:
        assert layer.values.shape[0] == layer.nnz_blocks
