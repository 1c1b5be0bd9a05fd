"""What every benchmark shares: the machine and kernel path named in its header and JSON rows,
alternating same-process timing of a baseline against a candidate, peak memory, writing rows.

Timing protocol: one untimed warm-up call of every callable, then rounds that time each callable
once, in a fixed order, so both sides see the same machine state (a busy neighbour, thermal
drift); a ratio is the median over rounds of the per-round ratios.

The machine fields, the timer, the alternating rounds and PeakMemory are the package's
(``sparsekern/cli/``: the ``sparsekern`` command measures with the same code); this module
re-exports them next to the helpers only the scripts use.
"""
import json
import os
import statistics

from sparsekern.cli.machine import ISA_FLAGS, cpu_flags, cpu_model, device_name, environment, header, kernel_path
from sparsekern.cli.memory import PeakMemory
from sparsekern.cli.timing import CLOCKS, TIMER_HELP, Timer, alternate, median_ratio

__all__ = ["CLOCKS", "ISA_FLAGS", "TIMER_HELP", "PeakMemory", "Timer", "alternate", "append_rows", "compare",
           "cpu_flags", "cpu_model", "device_name", "environment", "fwd_bwd", "header", "kernel_path", "median_ratio"]


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
