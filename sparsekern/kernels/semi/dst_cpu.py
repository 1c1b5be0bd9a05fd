"""``cpu`` backend of the 2:4 DST products: the C++ update kernels of ``sparsekern._C_semi``
(csrc/semi/dst_update.cpp), a few passes over a layer where plain torch makes ~30.

They take exactly the reference's decisions (ties included) and raise the same
errors. Their dispatcher ops, with fakes in :mod:`sparsekern.kernels.semi.cpu`:

``semi_drop_grow_cpu(drop, mask, grow, n_drop, transposable, absolute, with_weight) -> (mask, weight?)``
``semi_restructure_cpu(mask, old_indices, transposable) -> (slots, indices, indices_t?)``
``semi_carry_cpu(tensor, slots) -> moved``
``semi_decompress_sum_cpu(values[], indices[], cols, allow_avx512=False) -> dense`` (one source of 16- or
32-bit values on AVX-512 expand-loads where allowed and the CPU has AVX512-VBMI2)
``semi_gather_kept_cpu(dense, indices) -> values``
"""
import functools

import torch

from ..._extension import cpu_extension_unavailable
from ..registry import register_kernel
from .cpu import _allow_avx512, ops

_SCORE_DTYPES = (torch.float32, torch.float64)
_VALUE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _unavailable_for(dtypes):
    return lambda device, dtype: cpu_extension_unavailable("semi", dtypes, device, dtype)


def _common_dtype(tensors):
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def semi_drop_grow(mask, drop, grow, n_drop, transposable, absolute, with_weight):
    # Scores of two dtypes are compared in the wider one: widening is exact, so the decisions stay.
    dtype = _common_dtype((drop, grow))
    new_mask, new_weight = ops().semi_drop_grow_cpu(drop.to(dtype).contiguous(), mask.contiguous(),
                                                    grow.to(dtype).contiguous(), n_drop, transposable, absolute,
                                                    with_weight)
    return new_mask, None if new_weight is None else new_weight.to(drop.dtype)


def semi_restructure(mask, old_indices, transposable):
    return ops().semi_restructure_cpu(mask.contiguous(), old_indices.contiguous(), transposable)


def semi_carry(tensor, slots):
    return ops().semi_carry_cpu(tensor.contiguous(), slots.contiguous())


def semi_decompress_sum(values, indices, cols):
    dtype = _common_dtype(values)
    return ops().semi_decompress_sum_cpu([v.to(dtype).contiguous() for v in values],
                                         [i.contiguous() for i in indices], cols, _allow_avx512())


def semi_gather_kept(dense, indices):
    return ops().semi_gather_kept_cpu(dense.contiguous(), indices.contiguous())


register_kernel("semi_drop_grow", "cpu", semi_drop_grow, _unavailable_for(_SCORE_DTYPES))
register_kernel("semi_restructure", "cpu", semi_restructure, _unavailable_for((torch.bool,)))
register_kernel("semi_carry", "cpu", semi_carry, _unavailable_for(_VALUE_DTYPES))
register_kernel("semi_decompress_sum", "cpu", semi_decompress_sum, _unavailable_for(_VALUE_DTYPES + (torch.bool,)))
register_kernel("semi_gather_kept", "cpu", semi_gather_kept, _unavailable_for(_VALUE_DTYPES))
