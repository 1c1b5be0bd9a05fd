"""Top-KAST (Jayakumar et al. 2020) on block-sparse layers, without dense weights.

The paper keeps dense parameters θ: the forward set A = top-D of |θ|, the
backward set B = top-(D+M) ⊇ A gets gradients, and weights in B \\ A pay a
stronger L2 penalty (scaled by 1/D) so that only useful ones enter A.

Here only B is ever stored: A in the layer's ``values`` (forward, dX), B \\ A as
the driver's shadow blocks; dW is computed on B only (the probe). Every
``delta`` steps until ``t_end``: A = the top ``|A|`` blocks of B by RMS, and
the weakest ``drop_fraction`` of B \\ A leave B for as many random blocks from
outside B, which start at zero (the paper's weights outside B are frozen at
their old values; ours are not kept, so exploration re-enters through zero).
B \\ A starts with random values of the forward blocks' scale, as the paper's
dense init would give it.
The penalty on A is the optimizer's weight decay; B \\ A gets ``penalty / D``.
"""
import torch

from .drivers import ShadowDriver, on_grid
from .rules import drop_and_grow, n_to_drop, topkast_penalty_grad
from .scores import block_rms


class TopKAST(ShadowDriver):
    """Args as :class:`~sparsekern.methods.dst.DynamicSparsity`, plus
    ``backward_factor`` (|B| = min(all, factor * |A|) per layer) and ``penalty``
    (L2 scale on the exploration blocks B \\ A, divided by the layer density)."""

    def __init__(self, model, optimizer, *, density, delta=100, alpha=0.3, t_end, backward_factor=2.0,
                 penalty=1e-4, **kwargs):
        if backward_factor < 1:
            raise ValueError(f"backward_factor must be >= 1, got {backward_factor}")
        self.backward_factor, self.penalty = float(backward_factor), float(penalty)
        super().__init__(model, optimizer, density=density, delta=delta, alpha=alpha, t_end=t_end, **kwargs)

    def _initial_shadow_mask(self, layer):
        mask = layer.block_mask
        extra = min(int(round((self.backward_factor - 1) * int(mask.sum()))), int((~mask).sum()))
        noise = torch.rand(mask.shape, generator=self.generator).to(mask.device)
        return drop_and_grow(mask, noise, noise, 0, extra) & ~mask

    def _setup(self):
        # The paper's θ is dense at init, so B \ A starts just below A's magnitudes:
        # exploration blocks get values of the forward blocks' scale, not zero.
        super()._setup()
        with torch.no_grad():
            for name, layer in self.layers:
                param = self.shadow[name][0]
                rms = float(block_rms(layer.values).pow(2).mean().sqrt()) if layer.nnz_blocks else 0.0
                noise = torch.rand(param.shape, generator=self.generator).to(param.device, param.dtype)
                param.copy_((2 * noise - 1) * (3 ** 0.5 * rms))
                layer.zero_edge_padding(param, self.shadow[name][1])

    def _shadow_penalty(self, name, param):
        if self.penalty == 0:
            return None
        layer = dict(self.layers)[name]
        exploration = torch.zeros(param.shape, dtype=torch.bool, device=param.device)  # every shadow block lies in B minus A
        return topkast_penalty_grad(param.detach(), exploration, layer.density, self.penalty)

    def _update(self, drop_fraction):
        for name, layer in self.layers:
            values, union, sources = self._all_values(name, layer)
            score = on_grid(union, block_rms(values))
            backward = union.block_mask
            forward = drop_and_grow(backward, score, score, int(backward.sum()) - layer.nnz_blocks, 0)
            explore = backward & ~forward
            n = n_to_drop(int(explore.sum()), drop_fraction)
            kept = forward | drop_and_grow(explore, score, score, n, 0)
            noise = torch.rand(kept.shape, generator=self.generator).to(kept.device)
            shadow = drop_and_grow(kept, noise, noise, 0, n) & ~forward
            self._restructure(name, layer, forward, shadow, sources)

