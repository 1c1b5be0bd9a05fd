"""2:4 pruning masks: exact small cases, optimality of the transposable search, bad input."""
import itertools

import pytest
import torch

import sparsekern as sk
from sparsekern.formats.semi_prune import transposable_patterns


def _greedy_transposable(tile):
    """Largest-first: take |w| in decreasing order while its row and column have < 2; None if stuck."""
    rows, cols, kept = [0] * 4, [0] * 4, torch.zeros(4, 4, dtype=torch.bool)
    for flat in torch.argsort(tile.abs().flatten(), descending=True).tolist():
        r, c = divmod(flat, 4)
        if rows[r] < 2 and cols[c] < 2:
            rows[r] += 1
            cols[c] += 1
            kept[r, c] = True
    return kept if kept.sum() == 8 else None


def test_row_wise_exact():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.3]])
    expected = torch.tensor([[False, True, True, False, True, False, False, True]])
    assert torch.equal(sk.prune_2to4(w), expected)


@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (8, 36)], ids=str)
def test_row_wise_keeps_top2_of_every_group(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = sk.prune_2to4(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    groups, kept = w.abs().view(shape[0], -1, 4), mask.view(shape[0], -1, 4)
    assert bool((kept.sum(-1) == 2).all())
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = groups.masked_fill(kept, -1.0).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())


def test_ninety_patterns():
    patterns = transposable_patterns().view(-1, 4, 4)
    assert patterns.shape[0] == 90 == len({tuple(p.flatten().tolist()) for p in patterns})
    assert bool((patterns.sum(1) == 2).all() and (patterns.sum(2) == 2).all())


def test_transposable_exact():
    w = torch.tensor([[9.0, 8.0, 7.0, 0.0],
                      [6.0, 5.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 1.0],
                      [0.0, 0.0, 1.0, 1.0]])
    # Greedy takes 9, 8 (row 0), then 6, 5 (row 1) and must then fill the rest with ones; same here.
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sk.prune_2to4(w, transposable=True), expected)


def test_transposable_is_optimal_and_beats_greedy():
    g = torch.Generator().manual_seed(1)
    tiles = torch.randn(200, 4, 4, generator=g, dtype=torch.float64)
    w = tiles.view(10, 20, 4, 4).transpose(1, 2).reshape(40, 80)   # 10 x 20 grid of the tiles
    mask = sk.prune_2to4(w, transposable=True)
    assert bool((mask.view(40, 20, 4).sum(-1) == 2).all()) and bool((mask.T.reshape(80, 10, 4).sum(-1) == 2).all())
    kept = (w.abs() * mask).view(10, 4, 20, 4).transpose(1, 2).reshape(200, 16).sum(-1)
    all_patterns = [p for p in itertools.product((0, 1), repeat=16)
                    if all(sum(p[4 * r:4 * r + 4]) == 2 for r in range(4))
                    and all(sum(p[c::4]) == 2 for c in range(4))]
    brute = (tiles.abs().view(200, 16) @ torch.tensor(all_patterns, dtype=torch.float64).T).amax(-1)
    torch.testing.assert_close(kept, brute)
    beaten = 0
    for t, tile in enumerate(tiles):
        greedy = _greedy_transposable(tile)
        if greedy is not None:
            greedy_kept = (tile.abs() * greedy).sum()
            assert kept[t] >= greedy_kept - 1e-12
            beaten += bool(kept[t] > greedy_kept + 1e-12)
    assert beaten > 0  # greedy is not optimal on random tiles; the exhaustive search is


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(dtype):
    w = torch.randn(8, 8).to(dtype)
    for transposable in (False, True):
        mask = sk.prune_2to4(w, transposable=transposable)
        assert mask.shape == w.shape and bool((mask.view(8, 2, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("shape,transposable", [((4, 6), False), ((6, 8), True), ((8,), False), ((2, 3, 4), False)],
                         ids=str)
def test_bad_shapes_name_the_shape(shape, transposable):
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        sk.prune_2to4(torch.randn(shape), transposable=transposable)


def test_non_tensor_is_type_error():
    with pytest.raises(TypeError):
        sk.prune_2to4([[1.0, 2.0, 3.0, 4.0]])


@pytest.mark.parametrize("transposable", [False, True])
def test_nan_weights_still_keep_exactly_two_per_group(transposable):
    weight = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, float("nan"), float("nan"), 5.0, float("nan")]] * 4)
    mask = sk.prune_2to4(weight, transposable=transposable)
    assert mask.view(4, 2, 4).sum(-1).eq(2).all()
    if transposable:
        assert mask.T.reshape(8, 1, 4).sum(-1).eq(2).all()
    else:
        assert not mask[:, 0].any()  # a NaN ranks below every number
