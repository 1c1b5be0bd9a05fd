"""The floor rule: a compiled kernel never runs where the dense composite is faster.

The block-sparse, 2:4 and low-rank kernels win by doing less work, but by how much
depends on the machine: on a Xeon whose MKL runs AVX-512 a kernel that beats MKL's AVX2
code elsewhere can lose at high density; on an H200 the Triton block-sparse kernels lost
to cuBLAS at density 0.5 and the fused low-rank ones at every rank. So the choice is
measured on the machine itself, like ``torch.backends.cudnn.benchmark``: the first calls of
each *shape class* (product, backend, dtype, threads or GPU, shapes with the token count
rounded up to a power of two, density in steps of 1/16) alternate between the kernel and the composite, both
of which give the right answer, and after ``SAMPLES`` timings of each the kernel is kept
for the class if its median is at least 5 % below the composite's (``KERNEL_MARGIN``),
else the composite. The first timing of each side is a warm-up (first-touch pages,
packing buffers) and is not counted; the median of the other three ignores one outlier
either way (a composite whose fresh outputs are page-faulted in on some calls only has a
fast minimum and a slow typical call, and training runs the typical one). Where one side's
fastest counted timing is ``DECISIVE`` (3) times the other's slowest, the class is decided at
once and finally: a composite that slow is not worth more calls.

A composite choice is final. A kernel choice is measured once more, the same way, after
``CONFIRM_AFTER`` further calls of the class, and that second round decides for the rest
of the process: a process's first calls can run the composite slower than it runs later
(glibc serves the first large outputs from fresh, page-faulted memory until its
thresholds adapt to them: a dense conv backward took 48-50 ms for its first 10 calls and
33-36 ms after, which kept kernels 10-15 % slower than it), and the
rule must not keep a kernel on such a start.

Applies where the registry chose a compiled backend automatically: ``cpu`` on CPU tensors,
``triton`` or ``cuda`` on GPU tensors (there each timed call is bracketed by
synchronisations of the current stream, and a call inside a CUDA graph capture runs the decided side, or the
kernel while undecided, untimed); a backend forced with ``use_backend`` is always obeyed.
Modes (``set_floor_mode`` or the environment variable ``SPARSEKERN_FLOOR``): ``"measure"``
(default) as above; ``"off"``: the kernels always. While
``torch.use_deterministic_algorithms(True)`` is on the kernels run always too, so the
numerics of a run never depend on timings.

A family may name calls that need no measurement on CPUs: ``sure_win`` (the kernel won there
on every CPU measured, so no composite call forms a dense weight) and ``sure_lose`` (too
little work for the kernel's fixed passes), judged on the first call of each shape class.
Their outcome is recorded as a decision too. fp16 calls on a CPU without AVX512-FP16 or
AMX-FP16 are a sure win for every family: torch's fp16 GEMMs and convolutions there are not
vectorised for fp16 (on a Zen 4, a 2048 x 1024 x 1024 GEMM took 4.2 s against fp32's 25 ms, a
conv step 22x fp32's), while the kernels widen fp16 to fp32, so measuring would only cost
composite calls of seconds (not on the portable path, whose plain loops are no sure win). On
GPUs every class is measured: the kernels there lose to cuBLAS/cuDNN at densities where the
CPU kernels win (block 32 at a quarter).
"""
import math
import os
import statistics
import threading
import time

import torch

from .microkernel import cpu_capabilities, requested_isa
from .registry import select_kernel

SAMPLES = 4
CONFIRM_AFTER = 32  # calls of a class running the kernel before its choice is measured again
# The kernel is kept only if its median is this fraction of the composite's or less: where the two
# are within the host's noise (near density 1, runs differed by 10 % between processes), the
# composite is the side that cannot lose against the dense computation.
KERNEL_MARGIN = 0.95
# A side whose fastest counted timing is this many times the other's slowest has lost beyond
# any noise: the class is decided then, finally, without the remaining samples or a second round.
# A composite orders of magnitude slower is then run twice, not 2 x SAMPLES times (torch's fp16
# GEMM on a CPU without AVX512-FP16: 60x the kernel for a 1024 x 1024 layer, seconds a call at
# 4096 x 4096).
DECISIVE = 3.0
MODES = ("measure", "off")
KERNEL_BACKENDS = ("cpu", "triton", "cuda")  # the sides that compete with a composite ("dense", "reference")

