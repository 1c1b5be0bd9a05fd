"""Which microkernel path the compiled block-sparse, conv and low-rank kernels run
(csrc/common/microkernel.h), and the 2:4 kernels' ISA.

Paths, best first: ``amx`` (the avx512 path, plus AMX tiles for the bf16 block-sparse and
conv products: AMX-TILE, AMX-BF16 and AVX512-BF16), ``avx512`` (AVX-512F fp32 tiles of up to
12 x 32; the bf16 block-sparse products on AVX512-BF16 dot products where the CPU has them),
``avx2`` (AVX2/FMA, 6 x 16), ``portable`` (plain loops). Each extension takes the best its CPU runs when it loads,
unless the environment variable ``SPARSEKERN_CPU_ISA`` asks for a lower one; asking for
one the CPU cannot run is an error naming both. Tests switch paths per family with
:func:`set_isa`, and can run the portable loops at the AVX-512 tile geometry on a CPU
without AVX-512 (``portable_loops=True``), so the wide packing is checked everywhere.
"""
import os

import torch

from .._extension import load_extension

ISAS = ("portable", "avx2", "avx512", "amx")
_SWITCHED = ("bsr", "conv", "lowrank")  # the 2:4 kernels read requested_isa() themselves


def cpu_capabilities():
    """torch's reading of the CPU's features (``torch.cpu.get_capabilities``), {} where it has none."""
    return getattr(torch.cpu, "get_capabilities", lambda: {})()


def requested_isa():
    """``SPARSEKERN_CPU_ISA`` if set (checked to be a known name), else None."""
    name = os.environ.get("SPARSEKERN_CPU_ISA") or None
    if name is not None and name not in ISAS:
        raise ValueError(f"SPARSEKERN_CPU_ISA={name!r} is not a CPU path; expected one of {ISAS}")
    return name


def apply_requested_isa(family, module):
    """Put a freshly loaded extension on the path ``SPARSEKERN_CPU_ISA`` asks for (if any)."""
    name = requested_isa()
    if name is not None and family in _SWITCHED:
        try:
            module.set_isa(name, False)
        except ValueError as exc:
            raise ValueError(f"SPARSEKERN_CPU_ISA={name}: {exc}") from None


def _module(family):
    if family not in _SWITCHED:
        raise ValueError(f"family {family!r} has no microkernel switch; expected one of {_SWITCHED}")
    module = load_extension(family)
    if module is None:
        raise RuntimeError(f"the compiled extension sparsekern._C_{family} is unavailable")
    return module


def microkernel_isa(family):
    """What ``family``'s compiled kernels run: "avx512f+amx" (bsr on the amx path),
    "avx512f+avx512_bf16" (bsr on the avx512 path of a CPU with AVX512-BF16), "avx512f",
    "avx2-fma", "portable" or "portable-wide"; "unavailable" when its extension is not built; None for a family
    without the switch."""
    module = load_extension(family)
    if module is None:
        return "unavailable"
    return module.isa() if family in _SWITCHED else None


def cpu_isa():
    """The best path this CPU runs ("amx", "avx512", "avx2" or "portable"), from a compiled extension."""
    for family in _SWITCHED:
        module = load_extension(family)
        if module is not None:
            return module.cpu_isa()
    return "portable"


def runnable_isas():
    """The paths this CPU runs natively, best first."""
    return [name for name in reversed(ISAS) if ISAS.index(name) <= ISAS.index(cpu_isa())]


def set_isa(family, name=None, portable_loops=False):
    """Force ``family``'s kernels ("bsr", "conv", "lowrank") onto path ``name`` (None: the
    best this CPU runs). ``portable_loops`` runs the portable loops at that path's tile
    geometry, which works on any CPU. ValueError if the CPU cannot run the path."""
    _module(family).set_isa(name or cpu_isa(), portable_loops)


def tile_rows(family, stride):
    """Rows of ``family``'s register tiles over rows of A read in place ``stride`` bytes apart, on
    its current path: 12 on avx512 (and portable-wide), 6 on avx2 and portable, fewer where more
    of the rows would fall into one L1 set than it has ways (csrc/common/cache_sets.h)."""
    return _module(family).tile_rows(int(stride))
