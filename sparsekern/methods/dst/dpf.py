"""DPF, dynamic pruning with feedback (Lin et al. 2020, arXiv 2006.07253), on block-sparse layers.

The forward (and dX) use the pruned weight W ⊙ M; the gradient computed there
updates the *dense* weight (error feedback), so pruned blocks keep learning
and can come back. Dense weights are part of the method: the pruned blocks
live in the driver's shadow Parameter and dW is computed on every block (a
dense probe) at every step. Every ``delta`` steps until ``t_end`` the mask is
recomputed as the top blocks by RMS of the dense weight, at a density that
follows Zhu & Gupta's cubic schedule from 1 down to the layer's target (ERK),
reached at step ``ramp_end``.

The paper recomputes the mask every 16 iterations through the whole of
training, reaching the target density part-way and fine-tuning afterwards with
the mask still recomputed: ``delta=16, t_end=total_steps, ramp_end=<a step
part-way>``. With ``ramp_end=None`` (default) the target is reached at the
last update before ``t_end``.
"""
import torch

from ..pruning.density import erk_densities
from .drivers import ShadowDriver, on_grid, weight_shape
from .rules import dpf_mask
from .schedules import gradual_density
from .scores import block_rms


class DPF(ShadowDriver):
    """Args as :class:`~sparsekern.methods.dst.DynamicSparsity` (``alpha`` unused): the
    layers start dense and reach their ERK density at step ``ramp_end`` (None: at the last
    update before ``t_end``); updates after ``ramp_end`` recompute the mask at the target."""

    def __init__(self, model, optimizer, *, density, delta=100, alpha=0.3, t_end, ramp_end=None, **options):
        last = ((t_end - 1) // delta) * delta if isinstance(t_end, int) and isinstance(delta, int) and delta > 0 \
            else None
        if ramp_end is not None and (not isinstance(ramp_end, int) or last is None or not 0 < ramp_end <= last):
            raise ValueError(f"ramp_end must be an int in (0, {last}] (the last update step before "
                             f"t_end={t_end!r} with delta={delta!r}), got {ramp_end!r}")
        self.ramp_end = ramp_end
        super().__init__(model, optimizer, density=density, delta=delta, alpha=alpha, t_end=t_end, **options)

    def _init_masks(self, density):
        shapes = [weight_shape(layer) for _, layer in self.layers]
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
        end = self.ramp_end if self.ramp_end is not None else ((s.t_end - 1) // s.delta) * s.delta
        return gradual_density(t, self.targets[name], t_end=end)

    def _update(self, drop_fraction):
        for name, layer in self.layers:
            values, union, sources = self._all_values(name, layer)
            score = on_grid(union, block_rms(values))
            forward = dpf_mask(score, self.current_density(name, self.t))
            self._restructure(name, layer, forward, ~forward, sources)

    def state_dict(self):
        return {**super().state_dict(), "targets": dict(self.targets)}

    def load_state_dict(self, state):
        self.targets = dict(state["targets"])
        super().load_state_dict(state)
