"""DST drivers on SparseLinear: decisions match the pure rules on real probe scores,
optimizer state follows blocks, checkpoints resume exactly."""
import io

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.formats.bsr import values_to_dense
from sparsekern.methods import DPF, GGR, SET, SNFS, RigL, TopKAST
from sparsekern.methods import functional as Fn
from sparsekern.methods.dst.state import restructure

DST = [SET, RigL, SNFS, GGR, TopKAST]


def _mlp(seed=0, block=4, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(sk.SparseLinear(10, 12, block_size=block, density=0.5, dtype=dtype), torch.nn.ReLU(),
                               sk.SparseLinear(12, 7, block_size=block, density=0.5, dtype=dtype))


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 10, generator=g, dtype=dtype), torch.randint(0, 7, (32,), generator=g)


def _train(model, opt, dst, steps, seed=0):
    for i in range(steps):
        x, y = _data(seed + i, model[0].values.dtype)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dst.step()
    return loss


def _block_rms_grid(dense, padded_shape, block):
    (r, c), (br, bc) = padded_shape, block
    dense = F.pad(dense, (0, c - dense.shape[1], 0, r - dense.shape[0]))
    return dense.reshape(r // br, br, c // bc, bc).pow(2).mean((1, 3)).sqrt()


@pytest.mark.parametrize("score_method", ["product", "gram", "auto"])
@pytest.mark.parametrize("block", [1, 4], ids=["element", "block4-padded"])
def test_rigl_driver_decision_equals_rule_on_dense_gradient(block, score_method):
    model = _mlp(block=block)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dst = RigL(model, opt, density=None, delta=1, alpha=0.4, t_end=10, score_method=score_method)
    x, y = _data()
    dense = [layer.dense_weight().detach().clone().requires_grad_() for layer in (model[0], model[2])]
    biases = [model[0].bias.detach(), model[2].bias.detach()]
    F.cross_entropy(F.linear(F.relu(F.linear(x, dense[0], biases[0])), dense[1], biases[1]), y).backward()
    masks = [model[0].block_mask.clone(), model[2].block_mask.clone()]
    weights = [_block_rms_grid(w.detach(), l.padded_shape, l.block_size) for w, l in zip(dense, (model[0], model[2]))]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert dst.step()
    for w, m, d, layer in zip(weights, masks, dense, (model[0], model[2])):
        grad = _block_rms_grid(d.grad, layer.padded_shape, layer.block_size)
        expected, _ = Fn.rigl_update(w * m, m, grad, dst.schedule.drop_fraction(1))
        assert torch.equal(layer.block_mask, expected)
        assert layer.nnz_blocks == int(m.sum())
        # survivors keep their weights, new blocks are zero
        new_dense = layer.dense_weight().detach()
        keep = _expand(m & expected, layer)[:new_dense.shape[0], :new_dense.shape[1]]
        assert torch.equal(new_dense[keep], d.detach()[keep])
        assert bool((new_dense[~keep] == 0).all())


def _expand(grid_mask, layer):
    br, bc = layer.block_size
    return grid_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
], ids=["sgd-momentum", "adam"])
def test_optimizer_state_of_regrown_blocks_is_zero_and_survivors_keep_theirs(make_opt):
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
    old_mask, old_layout = layer.block_mask.clone(), layer.layout()
    old = {k: values_to_dense(opt.state[layer.values][k], old_layout) for k in keys}
    assert dst.step()
    new_mask = layer.block_mask
    assert not torch.equal(new_mask, old_mask)
    for k in keys:
        state = opt.state[layer.values][k]
        assert state.shape == layer.values.shape
        new = values_to_dense(state, layer.layout())
        assert torch.equal(new[_expand(new_mask & old_mask, layer)], old[k][_expand(new_mask & old_mask, layer)])
        assert bool((new[_expand(new_mask & ~old_mask, layer)] == 0).all())
    _train(model, opt, dst, 2, seed=50)  # training goes on with the resized state


