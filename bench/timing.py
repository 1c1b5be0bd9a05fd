"""Shared helpers of the layer benchmarks: environment fields of the JSON rows, one timed call,
peak memory of a run, and printing/writing the rows."""
import ctypes
import gc
import json
import os
import platform
import statistics
import time

import torch


def versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, threads=torch.get_num_threads(),
                thp_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"))



class PeakMemory:
    """Peak resident memory of a block of work, above the resident memory at its start (MiB).

    Linux only (None elsewhere): freed memory is first handed back to the OS (gc, malloc_trim),
    then the kernel's high-water mark is reset (``/proc/self/clear_refs``) and read back at the
    end (``VmHWM``). On CPU this is the real peak of training: weights, gradients, optimizer
    state, activations and temporaries, with whatever the allocator keeps.

        with PeakMemory() as peak:
            train()
        peak.mb
    """

    def __init__(self):
        self.mb = None

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def __enter__(self):
        self._start = None
        if not os.path.exists("/proc/self/clear_refs"):
            return self
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:  # a sandbox may forbid it: no figure rather than a wrong one
            return self
        self._start = self._status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            self.mb = (self._status_kib("VmHWM") - self._start) / 1024
        return False


def fwd_bwd(layer, x, dy):
    """A timed callable: y = layer(x); y.backward(dy), gradients of layer and x cleared first."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
    return run


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Wall-clock milliseconds of ``fn()``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def compare(name, dense_fn, sparse_fn, repeats, device, row, *, sparse_key="sparse_ms", as_fraction=False,
            balanced=False):
    """Alternate dense and sparse runs (after one warm-up each): a row with median times and the
    median of the per-pair ratios (dense / sparse, or sparse / dense with ``as_fraction``).

    ``balanced``: each sample of the faster side is the mean of k back-to-back calls, k chosen
    from the warm-up so that both sides' samples take about the same wall time (as a training
    loop runs a layer: step after step). Otherwise every sample is one call, right after one
    call of the other side, so a fast side's sample also carries what a long call of the
    other side left behind (cold caches, memory the system has to hand out again)."""
    dense_fn(), sparse_fn()
    dense_calls = sparse_calls = 1
    if balanced:
        d, s = timed(dense_fn, device), timed(sparse_fn, device)
        dense_calls, sparse_calls = max(1, round(s / d)), max(1, round(d / s))
    dense_ms, sparse_ms, ratios = [], [], []
    for _ in range(repeats):
        d = sum(timed(dense_fn, device) for _ in range(dense_calls)) / dense_calls
        s = sum(timed(sparse_fn, device) for _ in range(sparse_calls)) / sparse_calls
        dense_ms.append(d)
        sparse_ms.append(s)
        ratios.append(s / d if as_fraction else d / s)
    return dict(row, case=name, dense_ms=statistics.median(dense_ms), **{sparse_key: statistics.median(sparse_ms)},
                ratio=statistics.median(ratios), repeats=repeats, dense_calls_per_sample=dense_calls,
                sparse_calls_per_sample=sparse_calls)


def emit_rows(rows, path):
    """Print the rows as JSON lines and, if ``path`` is given, also write them there as a JSON list."""
    for r in rows:
        print(json.dumps(r))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
