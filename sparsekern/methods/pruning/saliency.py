"""Saliency scores for pruning at initialisation: higher score = more worth keeping.

Every function returns a dict from parameter name (as in ``model.named_parameters()``)
to a score tensor of that parameter's shape, for the weights of the model's
``nn.Linear`` and ``nn.Conv*`` layers. Scores are element-wise; masks.py turns them
into block or 2:4 scores (norm of the element scores over the block).

They run on ordinary dense modules: pruning at initialisation happens once, before
the model is converted to sparsekern layers, so the dense cost is paid once and
never during training. The model's parameters and ``.grad`` are left untouched.

- magnitude: |w|.
- random: uniform noise (the baseline every method must beat).
- SNIP (Lee et al. 2019): |g ⊙ w|, g the loss gradient on a batch.
- GraSP (Wang et al. 2020): w ⊙ Hg, H the loss Hessian, g the gradient. The paper
  removes the weights of largest -w ⊙ Hg (those whose removal reduces gradient flow
  least), i.e. it keeps the largest w ⊙ Hg: that is the score here (signed).
- SynFlow (Tanaka et al. 2020): data-free. Replace every parameter by |θ|, feed an
  all-ones input, R = sum of the outputs; score = |θ ⊙ dR/dθ|. Used iteratively
  with an exponential density schedule (masks.synflow_masks), which is what avoids
  layer collapse.
"""
import copy
import math

import torch
from torch import nn

from .masks import block_grid, block_scores, expand_block_mask, global_topk_masks

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model):
    """[(parameter name, weight parameter)] of the model's Linear/Conv layers, in module order. A
    weight computed from other parameters (torch.nn.utils.parametrize or prune) is not scored
    (``sparsify`` leaves such a layer dense)."""
    return [(f"{name}.weight" if name else "weight", module.weight)
            for name, module in model.named_modules()
            if isinstance(module, _PRUNABLE) and isinstance(module.weight, nn.Parameter)]


def _require_prunable(model):
    weights = prunable_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layer to score")
    return weights


def magnitude_scores(model):
    """|w| for every Linear/Conv weight."""
    return {name: w.detach().abs() for name, w in _require_prunable(model)}


def random_scores(model, generator=None):
    """Uniform [0, 1) noise of each weight's shape (random pruning)."""
    return {name: torch.rand(w.shape, generator=generator, dtype=torch.float32).to(w.device)
            for name, w in _require_prunable(model)}


def _loss_grads(model, weights, inputs, targets, loss_fn, create_graph=False):
    loss = loss_fn(model(inputs), targets)
    return torch.autograd.grad(loss, weights, create_graph=create_graph)


def snip_scores(model, inputs, targets, loss_fn):
    """|dL/dw ⊙ w| on one batch (``loss_fn(model(inputs), targets)``)."""
    named = _require_prunable(model)
    grads = _loss_grads(model, [w for _, w in named], inputs, targets, loss_fn)
    return {name: (g * w).detach().abs() for (name, w), g in zip(named, grads)}


def grasp_scores(model, inputs, targets, loss_fn):
    """w ⊙ Hg on one batch, with the Hessian-gradient product by double backward.

    g is computed first and held constant; then Hg = d(gᵀ dL/dw)/dw. Signed: keep
    the largest (see module docstring).
    """
    named = _require_prunable(model)
    weights = [w for _, w in named]
    grads = [g.detach() for g in _loss_grads(model, weights, inputs, targets, loss_fn)]
    grads_graph = _loss_grads(model, weights, inputs, targets, loss_fn, create_graph=True)
    gz = sum((g * gg).sum() for g, gg in zip(grads, grads_graph))
    hg = torch.autograd.grad(gz, weights)
    return {name: (w * h).detach() for (name, w), h in zip(named, hg)}


def synflow_scores(model, input_shape, masks=None):
    """SynFlow scores |θ ⊙ dR/dθ| of the |θ| network on an all-ones input of ``(1, *input_shape)``.

    Args:
        model: a module; it is deep-copied (in float64, eval mode) and not modified.
        input_shape: the shape of one sample, e.g. (784,) or (3, 32, 32).
        masks: optional dict name -> bool mask (weights already pruned count as 0),
            used by the iterative schedule.

    With a bias-free ReLU MLP the score sums of all layers are equal (each equals R):
    the conservation law that makes iterative SynFlow avoid layer collapse.
    """
    return _SynFlowNet(model, input_shape).scores(masks)


class _SynFlowNet:
    """The |θ| float64 copy of a model, built once and re-masked for each SynFlow round."""

    def __init__(self, model, input_shape):
        self.names = [name for name, _ in _require_prunable(model)]
        self.net = copy.deepcopy(model).double().eval()
        self.abs_params = {}
        with torch.no_grad():
            for name, param in self.net.named_parameters():
                param.abs_()
                self.abs_params[name] = param.detach().clone()
        self.weights = [w for _, w in prunable_weights(self.net)]
        self.ones = torch.ones(1, *input_shape, dtype=torch.float64, device=self.weights[0].device)

    def scores(self, masks=None):
        params = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, mask in (masks or {}).items():
                params[name].copy_(self.abs_params[name] * mask.to(params[name].device))
        grads = torch.autograd.grad(self.net(self.ones).sum(), self.weights)
        # float64 scores: products of many |w| lose precision (or underflow) in float32.
        return {name: (g * w).detach().abs() for name, w, g in zip(self.names, self.weights, grads)}


def synflow_masks(model, input_shape, density, *, block_size=1, iterations=100, skip=()):
    """Iterative SynFlow: ``iterations`` rounds of scoring, each keeping the global top
    density**(k/iterations) of the blocks still alive (the paper's exponential schedule).

    Returns {weight name: (RB, CB) bool block mask} for the weights not named in
    ``skip`` (layers kept dense); ``density`` is the fraction of *their* blocks kept.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    named = [(n, w) for n, w in _require_prunable(model) if n not in skip]
    cells = sum(math.prod(block_grid(w.shape, block_size)) for _, w in named)
    net, block_masks = _SynFlowNet(model, input_shape), None
    for k in range(1, iterations + 1):
        element_masks = None if block_masks is None else {
            n: expand_block_mask(block_masks[n], block_size, w.shape) for n, w in named}
        scores = net.scores(element_masks)
        grids = [block_scores(scores[n], block_size) for n, _ in named]
        if block_masks is not None:  # pruned blocks stay pruned, even at score ties
            grids = [g.masked_fill(~block_masks[n], -1.0) for g, (n, _) in zip(grids, named)]
        keep = int(round(density ** (k / iterations) * cells))
        block_masks = dict(zip([n for n, _ in named], global_topk_masks(grids, keep)))
    return block_masks
