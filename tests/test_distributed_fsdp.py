"""FSDP2 (``fully_shard``) on every sparse layer kind, with 2 gloo processes on CPU.

Static models: forward, backward and Adam steps on the sharded model match the
single-process run on the whole batch. Structure changes (SET, RigL, SNFS, GGR
on conv, linear and 2:4 layers; Top-KAST and DPF on conv and linear layers; DLRT rank
changes) go through ``sparsekern.methods.distributed.structure_step``: both ranks
end with identical structures, and the sharded run takes the decisions of the
same run under DDP (the driver's averaged scores are the same in both). What
the mechanism cannot take (ranks that disagree, a layer left without blocks,
mixed precision with probes) raises a clear error on every rank.
"""
import os
import warnings

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern as sk
from sparsekern.methods import DLRT, DPF, GGR, SET, SNFS, RigL, TopKAST
from helpers import every_layer_kind, run_gloo_worker
from sparsekern.methods.distributed import fsdp_params, gathered, structure_step

STEPS = 7


def dst_model():
    return torch.nn.Sequential(sk.SparseConv2d(4, 8, 3, block_size=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               sk.SparseLinear(8, 16, block_size=4), torch.nn.ReLU(),
                               sk.SemiSparseLinear(16, 16), torch.nn.ReLU(), sk.SparseLinear(16, 5, block_size=4))


def shadow_model():
    """For the drivers with shadow blocks (Top-KAST, DPF), which have no 2:4 variant."""
    return torch.nn.Sequential(sk.SparseConv2d(4, 8, 3, block_size=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               sk.SparseLinear(8, 16, block_size=4), torch.nn.ReLU(), sk.SparseLinear(16, 5, block_size=4))


DRIVERS = {"SET": (SET, dst_model), "RigL": (RigL, dst_model), "SNFS": (SNFS, dst_model),
           "GGR": (GGR, dst_model), "TopKAST": (TopKAST, shadow_model), "DPF": (DPF, shadow_model),
           "GGR-root": (GGR, dst_model)}  # fully_shard on the root only: one group, partly gathered


def dlrt_model():
    return torch.nn.Sequential(sk.LowRankConv2d(4, 8, 3, rank=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               sk.LowRankLinear(8, 16, rank=6), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def shard(model):
    for layer in model:
        if any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer)
    return fully_shard(model)


def batch(step, rank=None):
    """The step's whole batch of 8, or the rank's half of it."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 4, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    return (x, y) if rank is None else (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])


def full_state(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def run_static(rank):
    torch.manual_seed(0)
    reference = every_layer_kind()
    torch.manual_seed(0)
    model = shard(every_layer_kind())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, model)]
    views, grads = [], []
    for step in range(3):
        for m, opt, (x, y) in ((reference, opts[0], batch(step)), (model, opts[1], batch(step, rank))):
            opt.zero_grad()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                F.cross_entropy(m(x), y).backward()
            views += [str(w.message) for w in caught if "view tensor" in str(w.message) and m is model]
            if step == 0:  # the gradients themselves, before any optimizer step
                grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                              for n, p in m.named_parameters()})
            opt.step()
    return {"reference": full_state(reference), "sharded": full_state(model), "views": views,
            "grads": grads}


def run_dst(rank, name, engine):
    cls, build = DRIVERS[name]
    torch.manual_seed(0)
    model = build()
    if engine == "fsdp":
        fully_shard(model) if name.endswith("-root") else shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with gathered(model, opt):  # the initial ERK masks change shapes too
            dst = cls(model, opt, density=0.4, delta=2, t_end=8, seed=123)
        wrapped = model
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dst = cls(model, opt, density=0.4, delta=2, t_end=8, seed=123)
        wrapped = DDP(model)
    for step in range(STEPS):
        x, y = batch(step, rank)
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
        if engine == "fsdp":
            structure_step(dst, model, opt)
        elif dst.step():
            wrapped = DDP(model)
    state = full_state(model)
    moments = {}
    for _, layer in dst.layers + dst.semi_layers:
        buf = opt.state[layer.values]["momentum_buffer"]
        moments[len(moments)] = (buf.full_tensor() if hasattr(buf, "full_tensor") else buf).clone()
    sharded = all(isinstance(layer.values, DTensor) for _, layer in dst.layers + dst.semi_layers)
    return {"state": state, "moments": moments, "sharded": sharded or engine == "ddp"}


def run_dlrt(rank, engine):
    torch.manual_seed(0)
    model = dlrt_model()
    dlrt = DLRT(model, lr=0.2, tol=0.15, rmin=2, optimizer="adam")
    wrapped = shard(model) if engine == "fsdp" else DDP(model)
    ranks = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        F.cross_entropy(wrapped(x), y).backward()
        if engine == "fsdp":
            structure_step(dlrt, model)
        else:
            before = dlrt.ranks()
            dlrt.step()
            if dlrt.ranks() != before:  # new factor Parameters: re-wrap
                wrapped = DDP(model)
        dlrt.zero_grad()
        ranks.append(dlrt.ranks())
    return {"state": full_state(model), "ranks": ranks, "sharded": len(fsdp_params(model))}


def run_errors(rank):
    """Structure changes FSDP2 cannot take give clear errors, on every rank."""
    messages = []
    for bad in ("disagree", "empty"):
        torch.manual_seed(0)
        model = shard(dst_model())
        layer = model[4]
        try:
            with gathered(model):
                mask = torch.zeros_like(layer.block_mask)
                if bad == "disagree":
                    mask[0, rank] = True  # a different block on each rank
                layer.restructure(mask)
        except RuntimeError as exc:
            messages.append(str(exc))
    torch.manual_seed(0)
    model = dst_model()
    for layer in model:
        if any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gathered(model, opt):
        dst = GGR(model, opt, density=0.4, delta=2, t_end=8)
    try:
        structure_step(dst, model, opt)
    except NotImplementedError as exc:
        messages.append(str(exc))
    return messages


def _worker(rank, world, init_file, out_dir):
    run_gloo_worker(rank, world, init_file, lambda: _run(rank, out_dir))


def _run(rank, out_dir):
    results = {"static": run_static(rank), "errors": run_errors(rank)}
    for name in DRIVERS:
        for engine in ("fsdp", "ddp"):
            results[f"{name}-{engine}"] = run_dst(rank, name, engine)
    for engine in ("fsdp", "ddp"):
        results[f"DLRT-{engine}"] = run_dlrt(rank, engine)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _close(a, b, name):
    assert a.keys() == b.keys(), name
    for key in a:
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        else:
            assert torch.equal(a[key], b[key]), f"{name} {key}"


def _equal(a, b, name):
    assert a.keys() == b.keys(), name
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name} {key}"


@torch.no_grad()
def test_fsdp2_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # Static: every layer kind sharded gives the single-process run on the whole batch.
    for r in (r0, r1):
        _close(r["static"]["grads"][1], r["static"]["grads"][0], "static gradients")
        _close(r["static"]["sharded"], r["static"]["reference"], "static")
        assert not r["static"]["views"]
    # Structure changes: identical on both ranks, and the decisions DDP takes.
    for name in DRIVERS:
        assert r0[f"{name}-fsdp"]["sharded"]  # re-sharded after every change
        _equal(r0[f"{name}-fsdp"]["state"], r1[f"{name}-fsdp"]["state"], f"{name} ranks")
        _close(r0[f"{name}-fsdp"]["state"], r0[f"{name}-ddp"]["state"], f"{name} fsdp/ddp")
        _close(r0[f"{name}-fsdp"]["moments"], r0[f"{name}-ddp"]["moments"], f"{name} momentum")
    counts = {name: [int(r0[f"{name}-fsdp"]["state"][f"{i}.block_mask"].sum()) for i in (0, 4, 8)]
              for name in ("RigL", "GGR")}
    assert counts["GGR"] != counts["RigL"]  # GGR moved blocks between layers: nnz changed under FSDP
    for r in (r0, r1):
        disagree, empty, precision = r["errors"]
        assert "MixedPrecisionPolicy runs its layers in torch.bfloat16" in precision
        assert "ranks disagree on the new structure of 4.values" in disagree
        assert "4.values has no element left" in empty
    assert r0["DLRT-fsdp"]["sharded"] > 0
    assert r0["DLRT-fsdp"]["ranks"] == r1["DLRT-fsdp"]["ranks"] == r0["DLRT-ddp"]["ranks"]
    assert len({tuple(r) for r in r0["DLRT-fsdp"]["ranks"]}) > 1  # the ranks did change
    _equal(r0["DLRT-fsdp"]["state"], r1["DLRT-fsdp"]["state"], "DLRT ranks")
    _close(r0["DLRT-fsdp"]["state"], r0["DLRT-ddp"]["state"], "DLRT fsdp/ddp")
