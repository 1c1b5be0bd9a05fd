"""DPF, dynamic pruning with feedback (Lin et al. 2020), on block-sparse layers.

The forward (and dX) use the pruned weight W ⊙ M; the gradient computed there
updates the *dense* weight (error feedback), so pruned blocks keep learning
and can come back. Dense weights are part of the method: the pruned blocks
live in the driver's shadow Parameter and dW is computed on every block (a
dense probe) at every step. Every ``delta`` steps until ``t_end`` the mask is
recomputed as the top blocks by RMS of the dense weight, at a density that
follows Zhu & Gupta's cubic schedule from 1 down to the layer's target (ERK).
"""
import torch

from .dst import ShadowDriver, on_grid, block_rms
from .functional import topk_mask
from .schedules import gradual_density


class DPF(ShadowDriver):
    """Args as :class:`~sparsekern.methods.dst.DynamicSparsity` (``alpha`` unused): the
    layers start dense and reach their ERK density at the last update before ``t_end``."""

    def _init_masks(self, density):
        shapes = [(layer.out_features, layer.in_features) for _, layer in self.layers]
        from .density import erk_densities
        self.targets = dict(zip((n for n, _ in self.layers), erk_densities(shapes, density)))
        for _, layer in self.layers:
            self._init_layer(layer, torch.ones_like(layer.block_mask))

    def _setup(self):
        if not hasattr(self, "targets"):
            self.targets = {n: layer.density for n, layer in self.layers}
        super()._setup()

    def _initial_shadow_mask(self, layer):
        return ~layer.block_mask

    def current_density(self, name, t):
        s = self.schedule
        last = ((s.t_end - 1) // s.delta) * s.delta  # the last update step
        return gradual_density(t, self.targets[name], t_end=last)

    def _update(self, drop_fraction):
        for name, layer in self.layers:
            values, union, sources = self._all_values(name, layer)
            score = on_grid(union, block_rms(values))
            forward = topk_mask(score, int(round(self.current_density(name, self.t) * score.numel())))
            self._restructure(name, layer, forward, ~forward, sources)

    def state_dict(self):
        return {**super().state_dict(), "targets": dict(self.targets)}

    def load_state_dict(self, state):
        self.targets = dict(state["targets"])
        super().load_state_dict(state)
