"""Pure DST update rules and schedules: exact small cases and invariants."""
import math

import pytest
import torch

from sparsekern import methods
from sparsekern.methods import functional as Fn
from sparsekern.methods.dst.schedules import DropSchedule, gradual_density


def _w():
    w = torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, 0.0, -0.2]], dtype=torch.float64)
    return w, w != 0


def test_rigl_exact():
    w, mask = _w()
    grad = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    new_mask, new_w = Fn.rigl_update(w, mask, grad, 0.5)
    assert new_mask.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert new_w.tolist() == [[0.5, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]]


def test_rigl_just_dropped_can_return_and_keeps_its_value():
    w, mask = _w()
    grad = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # drops idx 1 and 7, regrows idx 1
    new_mask, new_w = Fn.rigl_update(w, mask, grad, 0.5)
    assert new_mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert new_w.tolist() == [[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]]


def test_rigl_ties_are_broken_by_index():
    w = torch.ones(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    new_mask, _ = Fn.rigl_update(w, mask, torch.zeros(2, 3), 0.7)  # floor(3 * 0.7) = 2
    # drops indices 0 and 1 (lowest), keeps 3; grows the lowest free indices 0 and 1
    assert new_mask.tolist() == mask.tolist()
    assert Fn.rigl_update(w, mask, torch.zeros(2, 3), 0.7)[0].tolist() == new_mask.tolist()


def test_drop_count_is_floor():
    assert Fn.n_to_drop(10, 0.3) == 3 and Fn.n_to_drop(7, 0.5) == 3 and Fn.n_to_drop(5, 0.0) == 0


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)], ids=str)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_rigl_and_set_invariants(shape, fraction):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.4
    for new_mask, new_w in (Fn.rigl_update(w, mask, torch.randn(shape, generator=g), fraction),
                            Fn.set_update(w, mask, fraction, generator=g)):
        assert int(new_mask.sum()) == int(mask.sum())
        assert bool((new_w[~new_mask] == 0).all())
        assert bool((new_w[new_mask & ~mask] == 0).all())
        assert torch.equal(new_w[new_mask & mask], w[new_mask & mask])
        # the kept entries are the largest |w| among the active ones
        n_drop = Fn.n_to_drop(int(mask.sum()), fraction)
        kept = (mask & new_mask).sum()
        assert int(kept) >= int(mask.sum()) - n_drop


def test_set_exact_drop_and_seeded_regrowth():
    w, mask = _w()
    a = Fn.set_update(w, mask, 0.5, generator=torch.Generator().manual_seed(3))
    b = Fn.set_update(w, mask, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    new_mask, new_w = a
    assert bool(new_mask[0, 0]) and bool(new_mask[1, 0])  # the two largest survive
    assert int(new_mask.sum()) == 4
    assert torch.equal(new_w, torch.where(new_mask & mask, w, torch.zeros_like(w)))


def test_bad_inputs():
    w, mask = _w()
    with pytest.raises(TypeError, match="bool"):
        Fn.rigl_update(w, mask.float(), w, 0.1)
    with pytest.raises(ValueError, match="drop_fraction"):
        Fn.set_update(w, mask, 1.5)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        Fn.rigl_update(w, mask, torch.zeros(3), 0.1)


def test_allocate_proportional_and_capped():
    assert Fn.allocate(5, [1.0, 1.0], [10, 10]) == [3, 2]
    assert Fn.allocate(10, [1.0, 0.0], [3, 10]) == [3, 7]
    assert Fn.allocate(4, [3.0, 1.0], [10, 10]) == [3, 1]
    assert Fn.allocate(50, [1.0, 1.0], [3, 4]) == [3, 4]


def test_snfs_moves_density_to_the_layer_with_larger_momentum():
    w1 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    w2 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    m1, m2 = w1 != 0, w2 != 0
    mom1 = torch.tensor([3.0, 3.0, 3.0, 3.0, 1.0, 2.0])  # mean |momentum| on active: 3
    mom2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0, 0.5])  # 1
    (n1, v1), (n2, v2) = Fn.snfs_update([w1, w2], [m1, m2], [mom1, mom2], 0.5)
    # each drops 2 (values 1, 2); the 4 go 3:1; layer 1 has 4 free slots
    # layer 1 grows 3 of its free {0, 1, 4, 5} by |momentum|: 0, 1 (3, tie by index), 5 (2);
    # 0 and 1 were just dropped, so they come back with their values
    assert n1.tolist() == [True, True, True, True, False, True]
    assert n2.tolist() == [False, False, True, True, True, False]
    assert v1.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0] and v2.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 0.0]
    assert int(n1.sum() + n2.sum()) == 8


