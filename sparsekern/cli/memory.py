"""Resident memory of the process (Linux ``/proc/self/status``): the peak of a block of work.

Freed memory is first handed back to the OS (gc, malloc_trim), then the kernel's high-water
mark is reset (``/proc/self/clear_refs``) and read back at the end (``VmHWM``). On CPU that is
the real peak of training: weights, gradients, optimizer state, activations and temporaries,
with whatever the allocator keeps. Elsewhere, or where a sandbox forbids the reset, every
figure is None: no figure rather than a wrong one.
"""
import concurrent.futures
import ctypes
import gc
import multiprocessing
import os

_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def settle():
    """Collect garbage and hand freed heap memory back to the OS, so RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak():
    """Reset VmHWM to the current RSS; False where that is impossible."""
    if not os.path.exists("/proc/self/clear_refs"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_kib():
    return _status_kib("VmRSS")


def peak_kib():
    return _status_kib("VmHWM")


class PeakMemory:
    """Peak resident memory of a block of work, above the resident memory at its start (MiB).

        with PeakMemory() as peak:
            train()
        peak.mb
    """

    def __init__(self):
        self.mb = None

    def __enter__(self):
        self._start = None
        if not os.path.exists("/proc/self/clear_refs"):
            return self
        settle()
        if reset_peak():
            self._start = rss_kib()
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            self.mb = (peak_kib() - self._start) / 1024
        return False


class GrowthSincePeak:
    """Peak RSS above a baseline taken before some setup that should count (a model being built)
    but whose transient peak should not (a dense copy converted and freed):

        growth = GrowthSincePeak()    # baseline
        model = build()               # counted while it stays resident
        growth.arm()                  # free transients, reset the peak
        train(model)
        growth.mb                     # VmHWM - baseline
    """

    def __init__(self):
        settle()
        self._start = rss_kib() if os.path.exists("/proc/self/status") else None
        self._armed = False

    def arm(self):
        settle()
        self._armed = self._start is not None and reset_peak()

    @property
    def mb(self):
        return (peak_kib() - self._start) / 1024 if self._armed else None


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a newly spawned Python process whose allocator returns every block of
    64 KiB or more to the OS when it is freed (glibc's ``MALLOC_MMAP_THRESHOLD_``): its peak RSS
    is then the peak of live memory, not of what an earlier computation left in the heap."""
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get(_MMAP_THRESHOLD)
    os.environ[_MMAP_THRESHOLD] = str(64 * 1024)
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            future = pool.submit(fn, *args)
    finally:
        if saved is None:
            del os.environ[_MMAP_THRESHOLD]
        else:
            os.environ[_MMAP_THRESHOLD] = saved
    return future.result()
