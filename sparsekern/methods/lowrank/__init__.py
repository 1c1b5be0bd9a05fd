"""Rank-adaptive low-rank training (DLRT) on :class:`sparsekern.LowRankLinear` layers."""
from .dlrt import DLRT  # noqa: F401