def test_ggr_regrows_globally_by_gradient():
    w1 = torch.tensor([1.0, 2.0, 0.0, 0.0])
    w2 = torch.tensor([1.0, 2.0, 0.0, 0.0])
    masks = [w1 != 0, w2 != 0]
    g1 = torch.tensor([0.0, 0.0, 0.1, 0.2])
    g2 = torch.tensor([0.0, 0.0, 0.3, 0.4])
    (n1, v1), (n2, v2) = Fn.ggr_update([w1, w2], masks, [g1, g2], 0.5)
    assert n1.tolist() == [False, True, False, False]
    assert n2.tolist() == [False, True, True, True]
    assert v2.tolist() == [0.0, 2.0, 0.0, 0.0]
    # min_active keeps a layer from emptying
    (n1, _), _ = Fn.ggr_update([w1, w2], masks, [g1, g2], 1.0, min_active=1)
    assert int(n1.sum()) >= 1


def test_topkast_masks_and_penalty():
    w = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.2])
    a, b = Fn.topkast_masks(w, 0.4, 0.6)
    assert a.tolist() == [False, True, True, False, False]
    assert b.tolist() == [False, True, True, True, False]
    grad = Fn.topkast_penalty_grad(w, a, 0.4, 0.1)
    assert torch.allclose(grad, torch.tensor([0.025, -0.09, 0.05, 0.075, -0.05]))


def test_dpf_mask():
    w = torch.tensor([[0.1, -0.9], [0.5, 0.3]])
    assert Fn.dpf_mask(w, 0.5).tolist() == [[False, True], [True, False]]


def test_drop_schedule():
    s = DropSchedule(delta=100, alpha=0.3, t_end=750)
    assert [t for t in range(1, 1001) if s.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(375) == pytest.approx(0.15)
    assert s.drop_fraction(750) == pytest.approx(0.0, abs=1e-12)
    assert s.drop_fraction(200) == pytest.approx(0.15 * (1 + math.cos(math.pi * 200 / 750)))
    c = DropSchedule(delta=10, alpha=0.2, t_end=50, kind="constant")
    assert c.drop_fraction(40) == 0.2
    with pytest.raises(ValueError, match="kind"):
        DropSchedule(t_end=10, kind="linear")


def test_gradual_density():
    assert gradual_density(0, 0.1, t_end=100) == pytest.approx(1.0)
    assert gradual_density(100, 0.1, t_end=100) == pytest.approx(0.1)
    assert gradual_density(50, 0.1, t_end=100) == pytest.approx(0.1 + 0.9 * 0.125)


def test_topk_mask_breaks_ties_by_lower_index_in_both_namespaces():
    score = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert Fn.topk_mask(score, 2).tolist() == [False, True, True, False, False]
    assert Fn.topk_mask is methods.topk_mask
    assert methods.topk_mask(score, 0.6).tolist() == [False, True, True, False, True]



@pytest.mark.parametrize("rule", ["snfs", "ggr"])
def test_redistribution_counts_weights_when_blocks_differ_in_size(rule):
    # Layer 0's blocks hold 9 weights (a 3x3 conv's), layer 1's hold 1; layer 1 has the larger
    # gradients and momentum, so it gains entries. Both rules keep the stored weights within one
    # block of the target, below it, and equal the block-count rule when the sizes agree.
    g = torch.Generator().manual_seed(0)
    masks = [torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)]
    masks[0].view(-1)[:8] = True
    masks[1].view(-1)[8:] = True
    weights = [torch.rand(4, 4, generator=g) * m for m in masks]
    scores = [torch.rand(4, 4, generator=g), 10 + torch.rand(4, 4, generator=g)]

    def update(**kwargs):
        if rule == "snfs":
            return [m for m, _ in Fn.snfs_update(weights, masks, scores, 0.5, grow_scores=scores, **kwargs)]
        return [m for m, _ in Fn.ggr_update(weights, masks, scores, 0.5, **kwargs)]

    sizes, target = [9, 1], 8 * 9 + 8
    new = update(cell_sizes=sizes, target=target)
    stored = sum(int(m.sum()) * c for m, c in zip(new, sizes))
    assert target - 9 < stored <= target
    assert int(new[1].sum()) > 8  # the important layer grew
    assert all(torch.equal(a, b) for a, b in zip(update(cell_sizes=[4, 4]), update()))
    assert sum(int(m.sum()) for m in update(cell_sizes=[2, 2], target=2 * 20)) == 20  # a target in weights
