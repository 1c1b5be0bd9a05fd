import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import DissipatingGradients, k_starts, relative_change, select_fittest


def _make(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6))


def _train(steps=5, lr=0.2):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 24, generator=g), torch.randint(0, 6, (32,), generator=g)

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return train


def test_select_fittest():
    assert select_fittest([1.0, 3.0, 2.0], [9.0, 1.0, 1.0], "magnitude") == 1
    assert select_fittest([1.0, 3.0, 2.0], [9.0, 1.0, 1.0], "gradient") == 0
    assert select_fittest([1.0, 3.0, 2.9], [1.0, 1.0, 2.0], "both") == 2
    with pytest.raises(ValueError, match="criterion"):
        select_fittest([1.0], [1.0], "loss")


@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "both"])
def test_k_starts_picks_by_criterion(criterion):
    model, report = k_starts(_make, _train(steps=2), k=3, density=0.3, method="uniform", block_size=8,
                             criterion=criterion, seed=5)
    assert len(report["magnitude"]) == 3 and all(g > 0 for g in report["gradient"])
    assert report["chosen"] == select_fittest(report["magnitude"], report["gradient"], criterion)
    assert isinstance(model[0], sk.SparseLinear)
    # Distinct seeds give distinct masks; the chosen one is start `chosen`.
    expected = sk.sparsify(_make(), density=0.3, method="uniform", block_size=8,
                           generator=torch.Generator().manual_seed(5 + report["chosen"]))
    assert torch.equal(model[0].block_mask, expected[0].block_mask)


def test_k_starts_gradient_accumulates_abs_grads():
    # One start, one step: accumulated |grad| equals |grad| of that step.
    model, report = k_starts(_make, _train(steps=1, lr=0.0), k=1, density=1.0, method="uniform", block_size=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 24, generator=g), torch.randint(0, 6, (32,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [model[i].values.grad.abs() for i in (0, 2)]
    expected = sum(float(t.sum()) for t in grads) / sum(t.numel() for t in grads)
    assert report["gradient"][0] == pytest.approx(expected, rel=1e-5)


def test_relative_change():
    initial = torch.ones(2, 2, 2)
    current = initial.clone()
    current[1] *= 1.5
    assert relative_change(initial, current).tolist() == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="shape"):
        relative_change(initial, current[:1])


def test_dissipating_prunes_least_moved_blocks():
    model = sk.sparsify(_make(), density=1.0, method="uniform", block_size=8)
    dg = DissipatingGradients(model)
    with torch.no_grad():  # move block (0, 1) of layer 0 a lot, everything else a little
        model[0].values.mul_(1.01)
        model[2].values.mul_(1.01)
        moved = model[0].layout().positions_of(model[0].layout())[1]  # index of block (0, 1)
        model[0].values[moved] *= 3.0
    densities = dg.prune(density=1 / 16, scope="global")  # 16 + 4 blocks -> keep round(20/16) = 1
    assert model[0].nnz_blocks == 1 and bool(model[0].block_mask[0, 1]) and model[2].nnz_blocks == 0
    assert densities["0"] == pytest.approx(1 / 12)


def test_dissipating_layer_scope_keeps_allocation():
    model = sk.sparsify(_make(), density=1.0, method="uniform", block_size=8)
    dg = DissipatingGradients(model)
    with torch.no_grad():
        model[0].values.mul_(1.01)  # layer 0 moves less than layer 2: global ranking would empty it
        model[2].values.mul_(1.5)
        model[0].values[3] *= 2.0
    dg.prune(density=0.5)
    assert model[0].nnz_blocks == 6 and model[2].nnz_blocks == 2  # 12 and 4 blocks, halved each
    assert bool(model[0].block_mask.flatten()[3])
    with pytest.raises(ValueError, match="scope"):
        dg.prune(density=0.5, scope="bogus")


def test_dissipating_tolerance_and_training_flow():
    model = sk.sparsify(_make(), density=0.5, method="uniform", block_size=8)
    dg = DissipatingGradients(model)
    _train(steps=3)(model)
    scores = dg.scores()
    dg.prune(tolerance=0.0)  # every block that moved at all survives
    assert all(model[i].nnz_blocks == int((scores[str(i)] > 0).sum()) for i in (0, 2))
    _train(steps=2)(model)  # still trains after the structure change
    with pytest.raises(ValueError, match="exactly one"):
        dg.prune()
    with pytest.raises(ValueError, match="SparseLinear"):
        DissipatingGradients(_make())
