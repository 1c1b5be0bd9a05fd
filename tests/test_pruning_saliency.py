import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.methods import grasp_scores, magnitude_scores, random_scores, snip_scores, synflow_masks, synflow_scores


def _mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9, bias=bias), nn.ReLU(), nn.Linear(9, 7, bias=bias), nn.ReLU(),
                         nn.Linear(7, 3, bias=bias)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)


NAMES = ["0.weight", "2.weight", "4.weight"]


def test_names_and_shapes_and_model_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    for scores in (magnitude_scores(model), random_scores(model), snip_scores(model, x, y, F.cross_entropy),
                   grasp_scores(model, x, y, F.cross_entropy), synflow_scores(model, (12,))):
        assert list(scores) == NAMES
        params = dict(model.named_parameters())
        assert all(scores[n].shape == params[n].shape for n in NAMES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_snip_is_abs_grad_times_weight():
    model = _mlp()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    scores = snip_scores(model, x, y, F.cross_entropy)
    for name, p in model.named_parameters():
        if name in scores:
            torch.testing.assert_close(scores[name], (p.grad * p).abs())


def test_grasp_matches_explicit_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Tanh(), nn.Linear(2, 2, bias=False)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    w1, w2 = model[0].weight, model[2].weight
    flat = torch.cat([w1.flatten(), w2.flatten()]).detach()

    def loss_of(theta):
        a, b = theta[:6].view(2, 3), theta[6:].view(2, 2)
        return F.cross_entropy(torch.tanh(x @ a.T) @ b.T, y)

    g = torch.autograd.functional.jacobian(loss_of, flat)
    hg = torch.autograd.functional.hessian(loss_of, flat) @ g
    expected = flat * hg
    scores = grasp_scores(model, x, y, F.cross_entropy)
    torch.testing.assert_close(torch.cat([scores["0.weight"].flatten(), scores["2.weight"].flatten()]), expected)


def test_synflow_conservation_bias_free_relu_mlp():
    # Every layer's score sum equals R = 1ᵀ|W3||W2||W1|1 for a bias-free ReLU MLP.
    model = _mlp(bias=False)
    scores = synflow_scores(model, (12,))
    sums = torch.stack([scores[n].sum() for n in NAMES])
    w = [model[i].weight.detach().abs() for i in (0, 2, 4)]
    r = (w[2] @ w[1] @ w[0]).sum()
    torch.testing.assert_close(sums, r.expand(3))


def test_synflow_masked_weights_score_zero():
    model = _mlp(bias=False)
    mask = torch.ones(9, 12, dtype=torch.bool)
    mask[:, :4] = False
    scores = synflow_scores(model, (12,), {"0.weight": mask})
    assert torch.all(scores["0.weight"][:, :4] == 0) and torch.all(scores["0.weight"][:, 4:] > 0)


def test_synflow_iterative_keeps_budget_and_no_layer_collapse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    masks = synflow_masks(model, (64,), 0.05, block_size=8, iterations=20)
    cells = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * cells)
    assert all(m.any() for m in masks.values())
    with pytest.raises(ValueError, match="iterations"):
        synflow_masks(model, (64,), 0.5, iterations=0)


def test_no_prunable_layer():
    with pytest.raises(ValueError, match="no nn.Linear"):
        magnitude_scores(nn.ReLU())
