"""C++ 2:4 products and prune+compress on CPU (``sparsekern._C_semi``, csrc/semi/): fp32, AVX2 + FMA.

The extension is loaded on first use; without it (or on a CPU without AVX2, or
for another dtype) this backend reports itself unavailable and the registry
picks the reference one.

The kernels read W through a *plan* (its indices decoded to panel offsets, and
where each value of the weight stream comes from), built once per structure and
cached here against the index tensors themselves (weak references, so a plan
dies with its structure and a recycled address can never match a stale one).
"""
import weakref

import torch

from ..._extension import extension_failure, load_extension
from ...formats.semi import decompress
from ..registry import register_kernel

_NB, _KC = 64, 64     # forward blocking: weight rows per task, panel columns per block (docs/semi_structured.md)
_plans = {}           # (id(indices), id(map)) -> (weak refs, indices version, plan)


def _module():
    return load_extension("semi")


def _unavailable(device, dtype):
    if device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type}"
    if dtype != torch.float32:
        return f"supports float32 only, got {dtype}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 + FMA, this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    if _module() is None:
        return f"extension sparsekern._C_semi not loaded ({extension_failure('semi')})"
    return None


def _plan(indices, transpose_map, half):
    key = (id(indices), id(transpose_map))
    hit = _plans.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], (indices, transpose_map))) \
            and hit[1] == indices._version:
        return hit[2]
    plan = _module().plan(indices, transpose_map, half, _NB, _KC)
    refs = tuple(weakref.ref(t, lambda _, k=key: _plans.pop(k, None)) if t is not None else (lambda: None)
                 for t in (indices, transpose_map))
    _plans[key] = (refs, indices._version, plan)
    return plan


def semi_forward(x, values, indices):
    offsets, source = _plan(indices, None, x.shape[1] // 2)
    return _module().forward(x, values, offsets, source, _NB, _KC, True)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if indices_t is not None:   # transposable: the forward on Wᵀ, values read out of W's
        offsets, source = _plan(indices_t, transpose_map, dy.shape[1] // 2)
        return _module().forward(dy, values, offsets, source, _NB, _KC, True)
    # Row-wise-only 2:4: W's columns are irregular, and a scatter kernel reached less than
    # half of MKL's dense speed here, so dX is the dense product (use transposable 2:4).
    return dy @ decompress(values, indices, 2 * values.shape[1])


def semi_grad_weight(dy, x, indices):
    return _module().grad_weight(dy, x, indices)


def semi_prune_compress(dense, transposable):
    compressed = _module().prune_compress(dense, transposable)
    return tuple(compressed) if transposable else (*compressed, None, None)


register_kernel("semi_forward", "cpu", semi_forward, _unavailable)
register_kernel("semi_grad_input", "cpu", semi_grad_input, _unavailable)
register_kernel("semi_grad_weight", "cpu", semi_grad_weight, _unavailable)
register_kernel("semi_prune_compress", "cpu", semi_prune_compress, _unavailable)
