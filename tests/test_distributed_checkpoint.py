"""Distributed checkpoints (``sparsekern.methods.distributed_checkpoint``, torch DCP) of sparse training.

RigL on a model with SparseConv2d, SparseLinear and SemiSparseLinear layers
(Adam), Top-KAST (SGD with momentum; shadow blocks in the driver's state) and
DLRT (Adam) on low-rank layers; after 4 steps the
structure (stored blocks, ranks) differs from a freshly built model's. Saved on
2 FSDP2 ranks and resumed on 2: bit-exact against the straight run. Saved on 2
and loaded in one process, saved in one process and loaded on 2: the model
state is exactly the saved one, and training goes on.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import sparsekern as sk
from helpers import run_gloo_worker
from sparsekern.methods import DLRT, RigL, TopKAST
from sparsekern.methods.distributed import gathered, structure_step
from sparsekern.methods.distributed_checkpoint import adopt_structure, load, save, structure_of

CASES = ("RigL", "TopKAST", "DLRT")
STEPS, SAVE_AT = 8, 4


def shard(model):
    for layer in model:
        if any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer)
    return fully_shard(model)


def build(case, sharded):
    """(model, optimizer, driver) as a run starts; FSDP2-sharded if ``sharded``."""
    torch.manual_seed(0)
    if case == "DLRT":
        model = torch.nn.Sequential(sk.LowRankConv2d(4, 8, 3, rank=4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    sk.LowRankLinear(8, 16, rank=6), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        return shard(model) if sharded else model, None, DLRT(model, lr=0.2, tol=0.15, rmin=2, optimizer="adam")
    if case == "TopKAST":  # shadow blocks and their optimizer in the driver's state
        model = torch.nn.Sequential(torch.nn.Flatten(), sk.SparseLinear(144, 16, block_size=4), torch.nn.ReLU(),
                                    sk.SparseLinear(16, 5, block_size=4))
        if sharded:
            shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with gathered(model, opt):
            driver = TopKAST(model, opt, density=0.4, delta=2, t_end=7, seed=123)
        return model, opt, driver
    model = torch.nn.Sequential(sk.SparseConv2d(4, 8, 3, block_size=2), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                sk.SparseLinear(8, 16, block_size=4), torch.nn.ReLU(),
                                sk.SemiSparseLinear(16, 16), torch.nn.ReLU(), sk.SparseLinear(16, 5, block_size=4))
    if sharded:
        shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gathered(model, opt):  # the driver's initial masks change shapes
        driver = RigL(model, opt, density=0.4, delta=2, t_end=7, seed=123)
    return model, opt, driver


def train(case, model, opt, driver, steps, rank=None):
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 4, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        if rank is not None:
            x, y = x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]
        if opt is not None:
            opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()
        structure_step(driver, model, opt)
        if case == "DLRT":
            driver.zero_grad()


def full_state(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, root):
    run_gloo_worker(rank, world, init_file, lambda: _run(rank, root))


def _run(rank, root):
    out = {}
    for case in CASES:
        model, opt, driver = build(case, sharded=True)
        train(case, model, opt, driver, range(STEPS), rank)
        out[f"{case}-straight"] = full_state(model)
        model, opt, driver = build(case, sharded=True)
        train(case, model, opt, driver, range(SAVE_AT), rank)
        save(os.path.join(root, f"{case}-2"), model, opt, driver)
        out[f"{case}-saved"] = full_state(model)
        model, opt, driver = build(case, sharded=True)
        load(os.path.join(root, f"{case}-2"), model, opt, driver)
        train(case, model, opt, driver, range(SAVE_AT, STEPS), rank)
        out[f"{case}-resumed"] = full_state(model)
        model, opt, driver = build(case, sharded=True)  # 1 -> 2
        load(os.path.join(root, f"{case}-1"), model, opt, driver)
        out[f"{case}-from-1"] = full_state(model)
        train(case, model, opt, driver, range(SAVE_AT, STEPS), rank)
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    single = {}
    for case in CASES:  # one process, no process group: the 1 -> 2 checkpoints
        model, opt, driver = build(case, sharded=False)
        train(case, model, opt, driver, range(SAVE_AT))
        save(str(root / f"{case}-1"), model, opt, driver)
        single[case] = full_state(model)
    mp.spawn(_worker, args=(2, str(root / "init"), str(root)), nprocs=2, join=True)
    return root, single, [torch.load(root / f"rank{r}.pt") for r in (0, 1)]


def _equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


@pytest.mark.parametrize("case", CASES)
def test_resume_on_the_same_world_size_is_bit_exact(runs, case):
    _, _, ranks = runs
    for r in ranks:
        _equal(r[f"{case}-resumed"], r[f"{case}-straight"], case)
    _equal(ranks[0][f"{case}-resumed"], ranks[1][f"{case}-resumed"], case)
    fresh = full_state(build(case, sharded=False)[0])
    structural = [k for k in fresh if k.endswith(("block_mask", "indices", ".S"))]
    saved = ranks[0][f"{case}-saved"]
    assert any(fresh[k].shape != saved[k].shape or not torch.equal(fresh[k], saved[k]) for k in structural)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_to_one(runs, case):
    root, _, ranks = runs
    model, opt, driver = build(case, sharded=False)
    load(str(root / f"{case}-2"), model, opt, driver)
    _equal(full_state(model), ranks[0][f"{case}-saved"], case)
    assert (driver.steps if case == "DLRT" else driver.t) == SAVE_AT
    train(case, model, opt, driver, range(SAVE_AT, STEPS))  # goes on, through structure changes


@pytest.mark.parametrize("case", CASES)
def test_one_rank_to_two(runs, case):
    _, single, ranks = runs
    for r in ranks:
        _equal(r[f"{case}-from-1"], single[case], case)


def test_a_structure_that_does_not_fit_the_model_is_refused():
    model = build("RigL", sharded=False)[0]
    structure = structure_of(model)
    with pytest.raises(ValueError, match="layers the model does not have: \\['9'\\]"):
        adopt_structure(model, {**structure, "9": structure["4"]})
    with pytest.raises(ValueError, match="4: saved block grid \\(2, 2\\), the layer has \\(4, 2\\)"):
        adopt_structure(model, {**structure, "4": ("blocks", torch.ones(2, 2, dtype=torch.bool))})
