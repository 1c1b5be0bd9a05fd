"""DST at 2:4 granularity: the drop/grow rule inside groups of four (and 4x4 tiles
when transposable), and the drivers on static SemiSparseLinear layers."""
import io
import itertools

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.methods import DPF, GGR, SET, SNFS, RigL, TopKAST
from sparsekern.methods import functional as Fn
from sparsekern.formats.semi_prune import prune_2to4, transposable_patterns


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- the rule

def test_row_groups_exact():
    mask = _bool([[1, 1, 0, 0, 0, 0, 1, 1]])
    weight = torch.tensor([[5., 1, 0, 0, 0, 0, 2, 3]])
    grad = torch.tensor([[0., 0, 9, 1, 0, 7, 0, 0]])
    new_mask, new_weight = Fn.semi_rigl_update(weight, mask, grad, 0.5)
    # drop the two smallest kept (1 at col 1, 2 at col 6); each group regrows its best non-kept
    assert torch.equal(new_mask, _bool([[1, 0, 1, 0, 0, 1, 0, 1]]))
    assert torch.equal(new_weight, torch.tensor([[5., 0, 0, 0, 0, 0, 0, 3]]))


def test_row_groups_just_dropped_can_return_and_ties_go_to_lower_position():
    mask = _bool([[1, 1, 0, 0, 1, 1, 0, 0]])
    weight = torch.tensor([[4., 3, 0, 0, 1, 2, 0, 0]])
    grad = torch.tensor([[0., 0, 0, 0, 9, 0, 5, 5]])
    new_mask, new_weight = Fn.semi_rigl_update(weight, mask, grad, 0.5)  # drops cols 4 and 5
    # col 4 has the largest gradient: it comes back with its weight; the tie 6/7 goes to 6
    assert torch.equal(new_mask, _bool([[1, 1, 0, 0, 1, 0, 1, 0]]))
    assert torch.equal(new_weight, torch.tensor([[4., 3, 0, 0, 1, 0, 0, 0]]))


def test_transposable_tile_exact():
    mask = _bool([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    weight = torch.tensor([[0.1, 5, 0, 0], [6, 7, 0, 0], [0, 0, 0.2, 8], [0, 0, 9, 3]])
    grad = torch.zeros(4, 4)
    grad[0, 2], grad[2, 0] = 1.0, 1.0  # (0,0)+(2,2) regrown scores 0; (0,2)+(2,0) scores 2
    new_mask, new_weight = Fn.semi_rigl_update(weight, mask, grad, 0.25, transposable=True)  # drops (0,0), (2,2)
    assert torch.equal(new_mask, _bool([[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]]))
    assert torch.equal(new_weight, weight * new_mask * _bool([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1] * 4]))
    # the only two candidates keeping the survivors; with all scores tied the one listed first
    # in transposable_patterns() wins (row 0 = 0110 comes before 1100 there)
    tied, _ = Fn.semi_rigl_update(weight, mask, torch.zeros(4, 4), 0.25, transposable=True)
    assert torch.equal(tied, new_mask)


def _brute_force_tile(kept, gain):
    """Best transposable 4x4 pattern containing ``kept`` by total gain of its new entries (ties: first)."""
    best, best_gain = None, None
    for pattern in transposable_patterns():
        pattern = pattern.view(4, 4)
        if bool((kept & ~pattern).any()):
            continue
        g = float(gain[pattern & ~kept].double().sum())
        if best is None or g > best_gain:
            best, best_gain = pattern, g
    return best


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_invariants_and_brute_force(transposable, fraction):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 12, generator=g)
    mask = prune_2to4(torch.randn(8, 12, generator=g), transposable=transposable)
    grad = torch.randn(8, 12, generator=g)
    new_mask, new_weight = Fn.semi_rigl_update(weight * mask, mask, grad, fraction, transposable=transposable)
    assert torch.equal(prune_2to4(new_mask.float(), transposable=transposable), new_mask)  # still (transposable) 2:4
    assert int(new_mask.sum()) == int(mask.sum())
    n = Fn.n_to_drop(int(mask.sum()), fraction)
    kept = Fn.drop_and_grow(mask, (weight * mask).abs(), torch.zeros_like(weight), n, 0)
    assert bool((new_mask >= kept).all())  # the drop is RigL's, over the whole tensor
    assert bool((new_weight[new_mask & ~mask] == 0).all())
    assert torch.equal(new_weight[new_mask & mask], weight[new_mask & mask])
    if transposable:
        for r, c in itertools.product(range(0, 8, 4), range(0, 12, 4)):
            tile = (slice(r, r + 4), slice(c, c + 4))
            assert torch.equal(new_mask[tile], _brute_force_tile(kept[tile], grad[tile].abs()))
    else:
        for row, group in itertools.product(range(8), range(3)):
            cols = slice(4 * group, 4 * group + 4)
            free = ~kept[row, cols]
            d = 2 - int(kept[row, cols].sum())
            score = torch.where(free, grad[row, cols].abs(), torch.tensor(-1.0))
            grown = torch.zeros(4, dtype=torch.bool)
            grown[torch.sort(score, descending=True, stable=True).indices[:d]] = True
            assert torch.equal(new_mask[row, cols], kept[row, cols] | grown)