def test_restructure_keeps_parameter_identity():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layer, param = model[0], model[0].values
    restructure(layer, opt, torch.ones_like(layer.block_mask))
    assert layer.values is param and layer.density == 1.0


@pytest.mark.parametrize("cls", DST, ids=lambda c: c.__name__)
def test_total_nnz_preserved_and_training_runs(cls):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = cls(model, opt, density=0.4, delta=2, t_end=12)
    total = sum(layer.nnz_blocks for _, layer in dst.layers)
    per_layer = [layer.nnz_blocks for _, layer in dst.layers]
    loss = _train(model, opt, dst, 14)
    assert torch.isfinite(loss)
    assert sum(layer.nnz_blocks for _, layer in dst.layers) == total
    assert len(dst.update_seconds) == 5
    if cls in (SET, RigL, TopKAST):
        assert [layer.nnz_blocks for _, layer in dst.layers] == per_layer


def test_topkast_forward_set_is_top_of_backward_set_and_shadow_learns():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = TopKAST(model, opt, density=0.3, delta=3, t_end=100, penalty=1e-4)
    initial = {name: p.detach().clone() for name, (p, _) in dst.shadow.items()}
    _train(model, opt, dst, 2)
    for name, layer in dst.layers:
        param, layout = dst.shadow[name]
        assert not bool((layout.block_mask & layer.block_mask).any())
        assert not torch.equal(param.detach(), initial[name])  # exploration blocks are trained
    _train(model, opt, dst, 1, seed=7)  # step 3: update
    for name, layer in dst.layers:
        param, _ = dst.shadow[name]
        forward = layer.values.detach().pow(2).mean((1, 2)).sqrt()
        shadow = param.detach().pow(2).mean((1, 2)).sqrt()
        nonzero = shadow[shadow > 0]
        assert nonzero.numel() == 0 or float(forward.min()) >= float(nonzero.max())


def test_dpf_feedback_updates_pruned_blocks_with_gradient_at_masked_weight():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DPF(model, opt, density=0.3, delta=2, t_end=6)
    _train(model, opt, dst, 2)  # step 2: first pruning
    layer = model[0]
    name = dst.layers[0][0]
    param, layout = dst.shadow[name]
    assert layout.nnz_blocks > 0
    before = values_to_dense(param.detach(), layout).clone()
    masked = [l.dense_weight().detach().clone().requires_grad_() for l in (model[0], model[2])]
    x, y = _data(5)
    F.cross_entropy(F.linear(F.relu(F.linear(x, masked[0], model[0].bias)), masked[1], model[2].bias), y).backward()
    _train(model, opt, dst, 1, seed=5)
    after = values_to_dense(param.detach(), layout)
    grad = F.pad(masked[0].grad, (0, layer.padded_shape[1] - 10, 0, layer.padded_shape[0] - 12))
    shadow = _expand(layout.block_mask, layer)
    torch.testing.assert_close(after[shadow], (before - 0.1 * grad)[shadow])
    _train(model, opt, dst, 6, seed=10)
    assert dst.densities()[name] == pytest.approx(dst.targets[name], abs=1.0 / layer.block_mask.numel())


def _dpf_dense_rms(dst, name, layer):
    """Block RMS grid of DPF's dense weight: the forward blocks plus the shadow blocks."""
    param, layout = dst.shadow[name]
    r, c = layer.padded_shape
    forward = F.pad(layer.dense_weight().detach(), (0, c - layer.in_features, 0, r - layer.out_features))
    return _block_rms_grid(forward + values_to_dense(param.detach(), layout), layer.padded_shape, layer.block_size)


