"""DDP with every sparse layer kind and every driver: 2 gloo processes on CPU take identical decisions.

Each rank sees different data; scores are all-reduced by the driver, random
choices come from identically seeded generators, and the DDP wrapper is rebuilt
whenever ``step()`` reports a structure change (parameter shapes changed), or
when DLRT changes a rank (new factor Parameters). Static models with every
layer kind match the single-process run on the whole batch.
"""
import os

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern as sk
from helpers import every_layer_kind, run_gloo_worker
from sparsekern.methods import DLRT, DPF, GGR, SET, SNFS, RigL, TopKAST

DRIVERS = {"SET": SET, "RigL": RigL, "SNFS": SNFS, "GGR": GGR, "TopKAST": TopKAST, "DPF": DPF}
# a SemiSparseLinear layer besides a SparseLinear one
SEMI_DRIVERS = {"SET-2:4": SET, "RigL-2:4": RigL, "SNFS-2:4": SNFS, "GGR-2:4": GGR}
# SparseConv2d layers and a SparseLinear head
CNN_DRIVERS = {"SET-cnn": SET, "RigL-cnn": RigL, "SNFS-cnn": SNFS, "GGR-cnn": GGR, "TopKAST-cnn": TopKAST,
               "DPF-cnn": DPF}
OPTIONS = {"RigL-gram": (RigL, {"score_method": "gram"}), "GGR-gram": (GGR, {"score_method": "gram"})}
CASES = {**{n: (c, {}) for n, c in {**DRIVERS, **SEMI_DRIVERS, **CNN_DRIVERS}.items()}, **OPTIONS}


def _model(name):
    if name in CNN_DRIVERS:
        return torch.nn.Sequential(sk.SparseConv2d(4, 8, 3, block_size=4), torch.nn.ReLU(),
                                   sk.SparseConv2d(8, 8, 3, padding=1, stride=2, block_size=4), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), sk.SparseLinear(8, 5, block_size=4))
    first = sk.SemiSparseLinear(12, 16) if name in SEMI_DRIVERS else sk.SparseLinear(12, 16, block_size=4)
    return torch.nn.Sequential(first, torch.nn.ReLU(), sk.SparseLinear(16, 5, block_size=4))


def _inputs(name, generator):
    shape = (16, 4, 6, 6) if name in CNN_DRIVERS else (16, 12)
    return torch.randn(*shape, generator=generator)


def _dlrt_model():
    return torch.nn.Sequential(sk.LowRankConv2d(4, 8, 3, rank=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               sk.LowRankLinear(8, 16, rank=6), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _halves(rank, generator):
    """A batch of 8 (the same on every rank) and this rank's half of it."""
    x, y = torch.randn(8, 4, 6, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    return (x, y), (x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])


def _static(rank):
    """DDP on half batches against one process on the whole batch, Adam, 3 steps."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(every_layer_kind(conv_block_size=2))
    reference, model = models
    ddp = DDP(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        whole, half = _halves(rank, g)
        for m, opt, (x, y) in ((reference, opts[0], whole), (ddp, opts[1], half)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return {"reference": reference.state_dict(), "ddp": model.state_dict()}


def _dlrt(rank):
    """DLRT (Adam) on half batches; DDP re-wrapped whenever a rank changes."""
    torch.manual_seed(0)
    model = _dlrt_model()
    dlrt = DLRT(model, lr=0.2, tol=0.15, rmin=2, optimizer="adam")
    ddp, g, ranks, rebuilds = DDP(model), torch.Generator().manual_seed(7), [], 0
    for _ in range(7):
        _, (x, y) = _halves(rank, g)
        F.cross_entropy(ddp(x), y).backward()
        before = dlrt.ranks()
        dlrt.step()
        dlrt.zero_grad()
        if dlrt.ranks() != before:
            ddp, rebuilds = DDP(model, init_sync=False), rebuilds + 1
        ranks.append(dlrt.ranks())
    return {"ranks": ranks, "rebuilds": rebuilds, "state": model.state_dict()}


def _worker(rank, world, init_file, out_dir):
    run_gloo_worker(rank, world, init_file, lambda: _run(rank, out_dir))


def _run(rank, out_dir):
    results = {"static": _static(rank), "DLRT": _dlrt(rank)}
    for name, (cls, options) in CASES.items():
        torch.manual_seed(0)
        model = _model(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dst = cls(model, opt, density=0.4, delta=2, t_end=8, seed=123, **options)
        ddp = DDP(model)
        g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        rebuilds = 0
        for _ in range(9):
            x, y = _inputs(name, g), torch.randint(0, 5, (16,), generator=g)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            if dst.step():  # the ranks agree already: no broadcast of the new parameters needed
                ddp = DDP(model, init_sync=False)
                rebuilds += 1
        results[name] = {"masks": [layer.block_mask.clone() for _, layer in dst.layers] +
                                  [layer.mask for _, layer in dst.semi_layers],
                         "values": [layer.values.detach().clone() for _, layer in dst.layers + dst.semi_layers],
                         "rebuilds": rebuilds}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_take_identical_decisions(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):  # every layer kind, static: the single-process run on the whole batch
        for key, value in r["static"]["reference"].items():
            torch.testing.assert_close(r["static"]["ddp"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert r0["DLRT"]["ranks"] == r1["DLRT"]["ranks"]
    assert r0["DLRT"]["rebuilds"] > 0  # the ranks did change
    for key, value in r0["DLRT"]["state"].items():
        assert torch.equal(value, r1["DLRT"]["state"][key]), key
    for name in CASES:
        assert r0[name]["rebuilds"] == 3, name  # updates at steps 2, 4, 6
        for a, b in zip(r0[name]["masks"], r1[name]["masks"]):
            assert torch.equal(a, b), name
        for a, b in zip(r0[name]["values"], r1[name]["values"]):
            assert torch.equal(a, b), name
