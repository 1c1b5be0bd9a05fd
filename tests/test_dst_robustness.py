"""DST rules and drivers under hostile numbers and batches: NaN scores never change the
number of stored entries, and a zero-token batch on a probe step gives zero scores."""
import pytest
import torch

import sparsekern as sk
from sparsekern.methods import functional as Fn

NAN = float("nan")


def _nan_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 8, generator=g)
    weight[0, :3] = NAN
    grad = torch.randn(6, 8, generator=g)
    grad[2, 1:4] = NAN
    mask = torch.rand(6, 8, generator=g) < 0.5
    return weight, mask, grad


def test_rigl_with_a_nan_weight_keeps_nnz_of_a_tiny_layer():
    weight = torch.tensor([1.0, NAN, 3.0, 0.5, 2.0, 4.0])
    mask = torch.tensor([True, True, True, False, False, True])
    new_mask, new_weight = Fn.rigl_update(weight, mask, torch.arange(6.0), 0.5)
    assert int(new_mask.sum()) == 4
    assert not bool(new_weight[~new_mask].any())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_element_rules_keep_nnz_with_nan_weights_and_gradients(fraction):
    weight, mask, grad = _nan_case()
    active = int(mask.sum())
    assert int(Fn.rigl_update(weight, mask, grad, fraction)[0].sum()) == active
    assert int(Fn.set_update(weight, mask, fraction, torch.Generator().manual_seed(1))[0].sum()) == active
    masks = [mask, ~mask]
    for new_mask, _ in Fn.ggr_update([weight, weight], masks, [grad, grad], fraction):
        assert new_mask.shape == mask.shape
    assert sum(int(m.sum()) for m, _ in Fn.ggr_update([weight, weight], masks, [grad, grad], fraction)) == 48
    snfs = Fn.snfs_update([weight, weight], masks, [grad, grad], fraction)
    assert sum(int(m.sum()) for m, _ in snfs) == 48


@pytest.mark.parametrize("driver", ["RigL", "SET", "GGR", "SNFS"])
def test_block_drivers_keep_nnz_after_a_nan_batch(driver):
    torch.manual_seed(0)
    model = torch.nn.Sequential(sk.SparseLinear(32, 32, block_size=8, density=0.5),
                                sk.SparseLinear(32, 16, block_size=8, density=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = getattr(sk.methods, driver)(model, opt, density=0.5, delta=1, t_end=20)
    total = sum(layer.nnz_blocks for layer in model)
    per_layer = [layer.nnz_blocks for layer in model]
    for step in range(6):
        x = torch.randn(4, 32)
        if step == 2:
            x[0, 0] = NAN
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        dst.step()
        assert sum(layer.nnz_blocks for layer in model) == total
        if driver in ("RigL", "SET"):
            assert [layer.nnz_blocks for layer in model] == per_layer


@pytest.mark.parametrize("score_method", ["gram", "product", "auto"])
def test_an_empty_batch_on_a_probe_step_gives_zero_scores(score_method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(sk.SparseLinear(64, 64, block_size=8, density=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sk.methods.RigL(model, opt, density=0.5, delta=2, t_end=10, score_method=score_method)
    nnz = model[0].nnz_blocks
    for _ in range(2):
        model(torch.randn(0, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        dst.step()
    assert model[0].nnz_blocks == nnz


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_nan_grow_score_cannot_make_a_2to4_group_regrow_too_few(backend):
    weight = torch.zeros(1, 12)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    grad = torch.tensor([[1.0, 1, 1, 1, 0, NAN, 1, 1, 1, 1, 1, 1]])
    with sk.use_backend(backend):
        new_mask, _ = Fn.semi_rigl_update(weight, mask, grad, 0.5)
    assert new_mask.view(3, 4).sum(1).tolist() == [2, 2, 2]


@pytest.mark.parametrize("driver", ["RigL", "SET", "TopKAST", "DPF"])
def test_an_optimizer_made_before_sparsify_is_refused(driver):
    """It holds the replaced dense weights: the driver would restructure layers nothing trains."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sk.sparsify(model, density=0.5, method="erk", block_size=8)
    with pytest.raises(ValueError, match=r"holds none of the sparse layers' values \(\['0', '2'\]\).*after sparsify"):
        getattr(sk.methods, driver)(model, optimizer, density=None, delta=2, t_end=10)


def test_layers_the_optimizer_leaves_out_are_named():
    model = torch.nn.Sequential(sk.SparseLinear(32, 32, block_size=8), torch.nn.ReLU(),
                                sk.SparseLinear(32, 8, block_size=8))
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"does not hold the values of \['2'\]"):
        sk.methods.RigL(model, optimizer, density=None, delta=2, t_end=10)


@pytest.mark.parametrize("driver", ["RigL", "SET", "SNFS", "GGR", "TopKAST", "DPF"])
def test_frozen_sparse_layers_keep_their_structure(driver):
    """A frozen layer (values.requires_grad False, left out of the optimizer) is no driver's to
    restructure: no gradient reaches it (RigL crashed there, asking for a backward that had run)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(sk.SparseLinear(32, 32, block_size=8, density=0.75), torch.nn.ReLU(),
                                sk.SemiSparseLinear(32, 32), torch.nn.ReLU(),
                                sk.SparseLinear(32, 8, block_size=8, density=0.5))
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    frozen = model[0].block_mask.clone(), model[2].indices.clone(), model[0].values.detach().clone()
    method = getattr(sk.methods, driver)(model, optimizer, density=None, delta=2, t_end=50)
    assert [name for name, _ in method.layers] == ["4"] and not method.semi_layers
    for _ in range(8):
        optimizer.zero_grad()
        model(torch.randn(16, 32)).square().mean().backward()
        method.step()
        optimizer.step()
    assert torch.equal(model[0].block_mask, frozen[0]) and torch.equal(model[2].indices, frozen[1])
    torch.testing.assert_close(model[0].values, frozen[2])


def test_a_model_with_only_frozen_sparse_layers_is_refused():
    model = torch.nn.Sequential(sk.SparseLinear(32, 8, block_size=8).requires_grad_(False))
    with pytest.raises(ValueError, match="holds no sparsekern.SparseLinear.*to train.*frozen ones"):
        sk.methods.RigL(model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), density=None,
                        delta=2, t_end=10)
