"""What every benchmark shares: the machine and kernel path named in its header and JSON rows,
alternating same-process timing of a baseline against a candidate, peak memory, writing rows.

Timing protocol: one untimed warm-up call of every callable, then rounds that time each callable
once, in a fixed order, so both sides see the same machine state (a busy neighbour, thermal
drift); a ratio is the median over rounds of the per-round ratios.
"""
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import time

import torch

import sparsekern as sk

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}
TIMER_HELP = ("wall clock; or CPU time of the process (cpu) or of the calling thread (thread, needs --threads 1): "
              "robust on a shared, busy machine")


# ------------------------------------------------------------------ environment

def _cpuinfo(field):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model():
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags():
    """Which of the ISA extensions that decide the microkernels this CPU has."""
    present = set((_cpuinfo("flags") or "").split())
    return {flag: flag in present for flag in ISA_FLAGS}


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


@functools.cache
def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device=torch.device("cpu")):
    """The machine and software fields of every JSON row (read when called: threads may have been set)."""
    return dict(device=device_name(device), cpu=cpu_model(), cpu_cores=os.cpu_count(), cpu_flags=cpu_flags(),
                threads=torch.get_num_threads(), torch=torch.__version__, triton=_triton_version(),
                thp_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"))


def kernel_path(product, device, dtype):
    """The backend the registry picks for ``product`` (a forced ``sk.use_backend`` included) and, on
    CPU, the ISA of the compiled family's microkernel ("unavailable" when it is not built)."""
    backend = sk.kernels.select_kernel(product, device, dtype)[0]
    isa = None
    if device.type == "cpu":
        isa = sk.kernels.microkernel.microkernel_isa(product.split("_")[0])  # bsr_* -> the bsr family
    return {"backend": backend, "isa": isa}


def header(env, path):
    """The first header line: device, CPU model and ISA flags, versions, threads, kernel path."""
    have = " ".join(f for f, on in env["cpu_flags"].items() if on)
    lack = " ".join(f for f, on in env["cpu_flags"].items() if not on)
    flags = " ".join(filter(None, [have, lack and (f"(no {lack})" if have else f"no {lack}")]))
    host = f" (host {env['cpu']})" if env["device"] != env["cpu"] else ""
    text = (f"{env['device']}{host}, {flags}, torch {env['torch']}, {env['threads']} threads, "
            f"backend {path['backend']}")
    return text + (f", microkernel {path['isa']}" if path.get("isa") else "")


# ------------------------------------------------------------------ timing

class Timer:
    """Milliseconds of one call on the ``clock`` of CLOCKS, the device synchronised around it."""

    def __init__(self, clock="wall", device=torch.device("cpu")):
        if clock == "thread" and torch.get_num_threads() != 1:
            raise SystemExit("the thread timer measures the calling thread only: use it with --threads 1")
        self.name, self._clock, self._device = clock, CLOCKS[clock], device

    def _sync(self):
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def __call__(self, fn):
        self._sync()
        start = self._clock()
        fn()
        self._sync()
        return (self._clock() - start) * 1e3


def alternate(fns, rounds, measure, *, balanced=False):
    """Time the callables ``fns`` ({name: fn}) in turn, ``rounds`` times, after one untimed
    warm-up call of each: ({name: [ms per round]}, {name: calls per sample}).

    ``measure(fn)`` returns the ms of ``fn`` (a Timer, or e.g. triton's do_bench). ``balanced``:
    a sample is the mean of k back-to-back calls, k chosen from one timed call so that every
    sample takes about as long as one call of the slowest (as a training loop runs a layer,
    step after step). Otherwise a fast callable's sample also carries what a long call of the
    previous one left behind (cold caches, memory the system hands out again)."""
    for fn in fns.values():
        fn()
    calls = dict.fromkeys(fns, 1)
    if balanced:
        once = {name: measure(fn) for name, fn in fns.items()}
        calls = {name: max(1, round(max(once.values()) / ms)) for name, ms in once.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(sum(measure(fn) for _ in range(calls[name])) / calls[name])
    return samples, calls


def median_ratio(numerators, denominators):
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def compare(name, dense_fn, sparse_fn, repeats, measure, row, *, sparse_key="sparse_ms", as_fraction=False,
            balanced=False):
    """``row`` with the case ``name``: median times of the dense and sparse callables, timed
    alternately, and the median of the per-round ratios dense / sparse (sparse / dense with
    ``as_fraction``)."""
    samples, calls = alternate({"dense": dense_fn, "sparse": sparse_fn}, repeats, measure, balanced=balanced)
    dense, sparse = samples["dense"], samples["sparse"]
    return dict(row, case=name, dense_ms=statistics.median(dense), **{sparse_key: statistics.median(sparse)},
                ratio=median_ratio(sparse, dense) if as_fraction else median_ratio(dense, sparse),
                repeats=repeats, timer=getattr(measure, "name", None), dense_calls_per_sample=calls["dense"],
                sparse_calls_per_sample=calls["sparse"])


def fwd_bwd(layer, x, dy):
    """A callable: y = layer(x); y.backward(dy), the gradients of layer and x cleared first."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
    return run


# ------------------------------------------------------------------ memory

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


# ------------------------------------------------------------------ rows

def append_rows(rows, path):
    """Append the rows to ``path`` as JSON lines (nothing if ``path`` is empty)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"# {len(rows)} JSON rows appended to {path}")
