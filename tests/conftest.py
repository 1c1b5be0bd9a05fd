import ctypes
import os

import pytest
import torch

# The kernels run on every call whatever the floor rule would measure, in this process and
# in the ones tests spawn: a test of a backend must exercise it (tests/test_floor.py turns
# the rule on).
os.environ.setdefault("SPARSEKERN_FLOOR", "off")

_empty = torch.empty  # the real one, for the interpreter fixture's NaN-filled stand-in


def _perturb_allocations():
    """glibc's M_PERTURB: every block malloc hands out (torch's CPU tensors, the kernels' outputs
    and workspaces) is filled with 0x7f bytes (3.4e38 as fp32 and bf16, far from any result) and
    every freed one with 0x80, so a kernel that leaves part of an output or workspace unwritten, or
    reads freed memory, fails its comparison instead of passing on zeros or on a previous call's
    values. Large outputs come fresh from mmap (zeros) or from the output cache, which it does not
    reach."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-6, 0x80)  # M_PERTURB
    except (OSError, AttributeError):  # not glibc
        pass


_perturb_allocations()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny shapes (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from threads, and on a loaded machine every small parallel op
    waits for a descheduled thread (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interpreter(monkeypatch):
    """Run kernels in triton's interpreter, with NaN-filled ``torch.empty`` buffers."""
    from sparsekern.kernels.bsr.triton_backend import _interpreter_missing
    if _interpreter_missing():
        pytest.skip(_interpreter_missing())
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def nan_empty(*args, **kwargs):
        out = _empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def pytest_terminal_summary(terminalreporter):
    """Name the CPU paths this machine could not run, so a green run says what it covered."""
    from sparsekern.kernels import microkernel
    if microkernel.microkernel_isa("bsr") == "unavailable":
        terminalreporter.write_line("CPU kernels: not built, so no microkernel path ran")
        return
    runnable = microkernel.runnable_isas()
    skipped = [name for name in microkernel.ISAS if name not in runnable]
    line = f"CPU microkernel paths run natively: {', '.join(runnable)}"
    if skipped:
        line += f"; not run: {', '.join(skipped)} (this CPU's best is {runnable[0]}"
        if "avx512" in skipped:
            line += "; the AVX-512 tile geometry ran on the portable loops, its SIMD loops need AVX-512F"
        line += "; the amx path's bf16 tiles need AMX-TILE, AMX-BF16 and AVX512-BF16)"
    terminalreporter.write_line(line)
