import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import (apply_masks, block_scores, expand_block_mask, geometric_schedule, global_magnitude_mask,
                                iterative_magnitude_pruning, linear_weights, prune_remaining)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _trainer(steps=6, snapshot_at=2):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 24, generator=g), torch.randint(0, 5, (32,), generator=g)

    def train(model, snapshot):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            if step == snapshot_at:
                snapshot()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()
    return train


def test_prune_remaining_prunes_lowest_alive():
    scores = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([[0.5, 4.0]])]
    masks = [torch.tensor([True, True, True]), torch.tensor([[False, True]])]
    out = prune_remaining(scores, masks, 0.5)  # 4 alive -> prune 2: scores 1 and 3 (0.5 already pruned)
    assert out[0].tolist() == [True, False, False] and out[1].tolist() == [[False, True]]
    with pytest.raises(ValueError, match="fraction"):
        prune_remaining(scores, masks, 1.5)


def test_geometric_schedule():
    assert geometric_schedule(0.01, 2) == pytest.approx([0.1, 0.01])
    with pytest.raises(ValueError):
        geometric_schedule(0.1, 0)


def test_imp_schedule_and_structure():
    model, history = iterative_magnitude_pruning(_mlp(), _trainer(), schedule=[0.5, 0.25], block_size=8)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(isinstance(model[i], sk.SparseLinear) for i in (0, 2, 4))
    cells = sum(model[i].block_mask.numel() for i in (0, 2, 4))
    assert sum(model[i].nnz_blocks for i in (0, 2, 4)) == round(0.25 * cells)
    # Masks shrink monotonically.
    for a, b in zip(history[1:], history[2:]):
        assert all((b["block_masks"][n] <= a["block_masks"][n]).all() for n in a["block_masks"])


def test_rewinding_puts_step_k_values_on_the_mask():
    captured = {}
    base = _trainer()

    def train(m, snapshot):
        def snap():
            captured.setdefault("weights", linear_weights(m))
            snapshot()
        out = base(m, snap)
        captured.setdefault("before_prune", []).append(linear_weights(m))
        return out

    seen = []

    def train_checking(m, snapshot):
        if captured.get("weights") is not None:  # rounds >= 1: the model was just rewound
            seen.append({n: (w.clone(), b.clone()) for n, (w, b) in linear_weights(m).items()})
        return train(m, snapshot)

    model, history = iterative_magnitude_pruning(_mlp(), train_checking, schedule=[0.4], block_size=8)
    at_k, rewound, masks = captured["weights"], seen[0], history[1]["block_masks"]
    for name, (w, b) in rewound.items():
        element_mask = expand_block_mask(masks[name], 8, w.shape)
        torch.testing.assert_close(w, at_k[name][0] * element_mask)
        torch.testing.assert_close(b, at_k[name][1])
    # The mask is the magnitude ticket of the *trained* round-0 weights: the global element
    # ranking sets each layer's share, then each layer keeps its largest blocks.
    trained = captured["before_prune"][0]
    names = list(masks)
    total = sum(trained[n][0].numel() for n in names)
    shares = global_magnitude_mask([trained[n][0] for n in names], total - round(0.4 * total))
    for name, share in zip(names, shares):
        kept, scores = masks[name].flatten(), block_scores(trained[name][0].abs(), 8).flatten()
        assert int(kept.sum()) == round(float(share.float().mean()) * kept.numel())
        if kept.any() and (~kept).any():
            assert scores[kept].min() >= scores[~kept].max()


def test_imp_does_not_collapse_a_layer_with_smaller_weights():
    # Stand-in for training: the last layer ends with somewhat smaller weights. Ranking block
    # norms across layers would leave the last layer without blocks.
    def train(model, snapshot):
        with torch.no_grad():
            if isinstance(model[4], nn.Linear):
                model[4].weight.mul_(0.8)
    _, history = iterative_magnitude_pruning(_mlp(), train, schedule=[0.3], block_size=4)
    assert all(m.any() for m in history[-1]["block_masks"].values())


def test_lr_rewinding_keeps_trained_weights():
    seen = []
    base = _trainer()

    def train(m, snapshot):
        seen.append(linear_weights(m))
        out = base(m, snapshot)
        seen.append(linear_weights(m))
        return out

    _, history = iterative_magnitude_pruning(_mlp(), train, schedule=[0.5], block_size=8, rewind="lr",
                                             dense_layers=("4",))
    trained, restarted, masks = seen[1], seen[2], history[1]["block_masks"]
    assert "4" not in masks
    for name, (w, _) in restarted.items():
        mask = expand_block_mask(masks[name], 8, w.shape) if name in masks else torch.ones_like(w, dtype=torch.bool)
        torch.testing.assert_close(w, trained[name][0] * mask)


def test_reinit_control_via_apply_masks():
    model, history = iterative_magnitude_pruning(_mlp(), _trainer(steps=2), density=0.25, rounds=1, block_size=8)
    fresh = _mlp(seed=1)
    init = linear_weights(fresh)
    control = apply_masks(fresh, history[-1]["block_masks"], init, (8, 8))
    for i in (0, 2, 4):
        assert torch.equal(control[i].block_mask, model[i].block_mask)
        mask = expand_block_mask(model[i].block_mask, 8, init[str(i)][0].shape)
        torch.testing.assert_close(control[i].dense_weight(), init[str(i)][0] * mask)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rewind"):
        iterative_magnitude_pruning(_mlp(), _trainer(), schedule=[0.5], rewind="nope")
    with pytest.raises(ValueError, match="schedule"):
        iterative_magnitude_pruning(_mlp(), _trainer(), density=0.5)
    with pytest.raises(ValueError, match="decreasing"):
        iterative_magnitude_pruning(_mlp(), _trainer(), schedule=[0.2, 0.5])
