"""IMP on a CNN: convolutions pruned in output x input channel blocks with all their taps, checked
against the rule computed in plain torch; the stem conv and BatchNorm stay dense and are rewound."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import apply_masks, iterative_magnitude_pruning, linear_weights

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 4
STEM_WARNING = r"leaving the convolutions \['0'\] dense"


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # stem: 3 input channels < block 4
        nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU(),           # block grid (3, 2)
        nn.Conv2d(12, 10, (3, 1), padding="same"), nn.ReLU(),          # 10 outputs: an edge block row
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 6))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 6, (16,), generator=g)


def _trainer(log, steps=5, snapshot_at=2):
    x, y = _batch()

    def train(model, snapshot):
        log.append(dict(before=_state(model)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(steps):
            if step == snapshot_at:
                log[-1]["at_k"] = _state(model)
                snapshot()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        log[-1]["after"] = _state(model)
        return loss.item()
    return train


def _state(model):
    """Dense weights of every layer (sparse ones expanded) and the BatchNorm state."""
    out = {name: w for name, (w, _) in linear_weights(model).items()}
    out.update({f"bn.{k}": v.clone() for k, v in model[1].state_dict().items()})
    return out


def block_norms(weight):
    """Block norms over output x input channel blocks with all taps, edge blocks scaled to a
    whole block's worth of elements (plain torch)."""
    out_ch, in_ch = weight.shape[:2]
    rb, cb = math.ceil(out_ch / BS), math.ceil(in_ch / BS)

    def per_block(t):
        t = F.pad(t.reshape(out_ch, in_ch, -1), (0, 0, 0, cb * BS - in_ch, 0, rb * BS - out_ch))
        return t.reshape(rb, BS, cb, BS, -1).sum((1, 3, 4))
    full = BS * BS * math.prod(weight.shape[2:])
    return (per_block(weight.square()) * full / per_block(torch.ones_like(weight))).sqrt()


def element_mask(block_mask, shape):
    """The weights of ``shape`` (out, in, *taps) that the (RB, CB) ``block_mask`` keeps (plain torch)."""
    full = block_mask.repeat_interleave(BS, 0).repeat_interleave(BS, 1)[:shape[0], :shape[1]]
    return full.reshape(*full.shape, *[1] * (len(shape) - 2)).expand(shape)


def _expected_masks(trained, alive, target):
    """IMP's rule: the global |w| ranking over the alive weights sets each layer's share; each
    layer keeps its largest-norm alive blocks."""
    names = list(alive)
    scores = [trained[n].abs() * element_mask(alive[n], trained[n].shape) for n in names]
    flat = torch.cat([s.flatten() for s in scores])
    keep = round(target * flat.numel())
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[torch.topk(flat, keep).indices] = True
    out = {}
    for n, share in zip(names, kept.split([s.numel() for s in scores])):
        count = min(int(alive[n].sum()), round(float(share.float().mean()) * alive[n].numel()))
        norms = block_norms(trained[n]).masked_fill(~alive[n], -1.0).flatten()
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask[torch.topk(norms, count).indices] = True
        out[n] = mask.view(alive[n].shape)
    return out


@pytest.mark.parametrize("rewind", ["weights", "lr"])
def test_imp_prunes_conv_blocks_by_their_norm_over_all_taps_and_rewinds(rewind):
    log = []
    with pytest.warns(UserWarning, match=STEM_WARNING):
        model, history = iterative_magnitude_pruning(_cnn(), _trainer(log), schedule=[0.5, 0.25], block_size=BS,
                                                     rewind=rewind)
    assert [type(m).__name__ for m in model if not isinstance(m, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten))] == [
        "Conv2d", "BatchNorm2d", "SparseConv2d", "SparseConv2d", "SparseLinear"]
    assert {n: tuple(m.shape) for n, m in history[1]["block_masks"].items()} == {"3": (3, 2), "5": (3, 3),
                                                                              "9": (2, 3)}
    alive = {n: torch.ones_like(m) for n, m in history[1]["block_masks"].items()}
    for r in (1, 2):
        masks = history[r]["block_masks"]
        expected = _expected_masks(log[r - 1]["after"], alive, history[r]["density"])
        assert all(torch.equal(masks[n], expected[n]) for n in masks), r
        # The ticket: step-k values (or the trained ones) on the kept blocks; the stem conv and
        # BatchNorm are rewound with them.
        source = log[0]["at_k"] if rewind == "weights" else log[r - 1]["after"]
        start = log[r]["before"]
        for name, weight in start.items():
            mask = element_mask(masks[name], weight.shape) if name in masks else 1
            torch.testing.assert_close(weight, source[name] * mask, msg=f"round {r}, {name}")
        alive = masks
    kept = [element_mask(model[i].block_mask, model[i].dense_weight().shape) for i in (3, 5, 9)]
    # The density is a fraction of the weights; whole blocks of 144, 48 and 16 weights round it.
    assert sum(int(k.sum()) for k in kept) / sum(k.numel() for k in kept) == pytest.approx(0.25, abs=0.02)
    assert all(math.isfinite(h["result"]) for h in history)


def test_the_reinit_control_puts_the_masks_on_a_fresh_cnn():
    with pytest.warns(UserWarning, match=STEM_WARNING):
        _, history = iterative_magnitude_pruning(_cnn(), _trainer([], steps=2), schedule=[0.3], block_size=BS)
    fresh = _cnn(seed=1)
    init = linear_weights(fresh)
    control = apply_masks(fresh, history[-1]["block_masks"], init, BS)
    assert type(control[0]) is nn.Conv2d and torch.equal(control[0].weight, init["0"][0])
    for i in (3, 5, 9):
        mask, weight = history[-1]["block_masks"][str(i)], init[str(i)][0]
        assert torch.equal(control[i].block_mask, mask)
        torch.testing.assert_close(control[i].dense_weight(), weight * element_mask(mask, weight.shape))
    x, _ = _batch()
    assert control(x).shape == (16, 6)


def test_imp_on_a_cnn_refuses_before_training():
    def train(model, snapshot):
        raise AssertionError("must not train")
    with pytest.raises(ValueError, match="square block"):
        iterative_magnitude_pruning(_cnn(), train, schedule=[0.5], block_size=(4, 8), dense_layers=["0"])
    with pytest.raises(ValueError, match="not an nn.Linear or nn.Conv2d"):
        iterative_magnitude_pruning(_cnn(), train, schedule=[0.5], block_size=BS, dense_layers=["0", "1"])
    sparse = sk.sparsify(_cnn(), density=0.5, block_size=BS, dense_layers=["0"])
    with pytest.raises(ValueError, match="already block-sparse"):
        iterative_magnitude_pruning(sparse, train, schedule=[0.5], block_size=BS, dense_layers=["0"])
