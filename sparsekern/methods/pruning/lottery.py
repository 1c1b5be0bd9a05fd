"""Lottery tickets: iterative magnitude pruning (IMP) with weight or learning-rate rewinding.

Frankle & Carbin (2019), Frankle et al. (2020, rewinding to step k), Renda et al.
(2020, learning-rate rewinding). Each round trains, prunes a fraction of the
remaining weights globally by magnitude (at block granularity: the global ranking
sets each layer's share, blocks are picked inside each layer), then either
rewinds the surviving weights to their values at step k ("weights") or keeps the
trained weights and restarts the learning-rate schedule ("lr"). Only round 0 trains dense; every
later round trains on ``SparseLinear`` / ``SparseConv2d`` layers (a convolution's blocks are output x
input channel blocks with all their taps), so IMP's repeated trainings get cheaper as the network
thins instead of costing a dense training each.
"""
import torch
from torch import nn

from ...formats.bsr import _as_block_size
from ...nn.bsr_linear import SparseLinear
from ...nn.conv2d import SparseConv2d
from .masks import block_grid, block_scores, expand_block_mask, global_topk_masks, topk_mask
from .sparsify import dense_by_default, replace_module, sparsifiable_layers, to_sparse


def prune_remaining(scores, masks, fraction):
    """Prune the ``fraction`` of currently kept entries with the lowest scores, across all tensors.

    ``scores`` and ``masks`` are matching lists; returns new bool masks (a subset of ``masks``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    scores, masks = list(scores), list(masks)
    flat = torch.cat([s.flatten().double().masked_fill(~m.flatten(), float("inf")) for s, m in zip(scores, masks)])
    alive = int(sum(int(m.sum()) for m in masks))
    pruned = int(round(fraction * alive))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, pruned, largest=False).indices] = False
    keep &= torch.cat([m.flatten() for m in masks])
    return [k.view(m.shape) for k, m in zip(keep.split([m.numel() for m in masks]), masks)]


def geometric_schedule(density, rounds):
    """Densities after each of ``rounds`` rounds, pruning the same fraction of the remainder each time."""
    if rounds < 1 or not 0.0 < density <= 1.0:
        raise ValueError(f"need rounds >= 1 and density in (0, 1], got rounds={rounds}, density={density}")
    return [density ** (r / rounds) for r in range(1, rounds + 1)]


def _global_magnitude_round(trained, masks, names, target, block_size):
    """Masks at ``target`` density: the global element-level magnitude ranking sets each
    layer's share (as element-wise IMP would), then each layer keeps its largest alive blocks.

    Ranking block norms across layers directly would empty whole layers: a block norm
    aggregates b*b weights, so it barely varies inside a layer, and the layer with the
    larger weights (here the 784-input one) would take the whole budget.
    """
    shapes = {n: trained[n][0].shape for n in names}
    elements = [trained[n][0].abs() * expand_block_mask(masks[n], block_size, shapes[n]) for n in names]
    shares = global_topk_masks(elements, int(round(target * sum(e.numel() for e in elements))))
    out = {}
    for n, share in zip(names, shares):
        keep = min(int(masks[n].sum()), int(round(float(share.float().mean()) * masks[n].numel())))
        scores = block_scores(trained[n][0].abs(), block_size).masked_fill(~masks[n], -1.0)
        out[n] = topk_mask(scores, keep)
    return out


def linear_weights(model):
    """{layer name: (dense weight, bias)} detached copies, for the Linear and Conv2d layers, dense
    (nn.Linear, nn.Conv2d) or block-sparse (SparseLinear, SparseConv2d)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)):
            weight = m.weight if isinstance(m, (nn.Linear, nn.Conv2d)) else m.dense_weight()
            out[name] = (weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
    return out


def _fill(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def apply_masks(model, block_masks, weights, block_size):
    """Replace each layer named in ``block_masks`` by a SparseLinear / SparseConv2d with
    ``weights[name]`` on that mask; other layers named in ``weights`` get those weights (dense)."""
    block_size = _as_block_size(block_size)
    modules = dict(model.named_modules())
    for name, (weight, bias) in weights.items():
        layer = modules[name]
        if name in block_masks:
            dense = layer.to_dense() if isinstance(layer, (SparseLinear, SparseConv2d)) else layer
            replace_module(model, name, to_sparse(_fill(dense, weight, bias), block_masks[name], block_size))
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            _fill(layer, weight, bias)
    return model


def _rest_of_state(model, layers):
    """Every parameter and buffer outside the Linear / Conv2d ``layers`` (BatchNorm, embeddings...):
    weight rewinding resets them to step k too."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()
            if key.rpartition(".")[0] not in layers}


def iterative_magnitude_pruning(model, train, *, density=None, rounds=None, schedule=None, block_size=32,
                                rewind="weights", dense_layers=(), on_round=None):
    """Find a lottery ticket by IMP; returns (model, history).

    Round 0 trains dense; round r prunes to ``schedule[r-1]`` and trains the ticket.
    For the random re-initialisation control, put a history entry's masks on a fresh
    model with ``apply_masks(fresh, masks, linear_weights(fresh), block_size)``.

    Args:
        model: a model with nn.Linear / nn.Conv2d layers (trained dense in round 0).
        train: ``train(model, snapshot)`` trains in place with a fresh optimizer and the
            full learning-rate schedule, calls ``snapshot()`` once at the rewind step k
            (not calling it means k = 0), and returns anything (recorded in history).
        density, rounds: target density reached in ``rounds`` geometric prunings; or
        schedule: explicit list of decreasing densities, one per round.
        block_size: pruning granularity (1 = unstructured, no faster than dense).
        rewind: "weights" (reset to step k: the layers' weights and every other parameter
            and buffer, e.g. BatchNorm's) or "lr" (keep trained weights; ``train`` restarts
            its schedule).
        dense_layers: Linear / Conv2d module names never pruned. Tied layers and the
            convolutions channel blocks do not fit (a stem conv) stay dense too, with a
            warning, as in ``sparsify``; a convolution needs a square ``block_size``.
        on_round: optional ``on_round(round, density, model, result)`` after each training.

    History: one dict per training: round, density (target fraction of the pruned
    layers' blocks), result, and the block masks used.
    """
    if rewind not in ("weights", "lr"):
        raise ValueError(f"rewind must be 'weights' or 'lr', got {rewind!r}")
    if schedule is None:
        if density is None or rounds is None:
            raise ValueError("give density and rounds, or an explicit schedule")
        schedule = geometric_schedule(density, rounds)
    schedule = [float(d) for d in schedule]
    if any(not 0.0 < d <= 1.0 for d in schedule) or any(b > a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"schedule must be decreasing densities in (0, 1], got {schedule}")
    block_size = _as_block_size(block_size)
    sparse = [n for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    if sparse:
        raise ValueError(f"iterative_magnitude_pruning starts from a dense model (round 0 trains it dense), but "
                         f"{sparse} are already block-sparse: pass the model before sparsify")
    dense_layers = dense_by_default(model, block_size, dense_layers, "iterative_magnitude_pruning")
    layers = dict(sparsifiable_layers(model))
    names = [n for n in layers if n not in dense_layers]

    def rewind_point():
        weights = linear_weights(model)
        return weights, _rest_of_state(model, weights)

    rewind_to = {"point": rewind_point()}

    def snapshot():
        rewind_to["point"] = rewind_point()

    history = []

    def run(round_index, target, block_masks):
        result = train(model, snapshot if round_index == 0 else (lambda: None))
        history.append(dict(round=round_index, density=target, result=result,
                            block_masks={n: m.clone() for n, m in block_masks.items()}))
        if on_round is not None:
            on_round(round_index, target, model, result)

    masks = {n: torch.ones(block_grid(layers[n].weight.shape, block_size), dtype=torch.bool,
                           device=layers[n].weight.device) for n in names}
    run(0, 1.0, masks)
    for r, target in enumerate(schedule, start=1):
        trained = linear_weights(model)
        masks = _global_magnitude_round(trained, masks, names, target, block_size)
        if rewind == "weights":
            weights, rest = rewind_to["point"]
            apply_masks(model, masks, weights, block_size)
            model.load_state_dict(rest, strict=False)
        else:
            apply_masks(model, masks, trained, block_size)
        run(r, target, masks)
    return model, history
