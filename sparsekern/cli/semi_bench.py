"""The 2:4 linear microbenchmark (``sparsekern bench --product semi`` and
bench/bench_semi_linear.py): SemiSparseLinear vs dense nn.Linear, timed alternately.

Cases (ratio = median over rounds of dense_ms / sparse_ms for the pair timed back to back):

* ``fwd``: inference forward (no autograd), static transposable 2:4.
* ``fwd+bwd static``: y = layer(x); y.backward(dy), x requiring grad, bias on; static mode
  (compressed parameter, dX through Wᵀ's compression, sampled dW).
* ``fwd+bwd static rowwise``: the same with row-wise 2:4 (fp32 dX on the column plan of W;
  bf16 dX dense).
* ``fwd+bwd dynamic``: dense master weight re-pruned (transposable) every call, dense
  straight-through dW.
* ``fwd+bwd dynamic rowwise``: the same re-pruned row-wise (the column plan rebuilt every call).
* ``prune``: one prune+compress (transposable, W and Wᵀ) of the weight; its ``ratio`` is
  prune_ms / dense forward ms (the fraction of a matmul it costs).
"""
import torch
from torch import nn

from .. import kernels
from ..nn import SemiSparseLinear
from .timing import compare, describe_floor, fwd_bwd

CASES = ("fwd", "fwd+bwd static", "fwd+bwd static rowwise", "fwd+bwd dynamic", "fwd+bwd dynamic rowwise",
         "prune")
HEADER = f"{'case':<24} {'shape (tokens,in,out)':>22} {'dense ms':>10} {'2:4 ms':>9} {'ratio':>12}  floor rule"
_LAYERS = {
    "fwd": lambda dense: SemiSparseLinear.from_dense(dense),
    "fwd+bwd static": lambda dense: SemiSparseLinear.from_dense(dense),
    "fwd+bwd static rowwise": lambda dense: SemiSparseLinear.from_dense(dense, transposable=False),
    "fwd+bwd dynamic": lambda dense: SemiSparseLinear.from_dense(dense, mode="dynamic"),
    "fwd+bwd dynamic rowwise": lambda dense: SemiSparseLinear.from_dense(dense, mode="dynamic", transposable=False),
}


def _forward(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def _prune(weight):
    _, fn = kernels.select_kernel("semi_prune_compress", weight.device, weight.dtype)
    return lambda: fn(weight, True)


def run_cases(shapes, repeats, dtype, device, cases, measure, context, on_case=None, on_round=None):
    """Yield one row per (shape, case); ``on_case(index, count, name)`` before each."""
    count = len(shapes) * len(cases)
    for s, (tokens, in_features, out_features) in enumerate(shapes):
        torch.manual_seed(0)
        factory = dict(device=device, dtype=dtype)
        x = torch.randn(tokens, in_features, **factory, requires_grad=True)
        dy = torch.randn(tokens, out_features, **factory)
        dense = nn.Linear(in_features, out_features, **factory)
        row = dict(context, dtype=str(dtype).replace("torch.", ""), tokens=tokens, in_features=in_features,
                   out_features=out_features, sparsity="2:4")
        for c, case in enumerate(cases):
            if on_case is not None:
                on_case(s * len(cases) + c, count, f"{case} {tokens},{in_features},{out_features}")
            if case == "prune":
                yield compare(case, _forward(dense, x), _prune(dense.weight.detach()), repeats, measure, row,
                              as_fraction=True, on_round=on_round)
            elif case == "fwd":
                yield compare(case, _forward(dense, x), _forward(_LAYERS[case](dense), x), repeats, measure, row,
                              on_round=on_round)
            else:
                yield compare(case, fwd_bwd(dense, x, dy), fwd_bwd(_LAYERS[case](dense), x, dy), repeats,
                              measure, row, on_round=on_round)


def format_row(r):
    shape = f"{r['tokens']},{r['in_features']},{r['out_features']}"
    ratio = f"{r['ratio']:.3f} of fwd" if r["case"] == "prune" else f"{r['ratio']:.2f}x"
    return (f"{r['case']:<24} {shape:>22} {r['dense_ms']:>10.1f} {r['sparse_ms']:>9.1f} {ratio:>12}  "
            f"{describe_floor(r.get('floor'))}")
