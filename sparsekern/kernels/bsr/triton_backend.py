"""The ``triton`` backend of the block-sparse products: availability and registration.

Nothing here imports triton: the kernel modules (triton_forward, triton_grad)
are imported on the first kernel call, so ``import sparsekern`` stays cheap and
the interpreter mode (``TRITON_INTERPRET=1``) is read when kernels are built.
On CPU the backend runs only under the interpreter (tests); the registry never
picks it there on its own.
"""
import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

from ..registry import register_kernel

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Shared memory the pipelined tiles of a Triton kernel may take (A100 allows 163 KB per
# block): configs are cut to fewer stages, or dropped below two, to fit.
SMEM_BUDGET = 160 * 1024


def interpreting():
    """True when triton runs kernels in its numpy interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_missing():
    return None if importlib.util.find_spec("triton") else "triton is not installed (pip install 'triton>=3.6')"


def _version(package):
    return tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version(package))[:2])


@functools.cache
def _interpreter_missing():
    """Why triton's interpreter cannot run these kernels here, or None (read without importing triton)."""
    if _triton_missing():
        return _triton_missing()
    # Before 3.9 the interpreter turns loop bounds into ints with int() of 1-element
    # arrays, which numpy >= 2.4 rejects (seen with triton 3.6; 3.9 squeezes first).
    if _version("triton") < (3, 9) and _version("numpy") >= (2, 4):
        return (f"the interpreter of triton {importlib.metadata.version('triton')} fails with numpy "
                f"{importlib.metadata.version('numpy')}; use triton >= 3.9 or numpy < 2.4 for CPU runs")
    return None


def unavailable(device, dtype):
    if dtype not in _DTYPES:
        return f"the triton kernels support {', '.join(map(str, _DTYPES))}, not {dtype}"
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the triton interpreter, for tests)"
        return _interpreter_missing()
    if device.type != "cuda":
        return f"triton kernels run on CUDA tensors, not {device.type}"
    return _triton_missing()


def dot_precision(dtype):
    """fp32 products honour torch's TF32 switch, like the cuBLAS dense baseline."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def upcast(dtype):
    """Widen bf16 tiles to fp32 before tl.dot under the interpreter only: its numpy dot
    misreads bf16 operands (numpy has no bf16). On a GPU bf16 goes to the tensor cores."""
    return dtype == torch.bfloat16 and interpreting()


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_slots(device):
    """How many programs keep the device busy: SMs on a GPU; a small fixed number in the
    interpreter so tests exercise the split paths at small shapes."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


def _lazy(module, name):
    def run(*args):
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(*args)
    run.__name__ = name
    return run


register_kernel("bsr_forward", "triton", _lazy("triton_forward", "bsr_forward"), unavailable)
register_kernel("bsr_grad_input", "triton", _lazy("triton_forward", "bsr_grad_input"), unavailable)
register_kernel("bsr_grad_weight", "triton", _lazy("triton_grad", "bsr_grad_weight"), unavailable)
