"""Property-based invariants of the dynamic-sparse-training rules and drivers.

Rules (sparsekern.methods.functional), on weights and scores holding NaN, ±inf and ties:
nnz preserved (over all layers for SNFS / GGR), a bool mask of the input's shape,
new weights zero at grown entries and outside the new mask, survivors keep their weight,
2:4 results exactly 2:4 again. Drivers (RigL, SET, GGR, SNFS on a tiny MLP): values and
SGD-momentum / Adam state of surviving blocks move with them, regrown blocks start at zero."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern as sk
from fuzz_strategies import block_sizes, bool_tensor, fuzz_settings, randn, seeds, special_tensor
from sparsekern.methods import functional as Fn

RULE_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
# 0 and 1 included: nothing moves / everything may move.
DROP_FRACTIONS = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))
SMALL_SHAPES = st.one_of(st.tuples(st.integers(0, 12)), st.tuples(st.integers(1, 5), st.integers(1, 6)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes gain nothing from threads


def assert_update(weight, mask, new_mask, new_weight):
    """The conventions every rule shares, for one layer."""
    assert new_mask.dtype == torch.bool and new_mask.shape == mask.shape
    assert new_weight.dtype == weight.dtype and new_weight.shape == weight.shape
    assert bool((new_weight[~new_mask] == 0).all()), "nonzero weight outside the new mask"
    assert bool((new_weight[new_mask & ~mask] == 0).all()), "a grown entry does not start at zero"
    survivors = new_mask & mask
    torch.testing.assert_close(new_weight[survivors], weight[survivors], rtol=0, atol=0, equal_nan=True)


def assert_moves_at_most(mask, new_mask, n_moved):
    assert int(new_mask.sum()) == int(mask.sum())
    assert int((new_mask & ~mask).sum()) <= n_moved


@st.composite
def layer_cases(draw, shape=None, dtype=None):
    """(weight, mask, score) of one layer; weight and score full of NaN, ±inf, ties."""
    shape = draw(SMALL_SHAPES) if shape is None else shape
    dtype = draw(RULE_DTYPES) if dtype is None else dtype
    return special_tensor(draw, shape, dtype), bool_tensor(draw, shape), special_tensor(draw, shape, dtype)


# -- element / block rules ---------------------------------------------------------

@fuzz_settings(200)
@given(layer_cases(), DROP_FRACTIONS)
def test_rigl_update_invariants(case, drop_fraction):
    weight, mask, grad = case
    new_mask, new_weight = Fn.rigl_update(weight, mask, grad, drop_fraction)
    assert_update(weight, mask, new_mask, new_weight)
    assert_moves_at_most(mask, new_mask, Fn.n_to_drop(int(mask.sum()), drop_fraction))
    again = Fn.rigl_update(weight, mask, grad, drop_fraction)  # ties broken by index, never by chance
    assert torch.equal(again[0], new_mask)


@fuzz_settings(150)
@given(layer_cases(), DROP_FRACTIONS, seeds)
def test_set_update_invariants(case, drop_fraction, seed):
    weight, mask, _ = case
    new_mask, new_weight = Fn.set_update(weight, mask, drop_fraction, torch.Generator().manual_seed(seed))
    assert_update(weight, mask, new_mask, new_weight)
    assert_moves_at_most(mask, new_mask, Fn.n_to_drop(int(mask.sum()), drop_fraction))
    again = Fn.set_update(weight, mask, drop_fraction, torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], new_mask)


@st.composite
def multi_layer_cases(draw):
    """1-3 layers of one dtype, with their own shapes."""
    dtype = draw(RULE_DTYPES)
    return [draw(layer_cases(dtype=dtype)) for _ in range(draw(st.integers(1, 3)))]


@fuzz_settings(150)
@given(multi_layer_cases(), DROP_FRACTIONS, st.booleans(), st.data())
def test_snfs_update_invariants(layers, drop_fraction, separate_grow_scores, data):
    weights, masks, momenta = (list(t) for t in zip(*layers))
    grow_scores = [special_tensor(data.draw, tuple(w.shape), w.dtype) for w in weights] \
        if separate_grow_scores else None
    result = Fn.snfs_update(weights, masks, momenta, drop_fraction, grow_scores=grow_scores)
    assert len(result) == len(weights)
    for (new_mask, new_weight), weight, mask in zip(result, weights, masks):
        assert_update(weight, mask, new_mask, new_weight)
        # each layer loses at most its own drop (its share of the regrowth may be zero)
        assert int((mask & ~new_mask).sum()) <= Fn.n_to_drop(int(mask.sum()), drop_fraction)
    assert sum(int(m.sum()) for m, _ in result) == sum(int(m.sum()) for m in masks)


@fuzz_settings(150)
@given(multi_layer_cases(), DROP_FRACTIONS, st.integers(0, 3))
def test_ggr_update_invariants(layers, drop_fraction, min_active):
    weights, masks, grads = (list(t) for t in zip(*layers))
    result = Fn.ggr_update(weights, masks, grads, drop_fraction, min_active=min_active)
    assert len(result) == len(weights)
    for (new_mask, new_weight), weight, mask in zip(result, weights, masks):
        assert_update(weight, mask, new_mask, new_weight)
        assert int(new_mask.sum()) >= min(int(mask.sum()), min_active)  # the drop stops at min_active
    assert sum(int(m.sum()) for m, _ in result) == sum(int(m.sum()) for m in masks)


# -- 2:4 rules --------------------------------------------------------------------

@st.composite
def semi_layer_cases(draw):
    """(weight, mask, grad, transposable): an exact (transposable) 2:4 mask; weight and grad
    full of NaN, ±inf, ties."""
    transposable = draw(st.booleans())
    rows = 4 * draw(st.integers(1, 3)) if transposable else draw(st.integers(1, 6))
    shape = (rows, 4 * draw(st.integers(1, 3)))
    weight, _, grad = draw(layer_cases(shape=shape))
    mask = sk.prune_2to4(randn(shape, draw(seeds)), transposable=transposable)
    return weight, mask, grad, transposable


def assert_exactly_2to4(mask, transposable):
    rows, cols = mask.shape
    assert mask.dtype == torch.bool
    assert bool((mask.view(rows, cols // 4, 4).sum(-1) == 2).all()), "a group of four does not keep exactly two"
    if transposable:
        assert bool((mask.T.reshape(cols, rows // 4, 4).sum(-1) == 2).all()), "a tile column does not keep two"


def uses_plain_torch(dtype):
    """Whether the default choice for 2:4 rules on CPU tensors of ``dtype`` is plain torch."""
    return "cpu" not in sk.kernels.available_backends("semi_drop_grow", torch.device("cpu"), dtype)


def check_semi_rule(rule, weight, mask, n_drop, transposable):
    """``rule()`` (returning (new_mask, new_weight or None)) on the default path and on plain
    torch: exactly 2:4 again, nnz preserved, at most ``n_drop`` moved, the weight conventions,
    and both paths take the same decision."""
    results = [] if uses_plain_torch(weight.dtype) else [rule()]
    with sk.use_backend("reference"):
        results.append(rule())
    for new_mask, new_weight in results:
        assert_exactly_2to4(new_mask, transposable)
        assert_moves_at_most(mask, new_mask, n_drop)
        if new_weight is not None:
            assert_update(weight, mask, new_mask, new_weight)
    if len(results) == 2:
        assert torch.equal(results[0][0], results[1][0])
        if results[0][1] is not None:
            torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0, equal_nan=True)


@fuzz_settings(200)
@given(semi_layer_cases(), DROP_FRACTIONS)
def test_semi_rigl_update_invariants(case, drop_fraction):
    weight, mask, grad, transposable = case
    check_semi_rule(lambda: Fn.semi_rigl_update(weight, mask, grad, drop_fraction, transposable=transposable),
                    weight, mask, Fn.n_to_drop(mask.numel() // 2, drop_fraction), transposable)


@fuzz_settings(120)
@given(semi_layer_cases(), DROP_FRACTIONS, seeds)
def test_semi_set_update_invariants(case, drop_fraction, seed):
    weight, mask, _, transposable = case
    check_semi_rule(lambda: Fn.semi_set_update(weight, mask, drop_fraction, torch.Generator().manual_seed(seed),
                                               transposable=transposable),
                    weight, mask, Fn.n_to_drop(mask.numel() // 2, drop_fraction), transposable)


@fuzz_settings(200)
@given(semi_layer_cases(), st.data())
def test_semi_drop_and_grow_invariants(case, data):
    drop_score, mask, grow_score, transposable = case
    n_drop = data.draw(st.integers(0, mask.numel() // 2))
    check_semi_rule(lambda: (Fn.semi_drop_and_grow(mask, drop_score, grow_score, n_drop, transposable=transposable),
                             None),
                    drop_score, mask, n_drop, transposable)


# Minimal inputs on which the plain-torch 2:4 rule (the reference backend; the default for
# bfloat16 / float16 and off-CPU) once departed from the conventions the C++ rule follows
# (NaN ranks last, two kept per group, the largest pattern total).

ROW = torch.tensor([[True, True, False, False]])


def test_plain_torch_semi_rule_drops_nan_scores_last():
    drop_score, grow_score = torch.tensor([[float("nan"), 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    with sk.use_backend("reference"):
        new_mask = Fn.semi_drop_and_grow(ROW, drop_score, grow_score, 2)
    assert new_mask.tolist() == [[False, False, True, True]]  # both leave; the group regrows its two best


def test_plain_torch_semi_rule_stays_2to4_with_nan_grow_score():
    grow_score = torch.tensor([[0.0, 0.0, float("nan"), 1.0]])
    with sk.use_backend("reference"):
        new_mask = Fn.semi_drop_and_grow(ROW, torch.zeros(1, 4), grow_score, 2)
    assert new_mask.tolist() == [[True, False, False, True]]  # NaN ranks last; ties to the lower position


def test_plain_torch_transposable_rule_regrows_an_infinite_score():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    grow_score = torch.zeros(4, 4)
    grow_score[0, 0] = float("inf")
    with sk.use_backend("reference"):
        new_mask = Fn.semi_drop_and_grow(mask, torch.zeros(4, 4), grow_score, 4, transposable=True)
    assert bool(new_mask[0, 0])  # the only patterns of total inf hold (0, 0)


# -- drivers ------------------------------------------------------------------------

DRIVERS = {"RigL": sk.methods.RigL, "SET": sk.methods.SET, "GGR": sk.methods.GGR, "SNFS": sk.methods.SNFS}
OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def per_weight_state(optimizer, param):
    """The optimizer's state tensors shaped like ``param`` (those that must follow its weights)."""
    return {k: v for k, v in optimizer.state.get(param, {}).items()
            if torch.is_tensor(v) and v.dim() >= 1 and v.shape == param.shape}