def test_set_regrows_inside_groups_reproducibly():
    mask = prune_2to4(torch.randn(8, 16), transposable=True)
    weight = torch.randn(8, 16) * mask
    a, _ = Fn.semi_set_update(weight, mask, 0.5, generator=torch.Generator().manual_seed(3), transposable=True)
    b, _ = Fn.semi_set_update(weight, mask, 0.5, generator=torch.Generator().manual_seed(3), transposable=True)
    assert torch.equal(a, b) and not torch.equal(a, mask)
    assert torch.equal(prune_2to4(a.float(), transposable=True), a)


def test_rule_errors():
    with pytest.raises(ValueError, match="not exactly 2:4"):
        Fn.semi_drop_and_grow(_bool([[1, 1, 1, 0]]), torch.ones(1, 4), torch.ones(1, 4), 1)
    row_only = _bool([[1, 1, 0, 0]] * 4)
    with pytest.raises(ValueError, match="not exactly transposable"):
        Fn.semi_drop_and_grow(row_only, torch.ones(4, 4), torch.ones(4, 4), 1, transposable=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        Fn.semi_drop_and_grow(torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 6), torch.ones(2, 6), 0)
    with pytest.raises(ValueError, match="grow_score must be a tensor"):
        Fn.semi_drop_and_grow(row_only, torch.ones(4, 4), torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="cannot drop 9"):
        Fn.semi_drop_and_grow(_bool([[1, 1, 0, 0]]), torch.ones(1, 4), torch.ones(1, 4), 9)


# ---------------------------------------------------------------- the layer's structure setter

@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_set_mask_carries_values_and_refreshes_the_cached_matrix(transposable):
    torch.manual_seed(0)
    layer = sk.SemiSparseLinear(16, 8, transposable=transposable, dtype=torch.float64)
    values = layer.values
    old_dense, old_mask = layer.dense_weight().detach().clone(), layer.mask
    x = torch.randn(5, 16, dtype=torch.float64)
    layer(x).sum().backward()
    old_values = values.detach().clone()
    new_mask = prune_2to4(torch.randn(8, 16), transposable=transposable)
    slots = layer.set_mask(new_mask)
    assert slots.shape == (8, 8) and int((slots < 0).sum()) == int((new_mask & ~old_mask).sum())
    assert torch.equal(layer.values.detach()[slots >= 0], old_values.reshape(-1)[slots[slots >= 0]])
    assert layer.values is values and layer.values.shape == (8, 8) and layer.values.grad is None
    assert torch.equal(layer.mask, new_mask)
    assert torch.equal(layer.dense_weight().detach(), old_dense * new_mask)  # survivors kept, new ones zero
    torch.testing.assert_close(layer(x), x @ (old_dense * new_mask).T + layer.bias)
    assert not torch.equal(new_mask, old_mask)


def test_set_mask_errors():
    layer = sk.SemiSparseLinear(8, 4)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(4, 8\)"):
        layer.set_mask(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="transposable"):
        layer.set_mask(_bool([[1, 1, 0, 0, 1, 1, 0, 0]] * 4))
    with pytest.raises(RuntimeError, match="mode='static'"):
        sk.SemiSparseLinear(8, 4, mode="dynamic").set_mask(layer.mask)


# ---------------------------------------------------------------- drivers on SemiSparseLinear

def _mlp(seed=0, transposable=True):
    torch.manual_seed(seed)
    return torch.nn.Sequential(sk.SemiSparseLinear(12, 16, transposable=transposable, dtype=torch.float64),
                               torch.nn.ReLU(),
                               sk.SemiSparseLinear(16, 8, transposable=transposable, dtype=torch.float64),
                               torch.nn.ReLU(),
                               sk.SparseLinear(8, 6, block_size=2, density=0.5, dtype=torch.float64))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randint(0, 6, (32,), generator=g)


