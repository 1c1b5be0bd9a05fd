"""K-starts: draw k random sparse masks, train each briefly, keep the fittest.

From "What to prune and what not to prune at initialization" (Haroon, arXiv
2209.02201): instead of scoring weights at initialisation, start k random sparse
networks at density p, train each for a short while, and continue with the one
whose weights are the fittest by magnitude (mean |w| of the kept weights), by
accumulated gradient (mean over the kept weights of the summed |dL/dw|), or by
both (the sum of the two, each normalised by its best candidate).

Every candidate trains on SparseLinear / SparseConv2d layers (a convolution's blocks are output x
input channel blocks with all their taps), so k starts cost k short *sparse* trainings. The
fitness functions are pure (tensors in, float out).
"""
import torch

from ...nn.block_structure import BlockStructured
from .sparsify import sparsify

CRITERIA = ("magnitude", "gradient", "both")


def magnitude_fitness(values):
    """Mean |w| over the stored weights of all layers (list of value tensors)."""
    values = list(values)
    total = sum(v.numel() for v in values)
    return float(sum(v.detach().abs().sum() for v in values) / max(1, total))


def gradient_fitness(accumulated):
    """Mean accumulated |gradient| over the stored weights (list of accumulators)."""
    return magnitude_fitness(accumulated)


def select_fittest(magnitudes, gradients, criterion="magnitude"):
    """Index of the fittest candidate given per-candidate magnitude and gradient fitness."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "magnitude":
        fitness = list(magnitudes)
    elif criterion == "gradient":
        fitness = list(gradients)
    else:
        top_m, top_g = max(magnitudes) or 1.0, max(gradients) or 1.0
        fitness = [m / top_m + g / top_g for m, g in zip(magnitudes, gradients)]
    return max(range(len(fitness)), key=fitness.__getitem__)


class _GradientAccumulator:
    """Sums |grad| of each block-sparse layer's values during training (a tensor hook, no copy of the model)."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, BlockStructured)]
        self.sums = [torch.zeros_like(m.values, dtype=torch.float32) for m in self.layers]
        self.handles = [m.values.register_hook(self._adder(i)) for i, m in enumerate(self.layers)]

    def _adder(self, i):
        def add(grad):
            self.sums[i] += grad.detach().abs().float()
        return add

    def remove(self):
        for handle in self.handles:
            handle.remove()


def k_starts(make_model, train, *, k, density, method="erk", block_size=32, criterion="magnitude",
             dense_layers=(), seed=0):
    """Train ``k`` random sparse starts briefly and return (fittest model, report).

    Args:
        make_model: ``make_model()`` returns a fresh dense model (nn.Linear / nn.Conv2d layers;
            ``sparsify`` converts them, leaving a stem conv dense with a warning).
        train: ``train(model)`` the short training, in place.
        k: number of starts; density, method, block_size, dense_layers: as in ``sparsify``
            (method "uniform", "er" or "erk": random masks at that allocation).
        criterion: "magnitude", "gradient" or "both".
        seed: start i draws its mask with seed ``seed + i``.

    The report has per-candidate ``magnitude``, ``gradient`` and the ``chosen`` index.
    The chosen model keeps its short training (it continues from there).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    candidates, magnitudes, gradients = [], [], []
    for i in range(k):
        model = sparsify(make_model(), density=density, method=method, block_size=block_size,
                         dense_layers=dense_layers, generator=torch.Generator().manual_seed(seed + i))
        accumulator = _GradientAccumulator(model)
        train(model)
        accumulator.remove()
        magnitudes.append(magnitude_fitness(m.values for m in accumulator.layers))
        gradients.append(gradient_fitness(accumulator.sums))
        candidates.append(model)
    chosen = select_fittest(magnitudes, gradients, criterion)
    return candidates[chosen], dict(magnitude=magnitudes, gradient=gradients, chosen=chosen)
