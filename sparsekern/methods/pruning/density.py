"""Layer-wise density allocation: how a global parameter budget is split over layers.

Pure functions: weight shapes in ((out, in) or (out, in, kh, kw)), one density
per layer out. Every allocation keeps ``sum(d_i * numel_i) == density * sum(numel_i)``
except ``uniform``, which gives every non-dense layer the same density.

- ``uniform``: every layer at ``density`` (layers kept dense at 1).
- ``er`` (Erdős–Rényi, Mocanu et al.): d_i ∝ (out + in) / (out * in).
- ``erk`` (ER-Kernel, Evci et al. "Rigging the Lottery"): d_i ∝ sum(shape) / prod(shape),
  so convolution kernels count too. With ``power_scale`` p the raw density is
  (sum/prod)**p (p = 0 gives uniform). A layer whose scaled density would pass 1
  becomes dense and the rest is re-solved, as in the rigl reference code.
"""
import math


def _check(shapes, density, dense_layers):
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    for shape in shapes:
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"weight shapes must have >= 2 positive dims, got {shape}")
    if not isinstance(density, (int, float)) or not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    dense = set(int(i) for i in dense_layers)
    bad = [i for i in dense if not 0 <= i < len(shapes)]
    if bad:
        raise ValueError(f"dense_layers {sorted(bad)} out of range for {len(shapes)} layers")
    return shapes, float(density), dense


def uniform_densities(shapes, density, *, dense_layers=()):
    """``density`` for every layer, 1.0 for the indices in ``dense_layers``."""
    shapes, density, dense = _check(shapes, density, dense_layers)
    return [1.0 if i in dense else density for i in range(len(shapes))]


def _solve(numels, raw, density, dense):
    """Scale ``raw`` so the stored parameters hit the budget, densifying layers that pass 1."""
    budget = density * sum(numels)
    dense = set(dense)
    while True:
        rhs = budget - sum(numels[i] for i in dense)
        if rhs < -1e-9 * max(1, budget):
            raise ValueError(
                f"density {density} is too low: the layers kept dense ({sorted(dense)}) already "
                f"hold more than the budget of {budget:.0f} parameters")
        divisor = sum(raw[i] * numels[i] for i in range(len(numels)) if i not in dense)
        if divisor == 0:
            return [1.0 if i in dense else 0.0 for i in range(len(numels))]
        eps = max(rhs, 0.0) / divisor
        over = [i for i in range(len(numels)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(numels))]
        # rigl densifies the single largest offender per round; layers with equal raw
        # density pass 1 together, so densifying all of them at once gives the same answer.
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)


def erk_densities(shapes, density, *, power_scale=1.0, dense_layers=()):
    """ERK densities: d_i = min(1, eps * (sum(shape_i) / prod(shape_i)) ** power_scale).

    Args:
        shapes: weight shapes, (out, in) or (out, in, kh, kw).
        density: global fraction of weights kept, over all layers together.
        power_scale: exponent of the raw density (1 = ERK, 0 = uniform).
        dense_layers: indices kept at density 1 (they count against the budget).

    Returns a list of floats in [0, 1], one per shape.
    """
    shapes, density, dense = _check(shapes, density, dense_layers)
    numels = [math.prod(shape) for shape in shapes]
    raw = [(sum(shape) / math.prod(shape)) ** power_scale for shape in shapes]
    return _solve(numels, raw, density, dense)


def er_densities(shapes, density, *, power_scale=1.0, dense_layers=()):
    """Erdős–Rényi densities: like ERK but only (out + in) / (out * in), kernel dims ignored."""
    shapes, density, dense = _check(shapes, density, dense_layers)
    numels = [math.prod(shape) for shape in shapes]
    raw = [((shape[0] + shape[1]) / (shape[0] * shape[1])) ** power_scale for shape in shapes]
    return _solve(numels, raw, density, dense)


def layer_densities(shapes, density, method="erk", **kwargs):
    """Dispatch on ``method``: "uniform", "er" or "erk"."""
    methods = {"uniform": uniform_densities, "er": er_densities, "erk": erk_densities}
    if method not in methods:
        raise ValueError(f"unknown density allocation {method!r}; expected one of {sorted(methods)}")
    return methods[method](shapes, density, **kwargs)
