"""Rank-adaptive low-rank training (DLRT) on :class:`sparsekern.LowRankLinear` and
:class:`sparsekern.LowRankConv2d` layers."""
from .dlrt import DLRT  # noqa: F401
