"""What every benchmark shares: the machine and kernel path named in its header and JSON rows,
alternating same-process timing of a baseline against a candidate, peak memory, writing rows.

Timing protocol: one untimed warm-up call of every callable, then rounds that time each callable
once, in a fixed order, so both sides see the same machine state (a busy neighbour, thermal
drift); a ratio is the median over rounds of the per-round ratios.

The machine fields, the timer, the alternating rounds, ``compare``, ``fwd_bwd`` and PeakMemory
are the package's (``sparsekern/cli/``: the ``sparsekern`` command measures with the same code);
this module re-exports them next to what only the scripts use: the row writer and the --device check.
"""
import json
import os

import torch

from sparsekern.cli.machine import ISA_FLAGS, cpu_flags, cpu_model, device_name, environment, header, kernel_path
from sparsekern.cli.memory import PeakMemory
from sparsekern.cli.timing import CLOCKS, TIMER_HELP, Timer, alternate, compare, fwd_bwd, median_ratio

__all__ = ["CLOCKS", "ISA_FLAGS", "TIMER_HELP", "PeakMemory", "Timer", "alternate", "append_rows", "checked_device",
           "compare", "cpu_flags", "cpu_model", "device_name", "environment", "fwd_bwd", "header", "kernel_path",
           "median_ratio"]


def checked_device(parser, name):
    """torch.device(name) for a ``--device`` option, or the parser's error where it asks for CUDA
    and torch sees no GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    return device


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