def test_dpf_ramp_end_reaches_the_target_early_then_keeps_recomputing_the_mask():
    model = _mlp(block=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    dst = DPF(model, opt, density=0.3, delta=2, t_end=24, ramp_end=10)
    _train(model, opt, dst, 4)
    name, layer = dst.layers[0]
    cells = layer.block_mask.numel()
    assert dst.densities()[name] > dst.targets[name] + 2.0 / cells  # still ramping at step 4
    masks = []
    for step in range(4, 22, 2):  # the updates are at steps 6, 8, ..., 22
        _train(model, opt, dst, 2, seed=step)
        if dst.t < 10:
            continue
        for name, layer in dst.layers:  # at the target from ramp_end on, mask = top blocks of the dense weight
            assert layer.nnz_blocks == round(dst.targets[name] * layer.block_mask.numel())
            expected = Fn.topk_mask(_dpf_dense_rms(dst, name, layer), layer.nnz_blocks)
            assert torch.equal(layer.block_mask, expected)
        masks.append(torch.cat([l.block_mask.flatten() for _, l in dst.layers]))
    assert any(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))  # the mask keeps moving after ramp_end


def test_dpf_default_ramp_reaches_the_target_at_the_last_update():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DPF(model, opt, density=0.3, delta=4, t_end=15)
    name, _ = dst.layers[0]
    target = dst.targets[name]
    assert dst.current_density(name, 8) > target and dst.current_density(name, 12) == target
    other = _mlp()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    assert DPF(other, other_opt, density=0.3, delta=4, t_end=15, ramp_end=8).current_density(name, 8) == target


@pytest.mark.parametrize("ramp_end", [0, 13, 2.5], ids=["zero", "after-last-update", "float"])
def test_dpf_ramp_end_errors(ramp_end):
    model = _mlp()
    with pytest.raises(ValueError, match=r"ramp_end must be an int in \(0, 12\]"):
        DPF(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.3, delta=4, t_end=15, ramp_end=ramp_end)


@pytest.mark.parametrize("cls", [SET, RigL, GGR, TopKAST, DPF], ids=lambda c: c.__name__)
def test_checkpoint_resume_is_exact(cls):
    def make(seed):
        model = _mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, cls(model, opt, density=0.4, delta=2, t_end=20, seed=seed)

    model, opt, dst = make(0)
    _train(model, opt, dst, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": dst.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, opt2, dst2 = make(1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    dst2.load_state_dict(saved["dst"])
    assert dst2.t == dst.t
    _train(model, opt, dst, 6, seed=100)
    _train(model2, opt2, dst2, 6, seed=100)
    for (_, a), (_, b) in zip(dst.layers, dst2.layers):
        assert torch.equal(a.block_mask, b.block_mask)
        assert torch.equal(a.values, b.values)


def test_errors():
    with pytest.raises(ValueError, match="no sparsekern.SparseLinear"):
        RigL(torch.nn.Linear(3, 3), torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1), density=0.5, t_end=10)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = RigL(model, opt, density=0.5, delta=1, t_end=10)
    with pytest.raises(RuntimeError, match="no gradient reached the probe"):
        dst.step()


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (2, 3)], ids=["element", "block4", "block2x3"])
def test_gram_block_scores_equal_the_dense_gradient_block_rms(block):
    from sparsekern.methods.dst.scores import gram_block_rms
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(9, 10, generator=g, dtype=torch.float64), torch.randn(9, 7, generator=g, dtype=torch.float64)
    padded = (-(-7 // block[0]) * block[0], -(-10 // block[1]) * block[1])
    expected = _block_rms_grid(dy.T @ x, padded, block)
    torch.testing.assert_close(gram_block_rms(x, dy, padded, block), expected, rtol=1e-12, atol=1e-12)
    # float32: the squared norm is a sum of N² products, so its absolute error scales with the
    # largest score; scores far below it (cancellation over the batch) lose relative accuracy
    got = gram_block_rms(x.float(), dy.float(), padded, block)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-4 * float(expected.max()))


def test_gram_scores_of_a_layer_called_twice_are_those_of_the_summed_gradient():
    from sparsekern.methods.dst.scores import ScoreProbe
    model = _mlp()
    layer = model[2]
    probe = ScoreProbe(layer, "gram")
    x, _ = _data()
    h = F.relu(model[0](x))
    (layer(h[:10]).pow(2).sum() + 3 * layer(h[10:]).sum()).backward()
    dense = layer.dense_weight().detach().clone().requires_grad_()
    (F.linear(h[:10].detach(), dense, layer.bias).pow(2).sum() + 3 * F.linear(h[10:].detach(), dense).sum()).backward()
    torch.testing.assert_close(probe.scores("2"), _block_rms_grid(dense.grad, layer.padded_shape, layer.block_size))
    probe.remove()
    assert not layer._forward_hooks and not layer._forward_pre_hooks and layer.grad_probe is None


def test_auto_score_method_takes_gram_only_where_it_is_cheaper():
    from sparsekern.methods.dst.scores import gram_cheaper
    assert gram_cheaper(sk.SparseLinear(2048, 2048, block_size=32, density=0.1), 128)
    assert not gram_cheaper(sk.SparseLinear(2048, 2048, block_size=32, density=0.1), 2048)
    assert not gram_cheaper(sk.SparseLinear(64, 64, block_size=1, density=0.1), 128)
    with pytest.raises(ValueError, match="score_method must be one of"):
        RigL(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), density=0.5, t_end=10, score_method="dense")


