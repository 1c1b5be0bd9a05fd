"""Cost of one 2:4 DST update of a static SemiSparseLinear layer: C++ kernels vs plain torch.

Times what ``RigL``/``SET`` do per 2:4 layer at an update step (``_update_semi`` of
sparsekern/methods/dst/drivers.py), in phases:

- ``grad``: the dense gradient from the kept part and the probe's complement part
  (``SemiProbe.dense_grad``; RigL only), with the complement's indices (the probe's forward hook);
- ``decide``: ``dense_weight()``, ``mask`` and the rule (``semi_rigl_update`` / ``semi_set_update``);
- ``restructure``: ``restructure`` of sparsekern/methods/dst/state.py (the layer's
  ``restructure(mask)`` and the SGD momentum carried by its slot map).

The paths are sparsekern's backends: ``cpp`` is the automatic choice, the ``cpu`` backend
(sparsekern._C_semi's C++ kernels), ``torch`` runs under ``sk.use_backend("reference")``.
They alternate in one process on identical layers (same seed), and the script checks that
they take the same decision. Prints a table and JSON lines (``--json`` appends them to a file).

    python bench/bench_semi_dst_update.py --rows 256 --cols 256 --repeats 2      # smoke run
    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_semi_dst_update.py --threads 1 --json out.jsonl
"""
import argparse
import json
import statistics

import torch

import sparsekern as sk
from sparsekern.methods.dst.semi_probe import SemiProbe, complement_indices
from sparsekern.methods.dst.state import restructure
from timing import Timer, append_rows, environment, header, kernel_path

PATHS = {"torch": "reference", "cpp": None}  # path -> the backend sk.use_backend forces (None: automatic)
PHASES = ("grad", "decide", "restructure", "total")


def make_layer(rows, cols, transposable, seed):
    torch.manual_seed(seed)
    layer = sk.SemiSparseLinear(cols, rows, transposable=transposable)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.values.grad = torch.randn_like(layer.values)
    opt.step()  # a momentum buffer to carry
    layer.values.grad = torch.randn_like(layer.values)
    return layer, opt


def one_update(layer, opt, method, fraction, seed, measure):
    """Phase times (ms) of one update and the new mask."""
    complement_grad = torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(seed))
    out = {}

    def grad():  # the probe's work: its forward hook (complement indices) and dense_grad
        if method == "rigl":
            probe = SemiProbe(layer)
            probe.indices, probe.grad = complement_indices(layer.indices), complement_grad
            out["grad"] = probe.dense_grad("layer")
            probe.remove()

    def decide():
        weight, mask = layer.dense_weight().detach(), layer.mask
        if method == "rigl":
            out["mask"], _ = sk.methods.functional.semi_rigl_update(weight, mask, out["grad"], fraction,
                                                                    transposable=layer.transposable)
        else:
            out["mask"], _ = sk.methods.functional.semi_set_update(
                weight, mask, fraction, generator=torch.Generator().manual_seed(seed),
                transposable=layer.transposable)

    times = {"grad": measure(grad), "decide": measure(decide),
             "restructure": measure(lambda: restructure(layer, opt, out["mask"]))}
    times["total"] = sum(times.values())
    return times, out["mask"]


def run(args, measure, context):
    for transposable in (False, True):
        for method in ("set", "rigl"):
            samples = {path: [] for path in PATHS}
            for repeat in range(args.repeats + 1):  # repeat 0 warms up
                masks = {}
                for path, backend in PATHS.items():
                    layer, opt = make_layer(args.rows, args.cols, transposable, repeat)
                    with sk.use_backend(backend):
                        times, masks[path] = one_update(layer, opt, method, args.fraction, repeat, measure)
                    if repeat:
                        samples[path].append(times)
                if not torch.equal(masks["torch"], masks["cpp"]):
                    raise SystemExit(f"the two paths disagree ({method}, transposable={transposable})")
            row = dict(context, method=method, transposable=transposable, shape=[args.rows, args.cols],
                       drop_fraction=args.fraction, repeats=args.repeats, timer=measure.name, dtype="float32",
                       same_decision=True)
            for path in PATHS:
                for phase in PHASES:
                    row[f"{path}_{phase}_ms"] = round(statistics.median(t[phase] for t in samples[path]), 2)
            row["speedup"] = round(row["torch_total_ms"] / row["cpp_total_ms"], 2)
            yield row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--fraction", type=float, default=0.3, help="drop fraction (RigL's alpha at the first update)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append JSON rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env, path = environment(), kernel_path("semi_forward", torch.device("cpu"), torch.float32)
    if path["backend"] != "cpu":
        raise SystemExit("the cpu backend (sparsekern._C_semi, with the C++ DST kernels) is not built: "
                         "nothing to compare")
    print(f"# {header(env, path)}, paths torch = backend reference, cpp = backend cpu, "
          f"W {args.rows}x{args.cols}, median of {args.repeats} rounds")
    print("| layout | method | path | grad ms | decide ms | restructure ms | total ms |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for row in run(args, Timer("wall"), {"bench": "semi_dst_update", **env, **path,
                                        "backends": {"torch": "reference", "cpp": "cpu"}}):
        rows.append(row)
        layout = "transposable" if row["transposable"] else "row-wise"
        for name in PATHS:
            print(f"| {layout} | {row['method']} | {name} | " + " | ".join(str(row[f"{name}_{phase}_ms"])
                                                                    for phase in PHASES) + " |", flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
