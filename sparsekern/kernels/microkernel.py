"""Which microkernel the compiled block-sparse, conv and low-rank kernels run (csrc/common/microkernel.h).

The AVX2/FMA one where the CPU has it, else the portable loops; tests force the
portable one to check it on an AVX2 machine. One switch per compiled extension.
"""
from .._extension import load_extension

_SWITCHED = ("bsr", "conv", "lowrank")  # the 2:4 kernels have a single (AVX2) path


def microkernel_isa(family):
    """"avx2-fma" or "portable" for ``family``'s compiled kernels, "unavailable" when its
    extension is not built, None for a family without the switch."""
    module = load_extension(family)
    if module is None:
        return "unavailable"
    return module.isa() if family in _SWITCHED else None


def set_portable_only(family, portable_only):
    """Force (True) or release (False) the portable microkernel of ``family`` ("bsr", "conv", "lowrank")."""
    if family not in _SWITCHED:
        raise ValueError(f"family {family!r} has no microkernel switch; expected one of {_SWITCHED}")
    module = load_extension(family)
    if module is None:
        raise RuntimeError(f"the compiled extension sparsekern._C_{family} is unavailable")
    module.set_portable_only(portable_only)
