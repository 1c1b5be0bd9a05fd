"""``sparsify``: convert a model's ``nn.Linear`` and ``nn.Conv2d`` layers to ``SparseLinear`` and
``SparseConv2d`` with a pruning-at-init method.

Two questions decide a mask: how many blocks each layer keeps (the *allocation*)
and which ones (the *scores*).

- method "uniform" / "er" / "erk": random blocks, layer densities from that allocation
  (the static-sparse start of SET/RigL). "random" is random blocks too, allocation
  "uniform" unless given.
- method "magnitude" / "snip" / "grasp" / "synflow": scores from saliency.py; by
  default ranked globally across layers as in the papers (the global element-level
  ranking sets each layer's share, the blocks are then chosen inside each layer;
  SynFlow runs its iterative schedule on block scores directly), or layer-wise at
  an ``allocation`` ("uniform", "er", "erk") when given.

Scores are computed on the dense model once, then each layer becomes a
``SparseLinear`` (or ``SparseConv2d``: blocks of output x input channels, each with all
its taps) holding only its kept blocks: training from then on runs on the
block-sparse kernels. ``block_size=1`` is unstructured pruning: exact, but the
kernels are then no faster than dense (slower, in fact), and reported as such.
A convolution with fewer input channels per group than the block (a stem conv on RGB
images, a depthwise conv) would be mostly padding: it is kept dense, with a warning.
Other layers are left as they are.
"""
import warnings

import torch.nn.functional as F
from torch import nn

from ...formats.bsr import _as_block_size
from ...nn.bsr_linear import SparseLinear
from ...nn.conv2d import SparseConv2d
from ...nn.lowrank_conv2d import LowRankConv2d
from ...nn.lowrank_linear import LowRankLinear
from ...nn.partially_trainable_conv2d import PartiallyTrainableConv2d
from ...nn.partially_trainable_linear import PartiallyTrainableLinear
from ...nn.semi_linear import SemiSparseLinear
from .density import layer_densities
from .masks import block_scores, global_topk_masks, layerwise_topk_masks
from .saliency import (grasp_scores, magnitude_scores, random_scores, snip_scores, synflow_masks, synflow_scores,
                       prunable_weights)
from .torch_transformers import attention_owned_linears, sync_fused_paths

ALLOCATIONS = ("uniform", "er", "erk")
SCORED = ("random", "magnitude", "snip", "grasp", "synflow")


def sparsifiable_layers(model):
    """[(module name, nn.Linear or nn.Conv2d)] in module order: what ``sparsify`` converts."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and not (isinstance(m, nn.Conv2d) and m.padding_mode != "zeros")]


def unblockable_convs(model, block_size):
    """Names of the convolutions that channel blocks do not fit: fewer input channels per group
    than a block (a stem conv on RGB images, a depthwise conv), or grouped with output channels
    per group that are not whole blocks (a block row would span two groups)."""
    br, bc = _as_block_size(block_size)
    return [name for name, m in sparsifiable_layers(model) if isinstance(m, nn.Conv2d)
            and (m.in_channels // m.groups < bc or (m.groups > 1 and (m.out_channels // m.groups) % br))]


def replace_module(model, name, new):
    """Put ``new`` at the dotted path ``name`` inside ``model``, and at every other path that
    holds the same module (a layer used twice stays one layer); torch's fused Transformer
    inference paths follow (torch_transformers.py)."""
    old = model.get_submodule(name)
    _carry_hooks(old, new)
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and path:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    sync_fused_paths(model)


# The hook registries of nn.Module's register_forward_hook, register_forward_pre_hook and
# register_(full_)backward_(pre_)hook: a replaced layer keeps the hooks its user put on it.
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _carry_hooks(old, new):
    """Move ``old``'s hooks to ``new``: the registries themselves, so the handles their user holds
    still remove them (``new``'s own hooks, if any, join them)."""
    for registry in _HOOKS:
        hooks = getattr(old, registry, None)
        if hooks is None:
            continue
        hooks.update(getattr(new, registry, {}))
        setattr(new, registry, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def tied_linear_names(model):
    """Names of the nn.Linear / nn.Conv2d layers whose weight is also held by another module (e.g. an
    LM head tied to the embedding): converting them would silently untie the weights."""
    holders = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(module))
    return [name for name, layer in sparsifiable_layers(model)
            if isinstance(layer.weight, nn.Parameter) and len(holders[id(layer.weight)]) > 1]


def custom_forward_names(model):
    """Names of the nn.Linear / nn.Conv2d layers whose class computes something else than its base
    (a subclass overriding ``forward``, or a convolution's ``_conv_forward``: an adapter, a
    quantization stub): a sparse layer would silently compute the base's product instead."""
    def own(layer, base, method):
        return getattr(type(layer), method) is not getattr(base, method)
    return [name for name, layer in sparsifiable_layers(model)
            if own(layer, nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d, "forward")
            or isinstance(layer, nn.Conv2d) and own(layer, nn.Conv2d, "_conv_forward")]


def computed_weight_names(model):
    """Names of the nn.Linear / nn.Conv2d layers whose weight is no parameter but computed from
    others (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal; torch.nn.utils.prune's
    weight_orig * weight_mask): a sparse copy would hold its current value and drop the rest."""
    return [name for name, layer in sparsifiable_layers(model) if not isinstance(layer.weight, nn.Parameter)]


def _dense_indices(layers, dense_layers):
    names = [n for n, _ in layers]
    out = set()
    for item in dense_layers:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"dense layer {item!r} is not an nn.Linear or nn.Conv2d of the model; "
                                 f"those layers: {names}")
            out.add(names.index(item))
        elif not 0 <= int(item) < len(layers):
            raise ValueError(f"dense layer index {item} out of range for {len(layers)} linear and conv layers")
        else:
            out.add(int(item))
    return out


