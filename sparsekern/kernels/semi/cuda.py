"""GPU 2:4 forward through torch's semi-structured sparse backends (cuSPARSELt / CUTLASS).

``semi_forward`` decompresses W (one scatter), hands it to
``torch.sparse.to_sparse_semi_structured`` (torch's own compression and
metadata layout) and multiplies with the sparse tensor cores. Where those
cannot run (GPU older than sm80, float32/float64, shapes the kernels do not
tile) it computes the same product densely: correct, not faster.

A static weight's torch operand is cached across calls (see :func:`_operand`): it
is rebuilt only after its values or its structure change, so a frozen or inference
weight is compressed once, a trained one once per optimizer step.

``semi_grad_input`` for a transposable W is the same product on Wᵀ's
compression, so forward and dX both use the sparse tensor cores; row-wise dX is
dense, and dW (sampled) stays on the reference product (dense matmul + gather).

Untested on this project's CPU-only CI: the tests exercising it are marked ``gpu``
(the cache's decisions are tested on CPU with torch's conversion stubbed).
"""
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ...formats.semi import decompress
from ..registry import register_kernel

_SPARSE_DTYPES = (torch.float16, torch.bfloat16)

# values tensor -> (stamp, torch semi-structured operand), one table per product. Weak on the
# values: an entry goes with its weight.
_FORWARD, _TRANSPOSED = WeakIdKeyDictionary(), WeakIdKeyDictionary()


def _unavailable(device, dtype):
    if device.type != "cuda":
        return f"runs on CUDA tensors only, got {device.type}"
    if not dtype.is_floating_point:
        return f"needs floating tensors, got {dtype}"
    return None


def _sparse_tensor_cores(device, dtype, rows, cols):
    """Whether torch's semi-structured kernels take an (rows, cols) weight (else: dense fallback)."""
    if dtype not in _SPARSE_DTYPES or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return rows % 64 == 0 and cols % 64 == 0


def _static(values):
    """A weight held across calls: a Parameter (trained or frozen), or a leaf requiring grad.
    Anything else (the dynamic layer's fresh compression, autocast's per-call cast) is new on
    every call, and caching it would only hold memory until it is freed."""
    return isinstance(values, torch.nn.Parameter) or (values.is_leaf and values.requires_grad)


def _stamp(tensors):
    """What makes a cached operand stale: a tensor replaced (another object, or ``.data``
    swapped: another storage) or written in place (its version counter)."""
    return tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors)


def _fresh(stamp, tensors):
    return all(ref() is t and ptr == t.data_ptr() and version == t._version
               for (ref, ptr, version), t in zip(stamp, tensors))


def _operand(table, values, structure, build):
    """torch's sparse operand for ``values`` (W's or Wᵀ's, per ``table``): built by ``build()``,
    cached for a static weight until ``values`` or a ``structure`` tensor changes."""
    if not _static(values) or torch.compiler.is_compiling():
        return build()
    tensors = (values, *structure)
    entry = table.get(values)
    if entry is not None and _fresh(entry[0], tensors):
        return entry[1]
    with torch.no_grad():  # a graph on the operand would hold ``values`` (the key) alive
        operand = build()
    table[values] = (_stamp(tensors), operand)
    return operand


def _sparse(values, indices):
    return torch.sparse.to_sparse_semi_structured(decompress(values, indices, 2 * values.shape[1]))


def semi_forward(x, values, indices, bias=None):
    rows, cols = values.shape[0], 2 * values.shape[1]
    if _sparse_tensor_cores(x.device, values.dtype, rows, cols):
        return F.linear(x, _operand(_FORWARD, values, (indices,), lambda: _sparse(values, indices)), bias)
    return F.linear(x, decompress(values, indices, cols), bias)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if indices_t is None:
        return dy @ decompress(values, indices, 2 * values.shape[1])
    # Transposable: dX = dY W is the forward product on Wᵀ, whose values W's hold.
    rows, cols = 2 * values.shape[1], values.shape[0]
    if _sparse_tensor_cores(dy.device, values.dtype, rows, cols):
        def build():
            return _sparse(values.reshape(-1)[transpose_map], indices_t)
        return F.linear(dy, _operand(_TRANSPOSED, values, (indices_t, transpose_map), build))
    return dy @ decompress(values.reshape(-1)[transpose_map], indices_t, cols).T


register_kernel("semi_forward", "cuda", semi_forward, _unavailable)
register_kernel("semi_grad_input", "cuda", semi_grad_input, _unavailable)
