"""DPF as the paper's code runs it, on masked dense layers: the oracle of tests/test_dst_dpf.py.

Independent of sparsekern's DPF driver and schedules (only ``erk_densities`` and ``dpf_mask``, the
rule under test elsewhere, are shared): the nn.Linear hidden layers (the last Linear stays dense)
forward with W ⊙ M and the gradient there updates all of W; every ``delta`` steps before
``t_end``, M = the top |w| at Zhu & Gupta's cubic density toward the ERK target, reached at
``ramp_end`` (None: at the last update).
"""
import torch
from torch import nn

import sparsekern as sk


class _StraightThroughMask(nn.Module):
    """Forward value W ⊙ M; the gradient reaches all of W unmasked (DPF's error feedback)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, weight):
        return weight + (weight * self.mask - weight).detach()


def cubic_density(t, target, t_end):
    """Zhu & Gupta: 1 at step 0, ``target`` from ``t_end`` on."""
    progress = min(max(t / t_end, 0.0), 1.0) if t_end > 0 else 1.0
    return target + (1.0 - target) * (1.0 - progress) ** 3


class MaskedDPF:
    def __init__(self, model, *, density, delta, t_end, ramp_end=None):
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
        self.targets = sk.methods.erk_densities([tuple(layer.weight.shape) for layer in self.layers], density)
        self.delta, self.t_end = delta, t_end
        self.ramp_end = ramp_end if ramp_end is not None else ((t_end - 1) // delta) * delta
        self.masks = [torch.ones_like(layer.weight, dtype=torch.bool) for layer in self.layers]
        for layer, mask in zip(self.layers, self.masks):
            torch.nn.utils.parametrize.register_parametrization(layer, "weight", _StraightThroughMask(mask))
        self.t = 0

    def step(self):
        """After an optimizer step: True when the masks were updated."""
        self.t += 1
        if not (self.t < self.t_end and self.t % self.delta == 0):
            return False
        with torch.no_grad():
            for layer, mask, target in zip(self.layers, self.masks, self.targets):
                density = cubic_density(self.t, target, self.ramp_end)
                mask.copy_(sk.methods.functional.dpf_mask(layer.parametrizations.weight.original, density))
        return True

    def stored_density(self):
        return sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks)