def _transformer_like_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.normal_(0.0, 0.02)
            layer.bias.zero_()
    return sk.sparsify(model, density=0.25, method="erk", block_size=8)


@pytest.mark.parametrize("cls", [RigL, SET, GGR, SNFS])
def test_a_driver_adopts_a_converted_models_structure_values_and_biases(cls):
    model = _transformer_like_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.25, delta=2, t_end=10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_driver_changing_the_density_keeps_biases_and_the_models_scale():
    model = _transformer_like_model()
    biases = [layer.bias.detach().clone() for layer in (model[0], model[2])]
    RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, delta=2, t_end=10)
    for layer, bias in zip((model[0], model[2]), biases):
        assert torch.equal(layer.bias, bias)
        assert 0.01 < float(layer.values.detach().std()) < 0.04  # new blocks drawn at the layer's own scale


def test_redraw_reinitialises_with_nn_linear_bounds_and_keeps_biases():
    model = _transformer_like_model()
    biases = [layer.bias.detach().clone() for layer in (model[0], model[2])]
    RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.25, delta=2, t_end=10, redraw=True)
    for layer, bias in zip((model[0], model[2]), biases):
        assert torch.equal(layer.bias, bias)
        assert float(layer.values.detach().abs().max()) > 0.05  # U(±1/sqrt(in)), not the std-0.02 init


def test_restructure_by_hand_keeps_adam_working():
    torch.manual_seed(0)
    layer = sk.SparseLinear(32, 32, block_size=8, density=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    kept = layer.block_mask.clone()
    new_mask = kept.clone()
    new_mask[0] = True
    sk.methods.restructure(layer, opt, new_mask)
    state = opt.state[layer.values]
    assert state["exp_avg"].shape == layer.values.shape
    slots = layer.layout().positions_of(sk.BlockLayout.from_block_mask(kept, layer.padded_shape, layer.block_size))
    assert not bool(state["exp_avg_sq"][torch.ones(layer.nnz_blocks, dtype=torch.bool).index_fill_(0, slots, False)].any())
    layer(torch.randn(4, 32)).sum().backward()
    opt.step()  # shapes agree: no size mismatch


@pytest.mark.parametrize("cls", [TopKAST, DPF], ids=lambda c: c.__name__)
def test_shadow_drivers_keep_adams_step_counters_apart(cls):
    # The forward blocks' state and the shadow blocks' state are rebuilt from both optimizers at an
    # update: a shared step counter would be advanced twice per step.
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = cls(model, opt, density=0.4, delta=2, t_end=20)
    _train(model, opt, dst, 5)  # updates at steps 2 and 4
    for name, layer in dst.layers:
        ours, shadow = opt.state[layer.values]["step"], dst.shadow_optimizer.state[dst.shadow[name][0]]["step"]
        assert ours is not shadow and int(ours) == int(shadow) == 5
