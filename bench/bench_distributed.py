"""Communication a sparse training method adds under DDP and FSDP2, on local gloo processes.

Model: ``--layers`` SparseLinear(d, d) layers, block ``--block``, density ``--density``
(ERK gives them all the same density at equal shapes), SGD with momentum, a batch of
``--batch`` rows per rank. Every method runs ``--steps`` steps with an update every
``--delta`` steps, under DDP (re-wrapped with ``init_sync=False`` after a change) and under
FSDP2 (updates through ``sparsekern.methods.distributed.structure_step``). Per method and
engine it reports the median time of a training step (forward, backward, optimizer step),
of ``driver.step()`` on non-update and on update steps (the decision, its all-reduce, the
restructure and, under FSDP2, the gather and re-shard, also timed apart), of a DDP re-wrap with and without
the initial broadcast, and the bytes each rank sends for the method's own collectives
(counted from the model's sizes: the formulas of docs/distributed.md). It also times bare
gloo all-reduce and all-gather at those sizes. Prints a table; ``--json`` writes the rows.

    python bench/bench_distributed.py                       # 2 processes, d=1024, 4 layers
    python bench/bench_distributed.py --dim 256 --steps 6   # smoke run
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern as sk
from sparsekern.methods import DPF, GGR, SET, SNFS, RigL, TopKAST
from sparsekern.methods.distributed import gathered, structure_step

METHODS = {"SET": SET, "RigL": RigL, "SNFS": SNFS, "GGR": GGR, "TopKAST": TopKAST, "DPF": DPF}


def build(args, engine):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [sk.SparseLinear(args.dim, args.dim, block_size=args.block), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    if engine == "fsdp":
        for layer in model:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer)
        fully_shard(model)
    return model


def run(args, name, engine, rank):
    model = build(args, engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    options = {"ramp_end": args.delta} if name == "DPF" else {}  # at its target density from the first update
    with gathered(model, opt):
        driver = METHODS[name](model, opt, density=args.density, delta=args.delta, t_end=10 ** 6, seed=1, **options)
    wrapped = DDP(model, init_sync=False) if engine == "ddp" else model
    g = torch.Generator().manual_seed(rank)
    times = {"train": [], "step": [], "update": [], "rewrap": [], "rewrap_sync": [], "gather": [], "decide": [],
             "reshard": []}
    for t in range(args.steps):
        x = torch.randn(args.batch, args.dim, generator=g)
        start = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(wrapped(x), x).backward()
        opt.step()
        times["train"].append(time.perf_counter() - start)
        update = driver.schedule.is_update_step(driver.t + 1)
        dist.barrier()
        start = time.perf_counter()
        if engine == "fsdp" and update:  # structure_step's update path, timed in its three phases
            context = gathered(model, opt, [m for _, m in driver.layers + driver.semi_layers])
            context.__enter__()
            entered = time.perf_counter()
            changed = driver.step()
            decided = time.perf_counter()
            context.__exit__(None, None, None)
            for key, value in (("gather", entered - start), ("decide", decided - entered),
                               ("reshard", time.perf_counter() - decided)):
                times[key].append(value)
        else:
            changed = structure_step(driver, model, opt) if engine == "fsdp" else driver.step()
        times["update" if update else "step"].append(time.perf_counter() - start)
        if changed and engine == "ddp":
            for key, sync in (("rewrap_sync", True), ("rewrap", False)):
                dist.barrier()
                start = time.perf_counter()
                wrapped = DDP(model, init_sync=sync)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) if v else None for k, v in times.items()}, driver


def method_bytes(args, name, engine, driver, world):
    """Bytes each rank sends for the method's collectives per update (and per step for shadow
    drivers), ring algorithms: all-reduce 2(W-1)/W x size, all-gather (W-1)/W x size."""
    ring_ar, ring_ag = 2 * (world - 1) / world, (world - 1) / world
    grid = sum(layer.block_mask.numel() for _, layer in driver.layers)
    block = args.block * args.block
    stored = sum(layer.nnz_blocks for _, layer in driver.layers) * block
    per_update = 4 * grid * ring_ar if name in ("RigL", "SNFS", "GGR") else 0.0
    per_step = 0.0
    if name in ("TopKAST", "DPF"):
        per_step = 4 * sum(int(layout.block_mask.sum()) for _, layout in driver.shadow.values()) * block * ring_ar
    if engine == "fsdp":
        per_update += 4 * stored * (2 + 1) * ring_ag  # values, gradients, momentum
    return {"bytes_per_update": per_update, "bytes_per_step": per_step, "grid_blocks": grid, "stored": stored}


def bare_collectives(sizes):
    out = {}
    for numel in sizes:
        t = torch.ones(numel)
        gathered_out = torch.empty(numel * dist.get_world_size())
        for kind in ("all_reduce", "all_gather"):
            runs = []
            for _ in range(21):
                dist.barrier()
                start = time.perf_counter()
                if kind == "all_reduce":
                    dist.all_reduce(t)
                else:
                    dist.all_gather_into_tensor(gathered_out, t)
                runs.append(time.perf_counter() - start)
            out[f"{kind}_{numel}"] = statistics.median(runs)
    return out


def worker(rank, world, init_file, args, out_path):
    """One rank. It ends without interpreter finalization: a gloo thread that drops the last
    reference to a tensor while Python shuts down takes the GIL and aborts the process
    (SIGABRT, "terminate called without an active exception"; seen in about one run in three)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "FSDP2-wrapped module")  # outputs that are views: harmless here
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = []
        for name in args.methods:
            for engine in ("ddp", "fsdp"):
                times, driver = run(args, name, engine, rank)
                rows.append({"method": name, "engine": engine, **times,
                             **method_bytes(args, name, engine, driver, world)})
        bare = bare_collectives(sorted({rows[0]["grid_blocks"], rows[0]["stored"]}))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"rows": rows, "bare": bare}, f)
        gc.collect()
        dist.barrier()  # no collective still in flight
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--delta", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "init"), args, out), nprocs=args.world, join=True)
        with open(out) as f:
            result = json.load(f)
    ms = lambda v: f"{'-':>8}" if v is None else f"{1e3 * v:8.2f}"  # noqa: E731
    print(f"{args.world} gloo processes x {args.threads} thread(s); {args.layers} x SparseLinear({args.dim}, "
          f"{args.dim}), block {args.block}, density {args.density}, batch {args.batch}/rank; times in ms (median)")
    print(f"{'method':8} {'engine':6} {'train':>8} {'step':>8} {'update':>8} {'gather':>8} {'decide':>8} "
          f"{'reshard':>8} {'rewrap':>8} {'+sync':>8} {'B/update':>10} {'B/step':>10}")
    for r in result["rows"]:
        print(f"{r['method']:8} {r['engine']:6} {ms(r['train'])} {ms(r['step'])} {ms(r['update'])} "
              f"{ms(r['gather'])} {ms(r['decide'])} {ms(r['reshard'])} "
              f"{ms(r['rewrap'])} {ms(r['rewrap_sync'])} {r['bytes_per_update']:10.0f} {r['bytes_per_step']:10.0f}")
    print("bare gloo collectives (fp32 elements -> ms):",
          ", ".join(f"{k} {1e3 * v:.2f}" for k, v in result["bare"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1)


if __name__ == "__main__":
    main()
