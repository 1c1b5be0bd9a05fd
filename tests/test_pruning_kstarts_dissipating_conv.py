"""K-starts and dissipating gradients on CNNs: SparseConv2d candidates and fitness, the relative
change of conv blocks (all taps) and the pruning with its optimizer state, against plain torch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import DissipatingGradients, k_starts, select_fittest
from test_pruning_lottery_conv import BS, block_norms, element_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _make(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),     # stem: 3 input channels < block 4
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 8, 1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 6, (8,), generator=g)


def _train(steps, lr=0.1, optimizer=torch.optim.SGD):
    x, y = _batch()

    def train(model, opt=None):
        opt = opt or optimizer(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt
    return train


SPARSE = (2, 4, 8)  # the converted layers of _make


def test_k_starts_trains_sparse_conv_candidates_and_keeps_the_fittest():
    with pytest.warns(UserWarning, match=r"leaving the convolutions \['0'\] dense"):
        model, report = k_starts(_make, _train(steps=2), k=3, density=0.5, block_size=BS, criterion="both", seed=3)
    assert report["chosen"] == select_fittest(report["magnitude"], report["gradient"], "both")
    assert type(model[0]) is nn.Conv2d and isinstance(model[8], sk.SparseLinear)
    expected = sk.sparsify(_make(), density=0.5, block_size=BS, dense_layers=["0"],
                           generator=torch.Generator().manual_seed(3 + report["chosen"]))
    for i in (2, 4):
        assert isinstance(model[i], sk.SparseConv2d) and torch.equal(model[i].block_mask, expected[i].block_mask)


def test_k_starts_fitness_is_the_mean_over_the_stored_conv_and_linear_weights():
    # One start, one step at lr 0: the accumulated |grad| is that step's |dL/dW| on the kept blocks.
    model, report = k_starts(_make, _train(steps=1, lr=0.0), k=1, density=0.5, block_size=BS, dense_layers=["0"])
    x, y = _batch()
    weights = {i: model[i].dense_weight().detach().requires_grad_() for i in SPARSE}
    h = x
    for i, layer in enumerate(model):
        if i in SPARSE and i < 8:
            h = F.conv2d(h, weights[i], layer.bias, layer.stride, layer.padding)
        elif i == 8:
            h = F.linear(h, weights[i], layer.bias)
        else:
            h = layer(h)
    grads = torch.autograd.grad(F.cross_entropy(h, y), [weights[i] for i in SPARSE])
    masks = [element_mask(model[i].block_mask, weights[i].shape) for i in SPARSE]
    stored = sum(int(m.sum()) for m in masks)  # channel counts are whole blocks: no padding stored
    assert report["magnitude"][0] == pytest.approx(
        sum(float((weights[i].detach() * m).abs().sum()) for i, m in zip(SPARSE, masks)) / stored, rel=1e-5)
    assert report["gradient"][0] == pytest.approx(
        sum(float((g * m).abs().sum()) for g, m in zip(grads, masks)) / stored, rel=1e-5)


def _sparse_cnn():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        sk.SparseConv2d(8, 12, 3, padding=1, block_size=BS), nn.ReLU(),
        sk.SparseConv2d(12, 10, (3, 1), stride=2, block_size=BS, density=0.8), nn.ReLU(),  # edge block row
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), sk.SparseLinear(10, 6, block_size=BS))


def _blocks(layer, tensor):
    """{(block row, block col): the rows of ``tensor`` (shaped like the layer's values)}."""
    layout = layer.layout()
    return {(int(r), int(c)): t for r, c, t in zip(layout.row_indices, layout.col_indices, tensor)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_dissipating_prunes_the_conv_blocks_that_moved_least_and_keeps_their_adam_state(scope):
    model = _sparse_cnn()
    dg = DissipatingGradients(model)
    initial = {i: model[i].dense_weight().detach().clone() for i in (2, 4, 8)}
    opt = _train(steps=3, lr=0.01, optimizer=torch.optim.Adam)(model)
    # Plain torch: relative change of every stored block over all its taps (-1 where none is stored).
    reference = {i: (block_norms(model[i].dense_weight().detach() - initial[i]) / block_norms(initial[i]))
                 .masked_fill(~model[i].block_mask, -1.0) for i in (2, 4, 8)}
    scores = dg.scores()
    for i in (2, 4, 8):
        torch.testing.assert_close(scores[str(i)], reference[i])
    stored = {i: model[i].nnz_blocks for i in (2, 4, 8)}
    state = {i: {k: _blocks(model[i], opt.state[model[i].values][k]) for k in ("exp_avg", "exp_avg_sq")}
             for i in (2, 4, 8)}
    values = {i: _blocks(model[i], model[i].values.detach().clone()) for i in (2, 4, 8)}

    dg.prune(density=0.3, scope=scope, optimizer=opt)
    cells = sum(model[i].block_mask.numel() for i in (2, 4, 8))
    keep = round(0.3 * cells)
    if scope == "layer":
        counts = {i: round(keep / sum(stored.values()) * stored[i]) for i in (2, 4, 8)}
    else:
        kept = torch.topk(torch.cat([reference[i].flatten() for i in (2, 4, 8)]), keep).values.min()
        counts = {i: int((reference[i] >= kept).sum()) for i in (2, 4, 8)}
    for i in (2, 4, 8):
        assert model[i].nnz_blocks == counts[i]
        survivors, pruned = reference[i][model[i].block_mask], reference[i][~model[i].block_mask & (reference[i] >= 0)]
        if len(survivors) and len(pruned):
            assert survivors.min() > pruned.max()
        for key in ("exp_avg", "exp_avg_sq"):  # survivors keep their Adam moments
            now = _blocks(model[i], opt.state[model[i].values][key])
            assert all(torch.equal(t, state[i][key][b]) for b, t in now.items())
        assert all(torch.equal(t, values[i][b]) for b, t in _blocks(model[i], model[i].values.detach()).items())
    _train(steps=2, lr=0.01)(model, opt)  # the same optimizer trains on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dissipating_needs_block_sparse_layers():
    with pytest.raises(ValueError, match="no SparseLinear or SparseConv2d layer"):
        DissipatingGradients(_make())
