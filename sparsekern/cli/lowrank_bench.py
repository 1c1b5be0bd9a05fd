"""The low-rank linear microbenchmark (``sparsekern bench --product lowrank`` and
bench/bench_lowrank_linear.py): LowRankLinear vs dense nn.Linear, timed alternately.

Cases (ratio = median over rounds of dense_ms / lowrank_ms for the pair timed back to back;
``balanced``: a low-rank sample is the mean of the back-to-back calls that fill about one dense
call's wall time, fields ``*_calls_per_sample``):

* ``fwd+bwd``: ``nn.Linear`` vs ``LowRankLinear`` (x requires grad, bias on), y = layer(x);
  y.backward(dy).
* ``unfused``: the same low-rank layer as two plain torch GEMMs through autograd,
  F.linear(F.linear(x, Vᵀ), U S, b): what the fused op adds.
* ``step``: dense fwd+bwd + ``torch.optim.SGD.step`` vs ``LowRankLinear`` fwd+bwd +
  ``DLRT.step`` (K/L/S updates, the new directions' factorizations, SVD of the 2r x 2r matrix,
  truncation), with tol=0 and rmax=r so the rank stays r and every step does the full work.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..methods import DLRT
from ..nn import LowRankLinear
from .timing import compare, describe_floor, fwd_bwd

CASES = ("fwd+bwd", "unfused", "step")
HEADER = f"{'case':<16} {'rank':>5} {'dense ms':>10} {'lowrank ms':>11} {'ratio':>7}  floor rule"


def _unfused(layer, x, dy):
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        F.linear(F.linear(x, layer.V.T), layer.U @ layer.S, layer.bias).backward(dy)
    return run


def _dense_step(layer, x, dy, lr):
    opt = torch.optim.SGD(layer.parameters(), lr=lr)

    def run():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
        opt.step()
    return run


def dlrt_step(layer, x, dy, lr, rank):
    """A callable: one DLRT training step of ``layer`` at fixed rank."""
    dlrt = DLRT(layer, lr, tol=0.0, rmax=rank)

    def run():
        dlrt.zero_grad()
        x.grad = None
        layer(x).backward(dy)
        dlrt.step()
    return run


def run_cases(tokens, in_features, out_features, ranks, repeats, dtype, device, cases, measure, context,
              balanced=False, on_case=None, on_round=None):
    """Yield one row per (rank, case); ``on_case(index, count, name)`` before each."""
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    x = torch.randn(tokens, in_features, **factory, requires_grad=True)
    dy = torch.randn(tokens, out_features, **factory)
    dense = nn.Linear(in_features, out_features, **factory)
    base = dict(context, dtype=str(dtype).replace("torch.", ""), tokens=tokens, in_features=in_features,
                out_features=out_features)
    timing = dict(sparse_key="lowrank_ms", balanced=balanced, on_round=on_round)
    for r, rank in enumerate(ranks):
        row = dict(base, rank=rank, params_vs_dense=rank * (in_features + out_features + rank)
                   / (in_features * out_features))
        layer = LowRankLinear(in_features, out_features, rank, **factory)
        pairs = {
            "fwd+bwd": lambda: (fwd_bwd(dense, x, dy), fwd_bwd(layer, x, dy)),
            "unfused": lambda: (fwd_bwd(dense, x, dy), _unfused(layer, x, dy)),
            # Tiny lr: the factors stay well-scaled however many steps are timed.
            "step": lambda: (_dense_step(dense, x, dy, 1e-6), dlrt_step(layer, x, dy, 1e-6, rank)),
        }
        for c, case in enumerate(cases):
            if on_case is not None:
                on_case(r * len(cases) + c, len(ranks) * len(cases), f"{case} rank {rank}")
            yield compare("fwd+bwd unfused" if case == "unfused" else case, *pairs[case](), repeats, measure,
                          row, **timing)
        layer.kl_grads = False


def format_row(r):
    return (f"{r['case']:<16} {r['rank']:>5} {r['dense_ms']:>10.1f} {r['lowrank_ms']:>11.1f} {r['ratio']:>6.2f}x  "
            f"{describe_floor(r.get('floor'))}")
