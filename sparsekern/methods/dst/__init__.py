"""Dynamic sparse training: pure rules returning masks (``rules``, ``semi_rules``), drivers
that apply them to layers (``drivers``, ``topkast``, ``dpf``), dense-gradient score probes
(``scores``, ``semi_probe``), optimizer-state remapping (``state``) and schedules."""
from .dpf import DPF  # noqa: F401
from .drivers import GGR, SET, SNFS, DynamicSparsity, RigL  # noqa: F401
from .topkast import TopKAST  # noqa: F401
