"""Alternating same-process timing of a baseline against a candidate (the CLI's and bench/'s).

Protocol: one untimed warm-up call of every callable, then rounds that time each callable
once, in a fixed order, so both sides see the same machine state (a busy neighbour, thermal
drift); a ratio is the median over rounds of the per-round ratios.
"""
import statistics
import time

import torch

from ..kernels import floor

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}
TIMER_HELP = ("wall clock; or CPU time of the process (cpu) or of the calling thread (thread, needs --threads 1): "
              "robust on a shared, busy machine")


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


def alternate(fns, rounds, measure, *, balanced=False, on_round=None):
    """Time the callables ``fns`` ({name: fn}) in turn, ``rounds`` times, after one untimed
    warm-up call of each: ({name: [ms per round]}, {name: calls per sample}).

    ``measure(fn)`` returns the ms of ``fn`` (a Timer, or e.g. triton's do_bench). ``balanced``:
    a sample is the mean of k back-to-back calls, k chosen from one timed call so that every
    sample takes about as long as one call of the slowest (as a training loop runs a layer,
    step after step). Otherwise a fast callable's sample also carries what a long call of the
    previous one left behind (cold caches, memory the system hands out again).
    ``on_round(done, rounds)`` is called after the warm-up (done = 0) and after every round
    (progress displays)."""
    for fn in fns.values():
        fn()
    calls = dict.fromkeys(fns, 1)
    if balanced:
        once = {name: measure(fn) for name, fn in fns.items()}
        calls = {name: max(1, round(max(once.values()) / ms)) for name, ms in once.items()}
    samples = {name: [] for name in fns}
    if on_round is not None:
        on_round(0, rounds)
    for done in range(1, rounds + 1):
        for name, fn in fns.items():
            samples[name].append(sum(measure(fn) for _ in range(calls[name])) / calls[name])
        if on_round is not None:
            on_round(done, rounds)
    return samples, calls


def median_ratio(numerators, denominators):
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def settle_floor(fn):
    """Run ``fn`` until the floor rule (kernels/floor.py) has finally decided every shape class
    it reaches (a kernel choice's second round included), so that timings see the settled
    choice, not its measuring calls. Returns floor.decisions_by_product() as decided for ``fn``."""
    floor.reset_floor()
    if floor.floor_mode() == "measure":
        # two rounds of 2 * SAMPLES calls, CONFIRM_AFTER calls apart
        for _ in range(4 * floor.SAMPLES + floor.CONFIRM_AFTER):
            fn()
            if floor.floor_settled():
                break
    return floor.decisions_by_product()


def describe_floor(choices):
    """A table cell for settle_floor's result: "kernels", "composite: <products>" (a product
    whose shape classes chose differently with its choices), or "-" (nothing under the rule,
    or the rule off)."""
    if not choices:
        return "-"
    lost = sorted(f"{product} ({choice})" if "/" in choice else product
                  for product, choice in choices.items() if choice not in floor.KERNEL_BACKENDS)
    return f"composite: {', '.join(lost)}" if lost else "kernels"


def compare(name, dense_fn, sparse_fn, repeats, measure, row, *, sparse_key="sparse_ms", as_fraction=False,
            balanced=False, on_round=None):
    """``row`` with the case ``name``: median times of the dense and sparse callables, timed
    alternately, and the median of the per-round ratios dense / sparse (sparse / dense with
    ``as_fraction``); ``floor``: the floor rule's choice for each product the sparse side runs."""
    choices = settle_floor(sparse_fn)
    samples, calls = alternate({"dense": dense_fn, "sparse": sparse_fn}, repeats, measure, balanced=balanced,
                               on_round=on_round)
    dense, sparse = samples["dense"], samples["sparse"]
    return dict(row, case=name, dense_ms=statistics.median(dense), **{sparse_key: statistics.median(sparse)},
                ratio=median_ratio(sparse, dense) if as_fraction else median_ratio(dense, sparse),
                repeats=repeats, timer=getattr(measure, "name", None), dense_calls_per_sample=calls["dense"],
                sparse_calls_per_sample=calls["sparse"], floor=choices)


def fwd_bwd(layer, x, dy):
    """A callable: y = layer(x); y.backward(dy), the gradients of layer and x cleared first."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
    return run