def snapshot(layer, optimizer):
    """What must survive a structure change of ``layer``: its structure, values and state."""
    state = {k: v.clone() for k, v in per_weight_state(optimizer, layer.values).items()}
    scalars = {k: v for k, v in optimizer.state.get(layer.values, {}).items() if k not in state}
    if isinstance(layer, sk.SparseLinear):
        return layer.layout(), layer.values.detach().clone(), state, scalars
    return layer.mask.clone(), layer.indices.clone(), layer.values.detach().clone(), state, scalars


def assert_block_carry(layer, optimizer, before):
    """Surviving blocks keep values and state (found through positions_of); new blocks are zero."""
    old_layout, old_values, old_state, old_scalars = before
    slots = old_layout.positions_of(layer.layout())
    kept = slots >= 0
    state = per_weight_state(optimizer, layer.values)
    assert set(state) == set(old_state)
    for new, old in [(layer.values.detach(), old_values), *((state[k], old_state[k]) for k in old_state)]:
        assert new.shape == layer.values.shape
        assert torch.equal(new[kept], old[slots[kept]])
        assert bool((new[~kept] == 0).all())
    for key, value in old_scalars.items():  # Adam's step count
        assert torch.equal(torch.as_tensor(optimizer.state[layer.values][key]), torch.as_tensor(value))


