"""Per-sample gradients through torch.func: a block-sparse layer against nn.Linear.

Both sides run ``vmap(grad(loss), in_dims=(None, 0))`` over a batch of one-token samples
(functional_call on the layer's parameters, loss = sum of squared outputs), alternating in one
process (bench/timing.py's protocol); ratio = median over rounds of dense_ms / sparse_ms. The
sparse side folds the batch into one forward and one input gradient and computes one sampled
weight gradient per sample (sparsekern/ops/batching.py). Prints a table and JSON lines
(``--json`` appends them to a file).

    python bench/bench_bsr_per_sample_grads.py --threads 2
"""
import argparse
import json

import torch
from torch.func import functional_call, grad, vmap

import sparsekern as sk
from timing import Timer, alternate, append_rows, environment, header, kernel_path, median_ratio


def per_sample_grads(layer, x):
    """A callable: the per-sample gradients of every parameter of ``layer`` on the rows of ``x``."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, sample):
        return functional_call(layer, p, (sample,)).square().sum()
    run = vmap(grad(loss), in_dims=(None, 0))
    return lambda: run(params, x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, nargs="+", default=[512, 1024], help="square layers of these sizes")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="samples of one token each")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="append JSON rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env, path = environment(), kernel_path("bsr_forward", torch.device("cpu"), torch.float32)
    # The forward and dX run the registry's kernels on the folded batch; dW per one-token sample
    # is the batching rule's gather of outer products (plain torch), whatever the registry picks.
    path = dict(path, per_sample_dw="gathered outer products")
    print(f"# {header(env, path)} (forward and dX; per-sample dW: gathered outer products), per-sample "
          f"gradients of {args.batch} one-token samples, block {args.block_size}, fp32, median of {args.repeats} "
          "alternating rounds")
    print("| features | density | nn.Linear ms | SparseLinear ms | ratio |")
    print("|---|---|---|---|---|")
    rows = []
    for features in args.features:
        torch.manual_seed(0)
        x = torch.randn(args.batch, 1, features)
        dense = torch.nn.Linear(features, features)
        for density in args.densities:
            sparse = sk.SparseLinear(features, features, block_size=args.block_size, density=density)
            samples, _ = alternate({"dense": per_sample_grads(dense, x), "sparse": per_sample_grads(sparse, x)},
                                   args.repeats, Timer("wall"))
            row = dict(env, **path, bench="per_sample_grads", features=features, density=density,
                       block_size=args.block_size, batch=args.batch, dtype="float32", repeats=args.repeats,
                       dense_ms=round(sorted(samples["dense"])[len(samples["dense"]) // 2], 2),
                       sparse_ms=round(sorted(samples["sparse"])[len(samples["sparse"]) // 2], 2),
                       ratio=round(median_ratio(samples["dense"], samples["sparse"]), 2))
            rows.append(row)
            print(f"| {features} | {density} | {row['dense_ms']} | {row['sparse_ms']} | {row['ratio']}x |", flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
