"""When the structure changes and by how much.

``DropSchedule`` is RigL's: an update every ``delta`` steps while ``t < t_end``,
dropping ``alpha`` of the active weights, annealed with a cosine
(``alpha/2 * (1 + cos(pi t / t_end))``) or held constant.
``gradual_density`` is Zhu & Gupta's cubic schedule used by DPF.
"""
import math


class DropSchedule:
    """Update steps and drop fractions.

    Args:
        delta: steps between structure updates (ΔT).
        alpha: initial drop fraction.
        t_end: no update at or after this step.
        kind: "cosine" or "constant".
    Steps count from 1: the optimizer step just taken.
    """

    def __init__(self, *, delta=100, alpha=0.3, t_end, kind="cosine"):
        if not isinstance(delta, int) or delta < 1:
            raise ValueError(f"delta must be a positive int, got {delta!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not isinstance(t_end, int) or t_end < 0:
            raise ValueError(f"t_end must be a non-negative int, got {t_end!r}")
        if kind not in ("cosine", "constant"):
            raise ValueError(f"kind must be 'cosine' or 'constant', got {kind!r}")
        self.delta, self.alpha, self.t_end, self.kind = delta, float(alpha), t_end, kind

    def is_update_step(self, t):
        return 0 < t < self.t_end and t % self.delta == 0

    def drop_fraction(self, t):
        if self.kind == "constant":
            return self.alpha
        return self.alpha / 2 * (1 + math.cos(math.pi * min(t, self.t_end) / max(self.t_end, 1)))

    def __repr__(self):
        return f"DropSchedule(delta={self.delta}, alpha={self.alpha}, t_end={self.t_end}, kind={self.kind!r})"


def gradual_density(t, final_density, *, t_start=0, t_end, initial_density=1.0):
    """Cubic decay from ``initial_density`` at ``t_start`` to ``final_density`` at ``t_end``."""
    if t_end <= t_start:
        return final_density
    progress = min(max((t - t_start) / (t_end - t_start), 0.0), 1.0)
    return final_density + (initial_density - final_density) * (1.0 - progress) ** 3