def dense_by_default(model, block_size, dense_layers, caller):
    """The names of the Linear / Conv2d layers ``caller`` leaves dense: ``dense_layers`` (names or
    indices) plus, each group with a warning, those whose class overrides the forward, those whose
    weight is computed, nn.MultiheadAttention's out_proj layers, those whose weight is tied to
    another module and the convolutions channel blocks do not fit. Raises before any work is done
    if a convolution to convert would need a non-square block."""
    lazy = [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"{caller}: the lazy layers {lazy} have no weights yet; run one forward pass of the model "
                         "first (it initializes them)")
    padded = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros"]
    if padded:
        warnings.warn(f"{caller}: leaving the convolutions {padded} dense: their padding_mode is not 'zeros', "
                      "and SparseConv2d pads with zeros only (pad the input with F.pad and use padding=0 to "
                      "make one sparse)", UserWarning, stacklevel=3)
    for what, names, why in (
            ("", custom_forward_names(model), "their classes override nn.Linear's / nn.Conv2d's forward, which a "
             "sparse layer would not run"),
            ("", computed_weight_names(model), "their weights are computed from other parameters "
             "(torch.nn.utils.parametrize, or torch.nn.utils.prune: prune.remove(module, 'weight') makes a pruned "
             "weight a parameter again), and a sparse copy would drop that"),
            ("", attention_owned_linears(model), "nn.MultiheadAttention reads its out_proj weight itself; build "
             "attention from nn.Linear layers to make its projections sparse"),
            ("", tied_linear_names(model), "their weights are tied to other modules, and a sparse copy would untie "
             "them"),
            ("the convolutions ", unblockable_convs(model, block_size), f"fewer input channels per group than the "
             f"block size {block_size[1]} (each would be one mostly-padding block), or output channels per group "
             "that are not whole blocks; list them in dense_layers to silence this, or use a smaller block_size")):
        left = [name for name in names if name not in dense_layers]
        if left:
            warnings.warn(f"{caller}: leaving {what}{left} dense: {why}", UserWarning, stacklevel=3)
            dense_layers = (*dense_layers, *left)
    layers = sparsifiable_layers(model)
    dense = _dense_indices(layers, dense_layers)
    convs = [name for i, (name, m) in enumerate(layers) if isinstance(m, nn.Conv2d) and i not in dense]
    if convs and block_size[0] != block_size[1]:
        raise ValueError(f"SparseConv2d needs a square block; got block_size {block_size} for the convolutions "
                         f"{convs} (list them in dense_layers to keep them dense)")
    return tuple(layers[i][0] for i in sorted(dense))


def to_sparse(layer, block_mask, block_size):
    """The ``SparseLinear`` / ``SparseConv2d`` holding the blocks ``block_mask`` of the nn.Linear /
    nn.Conv2d ``layer`` (``block_size`` a pair; square for a convolution)."""
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d.from_dense(layer, block_size=block_size[0], block_mask=block_mask)
    return SparseLinear.from_dense(layer, block_size=block_size, block_mask=block_mask)


def _scores(model, method, generator, inputs, targets, loss_fn):
    if method == "random":
        return random_scores(model, generator)
    if method == "magnitude":
        return magnitude_scores(model)
    if inputs is None or targets is None:
        raise ValueError(f"method {method!r} needs a batch: pass inputs= and targets=")
    fn = snip_scores if method == "snip" else grasp_scores
    return fn(model, inputs, targets, loss_fn or F.cross_entropy)