def assert_semi_carry(layer, optimizer, before):
    """The same for a 2:4 layer, compared entry by entry on the dense (out, in) grid."""
    old_mask, old_indices, old_values, old_state, _ = before
    shape, new_mask = (layer.out_features, layer.in_features), layer.mask
    assert_exactly_2to4(new_mask, layer.transposable)
    survivors, grown = old_mask & new_mask, new_mask & ~old_mask
    state = per_weight_state(optimizer, layer.values)
    assert set(state) == set(old_state)
    for new, old in [(layer.values.detach(), old_values), *((state[k], old_state[k]) for k in old_state)]:
        new_dense = sk.SemiStructuredMatrix(new, layer.indices, shape).to_dense()
        old_dense = sk.SemiStructuredMatrix(old, old_indices, shape).to_dense()
        assert torch.equal(new_dense[survivors], old_dense[survivors])
        assert bool((new_dense[grown] == 0).all())


@st.composite
def mlp_cases(draw):
    """A tiny MLP of SparseLinear layers (features not multiples of the block included),
    optionally ending in a static 2:4 layer."""
    block_size = draw(block_sizes)
    in_features, hidden = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    with_semi = draw(st.booleans())
    out_features = 4 * draw(st.integers(1, 2)) if with_semi else draw(st.integers(1, 8))
    # mostly partial densities (room to move), sometimes none or every block stored
    densities = draw(st.tuples(*[st.sampled_from([0.0, 0.25, 0.5, 0.5, 0.75, 1.0])] * 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    torch.manual_seed(draw(seeds))
    layers = [sk.SparseLinear(in_features, hidden, block_size=block_size, density=densities[0], dtype=dtype),
              torch.nn.ReLU(),
              sk.SparseLinear(hidden, out_features, block_size=block_size, density=densities[1], dtype=dtype)]
    if with_semi:
        transposable = draw(st.booleans())
        layers += [torch.nn.ReLU(), sk.SemiSparseLinear(out_features, 4 if transposable else draw(st.integers(1, 5)),
                                                        transposable=transposable, dtype=dtype)]
    return torch.nn.Sequential(*layers)


@fuzz_settings(80)
@given(model=mlp_cases(), driver=st.sampled_from(sorted(DRIVERS)), optimizer=st.sampled_from(sorted(OPTIMIZERS)),
       delta=st.integers(1, 2), alpha=st.sampled_from([0.3, 0.5, 1.0]),
       score_method=st.sampled_from(["auto", "gram", "product"]), steps=st.integers(2, 4), seed=seeds)
def test_driver_carries_values_and_optimizer_state(model, driver, optimizer, delta, alpha, score_method, steps, seed):
    opt = OPTIMIZERS[optimizer](model.parameters())
    dst = DRIVERS[driver](model, opt, density=None, delta=delta, alpha=alpha, t_end=100, schedule="constant",
                          seed=seed, score_method=score_method)
    sparse_layers = [m for m in model if isinstance(m, sk.SparseLinear)]
    semi_layers = [m for m in model if isinstance(m, sk.SemiSparseLinear)]
    nnz = [layer.nnz_blocks for layer in sparse_layers]
    dtype = sparse_layers[0].values.dtype
    for step in range(steps):
        x = randn((5, sparse_layers[0].in_features), seed + step, dtype)
        target = randn((5, model[-1].out_features), seed + step + 100, dtype)
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()
        before = [snapshot(layer, opt) for layer in [*sparse_layers, *semi_layers]]
        changed = dst.step()
        assert changed == ((step + 1) % delta == 0)
        for layer, saved in zip(sparse_layers, before[:len(sparse_layers)]):
            assert_block_carry(layer, opt, saved)
        for layer, saved in zip(semi_layers, before[len(sparse_layers):]):
            assert_semi_carry(layer, opt, saved)
        if driver in ("RigL", "SET"):  # per layer
            assert [layer.nnz_blocks for layer in sparse_layers] == nnz
        else:  # redistributed over layers
            assert sum(layer.nnz_blocks for layer in sparse_layers) == sum(nnz)



def test_plain_torch_transposable_rule_keeps_the_old_pattern_when_every_total_is_minus_inf():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    grow_score = torch.full((4, 4), float("-inf"))
    with sk.use_backend("reference"):
        new_mask = Fn.semi_drop_and_grow(mask, torch.zeros(4, 4), grow_score, 4, transposable=True)
    assert torch.equal(new_mask, mask)  # no pattern total beats -inf: the tile keeps its pattern, as in C++