def _train(model, opt, dst, steps, seed=0):
    for i in range(steps):
        x, y = _data(seed + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        dst.step()


SEMI = (0, 2)  # indices of the SemiSparseLinear layers in _mlp


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_rigl_decision_equals_rule_on_dense_gradient_without_dense_update(transposable):
    model = _mlp(transposable=transposable)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dst = RigL(model, opt, density=None, delta=1, alpha=0.4, t_end=2)  # one update, at step 1
    x, y = _data()
    semi = [model[i] for i in SEMI]
    dense = [layer.dense_weight().detach().clone().requires_grad_() for layer in semi]
    h = F.relu(F.linear(F.relu(F.linear(x, dense[0], semi[0].bias)), dense[1], semi[1].bias))
    F.cross_entropy(model[4](h), y).backward()
    masks, weights = [layer.mask.clone() for layer in semi], [d.detach().clone() for d in dense]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(layer.values.grad.shape == layer.values.shape for layer in semi)  # only kept positions
    opt.step()
    assert dst.step()
    for layer, mask, weight, d in zip(semi, masks, weights, dense):
        expected, new_weight = Fn.semi_rigl_update(weight, mask, d.grad, dst.schedule.drop_fraction(1),
                                                   transposable=transposable)
        assert not torch.equal(expected, mask)
        assert torch.equal(layer.mask, expected)
        assert torch.equal(layer.dense_weight().detach(), new_weight)
    assert not layer._forward_hooks  # the probe is gone after the update step


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
], ids=["sgd-momentum", "adam"])
def test_optimizer_state_of_regrown_weights_is_zero_and_survivors_keep_theirs(make_opt):
    model = _mlp()
    opt = make_opt(model.parameters())
    dst = RigL(model, opt, density=None, delta=3, alpha=0.5, t_end=100)
    _train(model, opt, dst, 2)
    layer = model[0]
    keys = [k for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in opt.state[layer.values]]
    assert keys
    x, y = _data(99)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    old_mask = layer.mask
    old = {k: sk.SemiStructuredMatrix(opt.state[layer.values][k], layer.indices, (16, 12)).to_dense() for k in keys}
    assert dst.step()
    new_mask = layer.mask
    assert not torch.equal(new_mask, old_mask) and int(new_mask.sum()) == int(old_mask.sum())
    for k in keys:
        state = opt.state[layer.values][k]
        assert state.shape == layer.values.shape
        new = sk.SemiStructuredMatrix(state, layer.indices, (16, 12)).to_dense()
        assert torch.equal(new[new_mask & old_mask], old[k][new_mask & old_mask])
        assert bool((new[new_mask & ~old_mask] == 0).all())
    _train(model, opt, dst, 3, seed=50)  # training goes on with the moved state


@pytest.mark.parametrize("cls", [SET, RigL, SNFS, GGR], ids=lambda c: c.__name__)
def test_pattern_and_nnz_preserved_and_checkpoint_resume_is_exact(cls):
    def make(seed):
        model = _mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, cls(model, opt, density=None, delta=2, t_end=20, seed=seed)

    model, opt, dst = make(0)
    start = [layer.mask.clone() for layer in (model[0], model[2])]
    blocks = model[4].nnz_blocks
    _train(model, opt, dst, 5)
    for layer, mask in zip((model[0], model[2]), start):
        assert not torch.equal(layer.mask, mask)
        assert torch.equal(prune_2to4(layer.mask.double(), transposable=True), layer.mask)
    assert dst.densities()["0"] == 0.5
    if cls in (SET, RigL):
        assert model[4].nnz_blocks == blocks
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": dst.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, opt2, dst2 = make(1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    dst2.load_state_dict(saved["dst"])
    for a, b in zip(model.modules(), model2.modules()):
        if isinstance(a, sk.SemiSparseLinear):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
    _train(model, opt, dst, 6, seed=100)
    _train(model2, opt2, dst2, 6, seed=100)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(model[0].mask, model2[0].mask) and torch.equal(model[2].mask, model2[2].mask)


def test_driver_errors_at_2to4():
    model = torch.nn.Sequential(sk.SemiSparseLinear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for cls in (TopKAST, DPF):
        with pytest.raises(ValueError, match="not implemented at 2:4"):
            cls(model, opt, density=None, t_end=10)
    dynamic = torch.nn.Sequential(sk.SemiSparseLinear(8, 8, mode="dynamic"))
    with pytest.raises(ValueError, match="mode='static'"):
        RigL(dynamic, torch.optim.SGD(dynamic.parameters(), lr=0.1), density=None, t_end=10)
    dst = RigL(model, opt, density=None, delta=1, t_end=10)
    with pytest.raises(RuntimeError, match="no gradient reached the probe"):
        dst.step()