def compute_block_masks(model, *, density, method="erk", block_size=32, dense_layers=(), allocation=None,
                        inputs=None, targets=None, loss_fn=None, input_shape=None, synflow_iterations=100,
                        generator=None):
    """{Linear / Conv2d module name: (RB, CB) bool block mask} for the layers to sparsify (dense ones are absent)."""
    if method not in ALLOCATIONS + SCORED:
        raise ValueError(f"unknown method {method!r}; expected one of {ALLOCATIONS + SCORED}")
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {ALLOCATIONS} or None (global)")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    layers = sparsifiable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to sparsify")
    dense = _dense_indices(layers, dense_layers)
    sparse = [i for i in range(len(layers)) if i not in dense]
    if method in ALLOCATIONS:
        method, allocation = "random", method
    elif method == "random" and allocation is None:
        allocation = "uniform"

    if allocation is not None:
        # Layer-wise: the allocation solves for the budget with dense layers counted in it.
        densities = layer_densities([m.weight.shape for _, m in layers], density, allocation,
                                    dense_layers=sorted(dense))
    else:
        # Global ranking: the sparse layers share what the dense ones leave of the budget.
        total = sum(m.weight.numel() for _, m in layers)
        left = density * total - sum(layers[i][1].weight.numel() for i in dense)
        if left < 0:
            raise ValueError(f"density {density} is below what the dense layers {sorted(dense)} already hold")
        density = left / sum(layers[i][1].weight.numel() for i in sparse) if sparse else 1.0

    names = [layers[i][0] for i in sparse]
    if method == "synflow" and input_shape is None:
        if isinstance(layers[0][1], nn.Conv2d):
            raise ValueError("synflow on a model that starts with a convolution needs input_shape=(C, H, W)")
        input_shape = (layers[0][1].in_features,)
    if method == "synflow" and allocation is None:
        # The paper's iterative global schedule, at the block granularity.
        skip = {n for n, _ in prunable_weights(model)} - {f"{n}.weight" for n in names}
        by_name = synflow_masks(model, input_shape, min(density, 1.0),
                                block_size=block_size, iterations=synflow_iterations, skip=skip)
        return {n: by_name[f"{n}.weight"] for n in names}
    if method == "synflow":  # layer-wise allocation: one-shot scores ranked inside each layer
        scores = synflow_scores(model, input_shape)
    else:
        scores = _scores(model, method, generator, inputs, targets, loss_fn)
    reduce = "sum" if method == "grasp" else "norm"
    grid_scores = [block_scores(scores[f"{n}.weight"], block_size, reduce) for n in names]
    if allocation is None:
        # Global ranking decides each layer's share at the element level; blocks are then
        # picked inside each layer. Ranking block scores across layers directly would not
        # do: a block's score sums ~b*b element scores, so it barely varies inside a layer
        # and whichever layer has the larger mean score takes the whole budget (the other
        # layers collapse to zero blocks, e.g. the 2048x2048 layer under SNIP at 10%).
        element = [scores[f"{n}.weight"] for n in names]
        shares = global_topk_masks(element, int(round(min(density, 1.0) * sum(e.numel() for e in element))))
        densities = {i: float(m.float().mean()) for i, m in zip(sparse, shares)}
    return dict(zip(names, layerwise_topk_masks(grid_scores, [densities[i] for i in sparse])))


def sparsify(model, *, density, method="erk", block_size=32, dense_layers=(), allocation=None, **kwargs):
    """Replace the model's ``nn.Linear`` and ``nn.Conv2d`` layers by ``SparseLinear`` and
    ``SparseConv2d`` and return the model.

    Args:
        model: any module; converted in place (the same object is returned).
        density: fraction of the weights kept, over all those layers together (ERK counts the
            kernel dims of convolutions; blocks at the edge of a non-multiple shape count as
            whole blocks).
        method: "uniform", "er", "erk" (random blocks at that allocation), or "random",
            "magnitude", "snip", "grasp", "synflow" (scores).
        block_size: int or (rows, cols); 1 = unstructured (no faster than dense).
        dense_layers: indices (among the Linear and Conv2d layers, in module order) or module
            names left dense. Layers whose weight is tied to another module, and convolutions
            with fewer input channels per group than the block, are left dense too, with a
            warning; a layer used at several places becomes one sparse layer at all of them.
            Conv2d needs a square block_size.
        allocation: for scored methods, rank layer-wise at "uniform"/"er"/"erk" densities
            instead of globally.
        kwargs: ``inputs``, ``targets``, ``loss_fn`` (SNIP/GraSP batch, default cross
            entropy); ``input_shape`` and ``synflow_iterations`` (SynFlow, default
            (in_features,) of the first layer, required when it is a conv, and 100);
            ``generator`` (random masks).
    """
    block_size = _as_block_size(block_size)
    dense_layers = dense_by_default(model, block_size, dense_layers, "sparsify")
    masks = compute_block_masks(model, density=density, method=method, block_size=block_size,
                                dense_layers=dense_layers, allocation=allocation, **kwargs)
    for name, layer in sparsifiable_layers(model):
        if name in masks:
            replace_module(model, name, to_sparse(layer, masks[name], block_size))
    return model


def densify(model):
    """Replace every sparse layer of ``model`` (SparseLinear, SparseConv2d, SemiSparseLinear, LowRankLinear,
    PartiallyTrainableLinear, PartiallyTrainableConv2d, LowRankConv2d) by the ``nn.Linear`` / ``nn.Conv2d``
    it stands for, in place, and return the model: a sparse-trained model then loads where a dense
    checkpoint is expected."""
    sparse = (SparseLinear, SparseConv2d, SemiSparseLinear, LowRankLinear, PartiallyTrainableLinear,
              PartiallyTrainableConv2d, LowRankConv2d)
    replaced = []
    for name, module in list(model.named_modules()):
        inside_replaced = any(name.startswith(outer + ".") for outer in replaced)  # e.g. a frozen layer's delta
        if name and isinstance(module, sparse) and not inside_replaced:
            replace_module(model, name, module.to_dense())
            replaced.append(name)
    return model