_composites = {}     # product -> (composite backend, shape-class key function, sure_win, sure_lose)
_classes = {}        # shape-class key -> _Class
_lock = threading.Lock()
_mode = None


def register_floor(product, composite, key, sure_win=None, sure_lose=None):
    """``product``'s compiled kernels compete with backend ``composite``; ``key(*args)`` gives
    the shape class of a call (without product, backend, dtype and threads or device, which are
    added). ``sure_win(*args)``, if given, is True for calls the cpu kernel wins on every CPU
    measured: they run it unmeasured (no composite call, so no dense weight is formed).
    ``sure_lose(*args)``, if given, is True for calls the composite wins on every CPU: they run
    the composite unmeasured."""
    _composites[product] = (composite, key, sure_win, sure_lose)


def tokens_bucket(m):
    """The token count rounded up to a power of two (batches of one size share a class)."""
    return 1 << max(0, int(m) - 1).bit_length()


def density_bucket(stored, total):
    """Density in steps of 1/16, rounded up: a dynamic-sparsity layer keeps its class."""
    return math.ceil(16 * stored / max(1, total))


def set_floor_mode(mode):
    """``"measure"`` (the floor rule, default) or ``"off"`` (the compiled kernels always)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"unknown floor mode {mode!r}; expected one of {MODES}")
    _mode = mode


def floor_mode():
    if _mode is None:
        set_floor_mode(os.environ.get("SPARSEKERN_FLOOR", "measure"))
    return _mode


def reset_floor():
    """Forget every decision (they are measured again on the next calls)."""
    with _lock:
        _classes.clear()


def floor_decisions():
    """{shape class: the kernel's backend ("cpu", "triton", "cuda") | the composite's | "measuring"}:
    what the rule decided so far."""
    with _lock:
        return {key: cls.choice or "measuring" for key, cls in _classes.items()}


def floor_settled():
    """Whether every shape class met so far has its final choice (no round still to come)."""
    with _lock:
        return all(cls.choice is not None and cls.final for cls in _classes.values())


def _class_key(product, backend, like, key_fn, args):
    # CPU classes are per thread count, GPU classes per device
    place = torch.get_num_threads() if backend == "cpu" else str(like.device)
    return product, backend, like.dtype, place, key_fn(*args)


def final_choice(product, backend, like, *args):
    """The final choice (``backend`` or the composite's) for a call ``product(*args)`` that the
    registry sent to ``backend`` automatically, on tensors like ``like``; None while its shape
    class is unmet or still measured, and where the rule does not apply (mode "off",
    deterministic algorithms: the kernels run, as in ``with_floor``). Reads the rule, never
    starts a measurement."""
    entry = _composites.get(product)
    if (entry is None or backend not in KERNEL_BACKENDS or floor_mode() == "off"
            or torch.are_deterministic_algorithms_enabled()):
        return None
    cls = _classes.get(_class_key(product, backend, like, entry[1], args))
    return cls.choice if cls is not None and cls.final else None


def decisions_by_product():
    """{product: the kernel's backend, the composite's, "measuring", or several joined by "/" where
    its shape classes differ}: what the products really ran in this process."""
    names = {}
    for (product, *_), choice in floor_decisions().items():
        names.setdefault(product, set()).add(choice)
    return {product: "/".join(sorted(choices)) for product, choices in sorted(names.items())}


class _Class:
    __slots__ = ("samples", "choice", "final", "calls")

    def __init__(self):
        self.samples = {}
        self.choice = None
        self.final = False  # no further round (a composite choice, a sure outcome, or the second round)
        self.calls = 0      # calls run on an unconfirmed kernel choice

    def next_side(self, sides):
        """The side with the fewest timings (the kernel first), or None once each has SAMPLES."""
        counts = [len(self.samples.get(side, ())) for side in sides]
        return None if min(counts) >= SAMPLES else sides[counts.index(min(counts))]

    def record(self, side, seconds, sides):
        self.samples.setdefault(side, []).append(seconds)
        counted = [self.samples.get(s, [])[1:] for s in sides]
        if all(counted):
            for winner, loser in ((0, 1), (1, 0)):
                if min(counted[loser]) >= DECISIVE * max(counted[winner]):
                    self.choice, self.final = sides[winner], True
                    return
        if self.next_side(sides) is None:
            best = {s: statistics.median(self.samples[s][1:]) for s in sides}
            self.choice = sides[0] if best[sides[0]] <= KERNEL_MARGIN * best[sides[1]] else sides[1]
            self.final = self.final or self.choice != sides[0]

    def count_unconfirmed_call(self):
        """One more call on an unconfirmed kernel choice; the CONFIRM_AFTER-th starts the second,
        final round of measurements."""
        self.calls += 1
        if self.calls >= CONFIRM_AFTER:
            self.samples, self.choice, self.final = {}, None, True


_clock = time.perf_counter


def _capturing(device):
    """Whether a CUDA graph is being captured on ``device``'s current stream (no timing there)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _timed(fn, args, device):
    """(fn(*args), its wall time); on a GPU the work queued on the current stream before and by
    the call is waited for (that stream only: not, say, an all-reduce on a communication stream)."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if stream is not None:
        stream.synchronize()
    start = _clock()
    out = fn(*args)
    if stream is not None:
        stream.synchronize()
    return out, _clock() - start


def fp16_without_hardware():
    """Whether this CPU lacks both AVX512-FP16 and AMX-FP16 (False where torch cannot say, and on
    the portable path, whose plain loops are no sure win)."""
    capabilities = cpu_capabilities()
    if "avx512_fp16" not in capabilities or requested_isa() == "portable":
        return False
    return not (capabilities["avx512_fp16"] or capabilities.get("amx_fp16", False))


def _new_class(key, args, backend, like, sure_win, sure_lose, composite_name):
    """The class of ``key``, created by its first call; a sure outcome (CPU only) is judged on
    that call only."""
    if backend != "cpu":
        sure_win = sure_lose = None
    sure = (backend if sure_win is not None and sure_win(*args)
            else composite_name if sure_lose is not None and sure_lose(*args)
            else backend if backend == "cpu" and like.dtype == torch.float16 and fp16_without_hardware()
            else None)
    with _lock:
        cls = _classes.setdefault(key, _Class())
        if sure is not None and cls.choice is None and not cls.samples:
            cls.choice, cls.final = sure, True
        return cls


def with_floor(product, fn, like, backend="cpu"):
    """``fn`` (``backend``'s implementation of ``product``, chosen automatically for tensors like
    ``like``) under the floor rule; ``fn`` itself where the rule does not cover that backend."""
    entry = _composites.get(product)
    if entry is None or backend not in KERNEL_BACKENDS or floor_mode() == "off":
        return fn
    composite_name, key_fn, sure_win, sure_lose = entry
    composite = select_kernel(product, like.device, like.dtype, composite_name)[1]
    sides = (backend, composite_name)
    implementations = {backend: fn, composite_name: composite}

    def call(*args):
        if torch.are_deterministic_algorithms_enabled():
            return fn(*args)
        key = _class_key(product, backend, like, key_fn, args)
        cls = _classes.get(key) or _new_class(key, args, backend, like, sure_win, sure_lose, composite_name)
        side = cls.choice  # once finally decided, a class is read without the lock
        if side is not None and cls.final:
            return implementations[side](*args)
        if _capturing(like.device):  # a graph replays what it captured: the kernel unless decided against
            return implementations[side or backend](*args)
        with _lock:
            if cls.choice is not None and not cls.final:
                cls.count_unconfirmed_call()  # the CONFIRM_AFTER-th reopens the measurements
            measuring = cls.choice is None
            side = cls.next_side(sides) if measuring else cls.choice
        if not measuring:
            return implementations[side](*args)
        out, elapsed = _timed(implementations[side], args, like.device)
        with _lock:
            if cls.choice is None:
                cls.record(side, elapsed, sides)
        return out

    return call
