"""2:4 pruning masks: which two of every four weights to keep.

Row-wise 2:4 keeps the two largest |w| of every group of four consecutive
weights along the last (input) dimension: this is optimal per group.

Transposable 2:4 keeps, in every 4x4 tile, exactly two weights per row AND two
per column, so both W and Wᵀ are 2:4 (dX = dY W can then use the sparse path
too). Exactly 90 such patterns exist per tile; scoring every tile against all of
them is one (tiles, 16) x (16, 90) matmul, and the argmax is the optimal tile
mask: it keeps at least as much magnitude as any greedy largest-first choice.
"""
import itertools
import math

import torch

_PATTERNS = {}
_TILES_PER_CHUNK = 65536


def transposable_patterns(device=torch.device("cpu")):
    """The 90 4x4 0/1 patterns with two ones per row and per column, as a (90, 16) bool tensor."""
    key = torch.device(device)
    if key not in _PATTERNS:
        pairs = [p for p in itertools.product((0, 1), repeat=4) if sum(p) == 2]
        tiles = [rows for rows in itertools.product(pairs, repeat=4)
                 if all(sum(r[c] for r in rows) == 2 for c in range(4))]
        _PATTERNS[key] = torch.tensor(tiles, dtype=torch.bool).view(len(tiles), 16).to(key)
    return _PATTERNS[key]


def check_2to4_shape(shape, transposable):
    """ValueError naming ``shape`` unless it is 2-D with dims that 2:4 can tile."""
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"2:4 sparsity needs a 2-D weight, got shape {shape}")
    if shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs the last dim to be a multiple of 4, got shape {shape}")
    if transposable and shape[0] % 4:
        raise ValueError(f"transposable 2:4 needs both dims to be multiples of 4, got shape {shape}")


def check_2to4_mask(mask, transposable):
    """ValueError naming the mask unless it keeps exactly two of every four entries along rows
    (and, if ``transposable``, two per column of every 4x4 tile): the one check of a 2:4
    structure (the C++ kernels word their refusals the same way)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    check_2to4_shape(mask.shape, transposable)
    (rows, cols), what = mask.shape, "transposable 2:4" if transposable else "2:4"
    if not bool((mask.reshape(rows, cols // 4, 4).sum(-1) == 2).all()):
        raise ValueError(f"mask of shape {(rows, cols)} is not exactly {what}: it must keep exactly 2 of every 4 "
                         "along rows")
    if transposable and not bool((mask.T.reshape(cols, rows // 4, 4).sum(-1) == 2).all()):
        raise ValueError(f"mask of shape {(rows, cols)} is not exactly transposable 2:4: it must keep exactly 2 per "
                         "column of every 4x4 tile")


def prune_2to4(weight, transposable=False):
    """Bool mask (same shape as ``weight``) keeping 2 of every 4 weights by magnitude.

    weight: (rows, cols) tensor, cols a multiple of 4 (and rows too if
    ``transposable``). Row-wise: the top-2 |w| of every 4 along a row.
    Transposable: per 4x4 tile the pattern (2 per row and per column) of
    largest kept |w|, found exhaustively.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    check_2to4_shape(weight.shape, transposable)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # A NaN ranks below every number (and NaNs tie), so every group still keeps exactly two.
    magnitude = weight.detach().to(dtype).abs().nan_to_num(nan=-1.0, posinf=math.inf)
    rows, cols = weight.shape
    if not transposable:
        # Rank of each entry in its group = how many beat it (larger, or equal and earlier);
        # keep ranks 0 and 1. Ties go to the lower index, as in the Triton kernel.
        a0, a1, a2, a3 = magnitude.view(rows, cols // 4, 4).unbind(-1)
        r0 = (a1 > a0).to(torch.uint8) + (a2 > a0) + (a3 > a0)
        r1 = (a0 >= a1).to(torch.uint8) + (a2 > a1) + (a3 > a1)
        r2 = (a0 >= a2).to(torch.uint8) + (a1 >= a2) + (a3 > a2)
        r3 = (a0 >= a3).to(torch.uint8) + (a1 >= a3) + (a2 >= a3)
        return torch.stack([r0 < 2, r1 < 2, r2 < 2, r3 < 2], dim=-1).view(rows, cols)
    tiles = magnitude.view(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(rows // 4 * (cols // 4), 16)
    patterns = transposable_patterns(weight.device)
    scoring = patterns.T.to(dtype)
    # In chunks: the (tiles, 90) scores of a chunk stay in cache until their argmax.
    best = torch.cat([(part @ scoring).argmax(dim=1) for part in tiles.split(_TILES_PER_CHUNK)]) \
        if tiles.shape[0] else torch.zeros(0, dtype=torch.int64, device=weight.device)
    mask = patterns[best].view(rows // 4, cols // 4, 4, 4).transpose(1, 2)
    return mask.reshape(rows, cols)

