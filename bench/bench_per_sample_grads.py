"""Per-sample gradients through torch.func: sparsekern's layers against nn.Linear / nn.Conv2d.

Both sides run ``vmap(grad(loss), in_dims=(None, 0))`` over a batch of samples (one token, or
one image, each; functional_call on the layer's parameters, loss = sum of squared outputs),
alternating in one process (bench/timing.py's protocol) after warm-up calls that let the floor
rule settle; ratio = median over rounds of dense_ms / sparse_ms. The sparse side folds the
batch into one forward and one input gradient on the registry's kernels; the weight gradient
is per sample, as the batching rules compute it (sparsekern/ops/batching.py and the ops' own
rules): block-sparse and 2:4 dW of a few tokens as gathered products, the convolution's as one
call with the samples as groups, low-rank through its products per sample. Prints a table and
JSON lines (``--json`` appends them to a file).

    python bench/bench_per_sample_grads.py --threads 2
"""
import argparse
import json

import torch
from torch.func import functional_call, grad, vmap

import sparsekern as sk
from sparsekern.kernels import floor
from timing import Timer, alternate, append_rows, environment, header, kernel_path, median_ratio

# layer kind -> (registry product whose path the header names, its variants: (label, factory(features)))
KINDS = {
    "bsr": ("bsr_forward", lambda args: [(f"density {d}", lambda f, d=d: sk.SparseLinear(
        f, f, block_size=args.block_size, density=d)) for d in args.densities]),
    "semi": ("semi_forward", lambda args: [("2:4", lambda f: sk.SemiSparseLinear(f, f))]),
    "lowrank": ("lowrank_forward", lambda args: [(f"rank {r}", lambda f, r=r: sk.LowRankLinear(f, f, r))
                                                 for r in args.ranks]),
    "conv": ("conv_forward", lambda args: [(f"density {d}", lambda c, d=d: sk.SparseConv2d(
        c, c, 3, padding=1, block_size=args.conv_block_size, density=d)) for d in args.densities]),
}


def _shapes(kind, args):
    """(label, dense layer, per-sample input) for each size of ``kind``."""
    if kind != "conv":
        return [(str(f), f, torch.nn.Linear(f, f), torch.randn(args.batch, 1, f)) for f in args.features]
    shapes = []
    for shape in args.conv_shapes:
        channels, size = (int(v) for v in shape.split("x"))
        shapes.append((f"{channels} ch {size}x{size}", channels, torch.nn.Conv2d(channels, channels, 3, padding=1),
                       torch.randn(args.batch, 1, channels, size, size)))
    return shapes


def _settled(fns, most):
    """Call each of ``fns`` until the floor rule has settled every choice (at most ``most`` times)."""
    for _ in range(most):
        for fn in fns:
            fn()
        if floor.floor_settled():
            return


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
    p.add_argument("--conv-shapes", nargs="+", default=["64x8", "128x8", "64x16"],
                   help="3x3 convolutions, CHANNELSxSIZE (in = out channels, square images)")
    p.add_argument("--conv-block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64, help="samples of one token (one image) each")
    p.add_argument("--warmup", type=int, default=100, help="at most this many calls for the floor rule to settle")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="append JSON rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"# {header(env, {'backend': 'per layer kind'})}, per-sample gradients of {args.batch} samples of one "
          f"token or image, fp32, median of {args.repeats} alternating rounds")
    print("| layer | variant | shape | path (forward) | dense ms | layer ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind in args.kinds:
        product, variants = KINDS[kind]
        path = kernel_path(product, torch.device("cpu"), torch.float32)
        for label_shape, size, dense, x in _shapes(kind, args):
            for label, factory in variants(args):
                torch.manual_seed(0)
                layer = factory(size)
                fns = {"dense": per_sample_grads(dense, x), "sparse": per_sample_grads(layer, x)}
                _settled(fns.values(), args.warmup)
                samples, _ = alternate(fns, args.repeats, Timer("wall"))
                row = dict(env, **path, bench="per_sample_grads", kind=kind, variant=label, shape=label_shape,
                           batch=args.batch, dtype="float32", repeats=args.repeats,
                           floor=floor.decisions_by_product(),
                           dense_ms=round(sorted(samples["dense"])[args.repeats // 2], 2),
                           sparse_ms=round(sorted(samples["sparse"])[args.repeats // 2], 2),
                           ratio=round(median_ratio(samples["dense"], samples["sparse"]), 2))
                rows.append(row)
                isa = f" {path['isa']}" if path.get("isa") else ""
                print(f"| {kind} | {label} | {label_shape} | {path['backend']}{isa} | {row['dense_ms']} | "
                      f"{row['sparse_ms']} | {row['ratio']}x |", flush=True)
    for row in rows:
        print(json.dumps(row))
    append_rows(rows, args.json)


if __name__ == "__main__":
    main()
