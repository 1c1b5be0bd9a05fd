"""Per-sample gradients through torch.func: sparsekern's linear layers against nn.Linear.

Both sides run ``vmap(grad(loss), in_dims=(None, 0))`` over a batch of one-token samples
(functional_call on the layer's parameters, loss = sum of squared outputs), alternating in one
process (bench/timing.py's protocol); ratio = median over rounds of dense_ms / sparse_ms. The
sparse side folds the batch into one forward and one input gradient on the registry's kernels;
the weight gradient is per sample, as the batching rules compute it (sparsekern/ops/batching.py
and the ops' own rules): block-sparse and 2:4 dW of a few tokens as gathered products, low-rank
through its kernels per sample. Prints a table and JSON lines (``--json`` appends them to a file).

    python bench/bench_per_sample_grads.py --threads 2
"""
import argparse
import json

import torch
from torch.func import functional_call, grad, vmap

import sparsekern as sk
from timing import Timer, alternate, append_rows, environment, header, kernel_path, median_ratio

# layer kind -> (registry product whose path the header names, its variants: (label, factory(features)))
KINDS = {
    "bsr": ("bsr_forward", lambda args: [(f"density {d}", lambda f, d=d: sk.SparseLinear(
        f, f, block_size=args.block_size, density=d)) for d in args.densities]),
    "semi": ("semi_forward", lambda args: [("2:4", lambda f: sk.SemiSparseLinear(f, f))]),
    "lowrank": ("lowrank_forward", lambda args: [(f"rank {r}", lambda f, r=r: sk.LowRankLinear(f, f, r))
                                                 for r in args.ranks]),
}


def per_sample_grads(layer, x):
    """A callable: the per-sample gradients of every parameter of ``layer`` on the rows of ``x``."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, sample):
        return functional_call(layer, p, (sample,)).square().sum()
    run = vmap(grad(loss), in_dims=(None, 0))
    return lambda: run(params, x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    p.add_argument("--features", type=int, nargs="+", default=[512, 1024], help="square layers of these sizes")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="block-sparse densities")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--ranks", type=int, nargs="+", default=[64], help="low-rank ranks")
    p.add_argument("--batch", type=int, default=64, help="samples of one token each")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="append JSON rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"# {header(env, {'backend': 'per layer kind'})}, per-sample gradients of {args.batch} one-token "
          f"samples, fp32, median of {args.repeats} alternating rounds")
    print("| layer | variant | features | path (forward) | nn.Linear ms | layer ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind in args.kinds:
        product, variants = KINDS[kind]
        path = kernel_path(product, torch.device("cpu"), torch.float32)
        for features in args.features:
            torch.manual_seed(0)
            x = torch.randn(args.batch, 1, features)
            dense = torch.nn.Linear(features, features)
            for label, factory in variants(args):
                layer = factory(features)
                samples, _ = alternate({"dense": per_sample_grads(dense, x), "sparse": per_sample_grads(layer, x)},
                                       args.repeats, Timer("wall"))
                row = dict(env, **path, bench="per_sample_grads", kind=kind, variant=label, features=features,
                           batch=args.batch, dtype="float32", repeats=args.repeats,
                           dense_ms=round(sorted(samples["dense"])[args.repeats // 2], 2),
                           sparse_ms=round(sorted(samples["sparse"])[args.repeats // 2], 2),
                           ratio=round(median_ratio(samples["dense"], samples["sparse"]), 2))
                rows.append(row)
                isa = f" {path['isa']}" if path.get("isa") else ""
                print(f"| {kind} | {label} | {features} | {path['backend']}{isa} | {row['dense_ms']} | "
                      f"{row['sparse_ms']} | {row['ratio']}x |", flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
