"""Cost of one 2:4 DST update of a static SemiSparseLinear layer: C++ kernels vs plain torch.

Times what ``RigL``/``SET`` do per 2:4 layer at an update step (sparsekern/methods/dst.py
``_update_semi``), in phases:

- ``grad``: the dense gradient from the kept part and the probe's complement part
  (``SemiProbe.dense_grad``; RigL only), with the complement's indices (the probe's forward hook);
- ``decide``: ``dense_weight()``, ``mask`` and the rule (``semi_rigl_update`` / ``semi_set_update``);
- ``restructure``: ``restructure_semi`` (``set_mask`` + the SGD momentum carried).

The two paths alternate in one process on identical layers (same seed), and the script checks
that they take the same decision. Prints a table and writes JSON rows.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_dst_semi_update.py --threads 1 --json out.jsonl
"""
import argparse
import json
import platform
import statistics
import time

import torch

import sparsekern as sk
from sparsekern.methods import functional as Fn
from sparsekern.methods.dst_semi import SemiProbe, complement_indices, restructure_semi
from sparsekern.nn import semi_sparse_linear


def make_layer(rows, cols, transposable, seed):
    torch.manual_seed(seed)
    layer = sk.SemiSparseLinear(cols, rows, transposable=transposable)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.values.grad = torch.randn_like(layer.values)
    opt.step()  # a momentum buffer to carry
    layer.values.grad = torch.randn_like(layer.values)
    return layer, opt


def one_update(layer, opt, method, fraction, seed):
    """Phase times (s) of one update and the new mask."""
    times = {}
    complement_grad = torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    grad = None
    if method == "rigl":  # the probe's work: its forward hook (complement indices) and dense_grad
        probe = SemiProbe(layer)
        probe.indices, probe.grad = complement_indices(layer.indices), complement_grad
        grad = probe.dense_grad("layer")
        probe.remove()
    times["grad"] = time.perf_counter() - start
    start = time.perf_counter()
    weight, mask = layer.dense_weight().detach(), layer.mask
    if method == "rigl":
        new_mask, _ = Fn.semi_rigl_update(weight, mask, grad, fraction, transposable=layer.transposable)
    else:
        new_mask, _ = Fn.semi_set_update(weight, mask, fraction, generator=torch.Generator().manual_seed(seed),
                                         transposable=layer.transposable)
    times["decide"] = time.perf_counter() - start
    start = time.perf_counter()
    restructure_semi(layer, opt, new_mask)
    times["restructure"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times, new_mask


def run(args):
    kernels = semi_sparse_linear._dst_extension
    paths = {"torch": lambda *tensors: None, "cpp": kernels}
    if kernels(torch.zeros(1)) is None:
        raise SystemExit("the C++ DST kernels of sparsekern._C_semi are unavailable: nothing to compare")
    for transposable in (False, True):
        for method in ("set", "rigl"):
            samples = {path: [] for path in paths}
            for repeat in range(args.repeats + 1):  # repeat 0 warms up
                masks = {}
                for path, probe in paths.items():
                    semi_sparse_linear._dst_extension = probe
                    try:
                        layer, opt = make_layer(args.rows, args.cols, transposable, repeat)
                        times, masks[path] = one_update(layer, opt, method, args.fraction, repeat)
                    finally:
                        semi_sparse_linear._dst_extension = kernels
                    if repeat:
                        samples[path].append(times)
                if not torch.equal(masks["torch"], masks["cpp"]):
                    raise SystemExit(f"the two paths disagree ({method}, transposable={transposable})")
            row = {"bench": "dst_semi_update", "method": method, "transposable": transposable,
                   "shape": [args.rows, args.cols], "drop_fraction": args.fraction, "repeats": args.repeats,
                   "threads": torch.get_num_threads(), "device": platform.machine(), "torch": torch.__version__,
                   "dtype": "float32", "same_decision": True}
            for path in paths:
                for phase in ("grad", "decide", "restructure", "total"):
                    row[f"{path}_{phase}_ms"] = round(1000 * statistics.median(t[phase] for t in samples[path]), 2)
            row["speedup"] = round(row["torch_total_ms"] / row["cpp_total_ms"], 2)
            yield row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--fraction", type=float, default=0.3, help="drop fraction (RigL's alpha at the first update)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append JSON rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| layout | method | path | grad ms | decide ms | restructure ms | total ms |")
    print("|---|---|---|---|---|---|---|")
    for row in run(args):
        layout = "transposable" if row["transposable"] else "row-wise"
        for path in ("torch", "cpp"):
            print(f"| {layout} | {row['method']} | {path} | {row[f'{path}_grad_ms']} | {row[f'{path}_decide_ms']} | "
                  f"{row[f'{path}_restructure_ms']} | {row[f'{path}_total_ms']} |")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
