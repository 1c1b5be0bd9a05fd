"""The DST drivers and DLRT on a torch.compile'd model: the same masks (ranks) and losses as eager,
and a bounded number of compiled graphs however the structure changes.

Parameters have static shapes under dynamo unless ``force_parameter_static_shapes`` is off, so a
driver that changes a layer's number of stored blocks (SNFS, GGR, DPF) runs with it off
(docs/methods_dst.md, "Compiled training"). The graphs are counted by a backend that wraps
aot_eager (inductor once, slow).
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import methods


@pytest.fixture(autouse=True)
def dynamic_parameters():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(force_parameter_static_shapes=False):
        yield
    torch._dynamo.reset()


class Counting:
    """A torch.compile backend that counts the graphs it compiles."""

    def __init__(self, backend="aot_eager"):
        self.graphs, self.backend = 0, backend

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return sk.sparsify(model, density=0.3, block_size=8)  # 10 outputs: a padded edge block row


def _train(driver, steps, compile_with=None, delta=2, t_end=1000, **options):
    """Losses and per-update stored-block counts of ``steps`` SGD steps; the final masks."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = getattr(methods, driver)(model, opt, density=0.3, delta=delta, alpha=0.4, t_end=t_end, seed=0,
                                      **options)
    forward = model if compile_with is None else torch.compile(model, backend=compile_with)
    data = torch.Generator().manual_seed(1)
    losses, nnz = [], []
    for _ in range(steps):
        x, y = torch.randn(6, 24, generator=data), torch.randint(0, 10, (6,), generator=data)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        if dst.step():
            nnz.append(tuple(layer.nnz_blocks for _, layer in dst.layers))
        losses.append(loss.item())
    return torch.tensor(losses), nnz, [layer.block_mask.clone() for _, layer in dst.layers]


def _check_matches_eager(driver, steps=12, **options):
    counting = Counting()
    got = _train(driver, steps, counting, **options)
    want = _train(driver, steps, **options)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1] == want[1]
    for mask, expected in zip(got[2], want[2]):
        assert torch.equal(mask, expected)
    return counting.graphs, got[1]


# Graphs: one without and one with a probe (installed the step before each update); the numbers
# of stored blocks are symbols in both.
@pytest.mark.parametrize("driver, options, most", [
    ("SET", {}, 1),                            # no probe
    ("RigL", {"score_method": "gram"}, 2),     # eager takes the Gram route, compiled the product
    ("SNFS", {}, 2),
    ("GGR", {"score_method": "auto"}, 2),
    ("TopKAST", {}, 1),                        # a probe at every step
    ("DPF", {"t_end": 13}, 1),                 # a probe at every step; dense down to 0.3 by step 12
])
def test_driver_on_compiled_model_matches_eager(driver, options, most):
    graphs, nnz = _check_matches_eager(driver, **options)
    assert len(nnz) == 6
    assert graphs <= most


def test_changing_block_counts_compile_a_bounded_number_of_graphs():
    counting = Counting()
    _, nnz, _ = _train("GGR", 20, counting, delta=1)
    assert len(nnz) == 20 and len(set(nnz)) > 5  # the layers' block counts kept changing
    assert counting.graphs <= 2


def test_set_block_mask_does_not_recompile_per_change():
    torch.manual_seed(0)
    layer = sk.SparseLinear(24, 40, block_size=8, density=0.5)
    counting = Counting()
    forward = torch.compile(layer, backend=counting)
    x = torch.randn(5, 24)
    for cells in (8, 4, 10, 10, 6, 6, 12, 3):  # repeated counts: new layouts of a count already symbolic
        mask = torch.zeros(15, dtype=torch.bool)
        mask[torch.randperm(15)[:cells]] = True
        layer.set_block_mask(mask.view(5, 3))
        torch.testing.assert_close(forward(x), layer(x))
    assert counting.graphs <= 2


def _compiled_against_eager(build, driver, options, input_shape, steps):
    """Train ``build()`` (model, driver density) with ``driver`` eager and compiled (fullgraph, graphs
    counted) on the same batches: (graphs, both runs' final structures); the losses must agree."""
    def train(compile_with=None):
        torch.manual_seed(0)
        model, density = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dst = getattr(methods, driver)(model, opt, density=density, **{"delta": 2, "t_end": 1000, "seed": 0,
                                                                        **options})
        forward = model if compile_with is None else torch.compile(model, backend=compile_with, fullgraph=True)
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x, y = torch.randn(*input_shape, generator=data), torch.randint(0, 10, (input_shape[0],), generator=data)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            dst.step()
            losses.append(loss.item())
        structure = [getattr(m, "block_mask", getattr(m, "indices", None)) for m in model.modules()]
        return torch.tensor(losses), [t.clone() for t in structure if t is not None]

    counting = Counting()
    losses, structure = train(counting)
    want_losses, want_structure = train()
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert len(structure) == len(want_structure)
    assert all(torch.equal(a, b) for a, b in zip(structure, want_structure))
    return counting.graphs, structure


@pytest.mark.parametrize("driver, options", [
    ("SET", {}), ("RigL", {}), ("SNFS", {}), ("GGR", {}), ("TopKAST", {}), ("DPF", {"t_end": 11}),
])
def test_driver_on_compiled_conv_model_matches_eager_in_one_graph_per_variant(driver, options):
    # The conv probe is an input of the traced conv op, like the linear one: fullgraph holds
    # (no hook breaks the graph) and the graphs are those of the linear model.
    def build():
        return sk.sparsify(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(16 * 4, 10)), density=0.3, block_size=4), 0.3
    graphs, _ = _compiled_against_eager(build, driver, options, (4, 8, 4, 4), 12)
    assert graphs <= 2


@pytest.mark.parametrize("driver", ["SET", "RigL", "SNFS", "GGR"])
def test_driver_with_a_2to4_layer_on_compiled_model_matches_eager(driver):
    # The 2:4 probe (dYᵀX on the complement of the mask) is an input of the traced 2:4 op too.
    def build():
        return nn.Sequential(sk.SemiSparseLinear(24, 32), nn.ReLU(), sk.SparseLinear(32, 10, block_size=8)), 0.5
    graphs, structure = _compiled_against_eager(build, driver, {}, (6, 24), 9)
    assert not torch.equal(structure[0], _initial_2to4_indices())  # the 2:4 mask did change
    assert graphs <= 4


def _initial_2to4_indices():
    torch.manual_seed(0)
    return sk.SemiSparseLinear(24, 32).indices


def _train_dlrt(steps, compile_with=None):
    torch.manual_seed(0)
    model = nn.Sequential(sk.LowRankLinear(24, 32, rank=8), nn.ReLU(), sk.LowRankLinear(32, 10, rank=6))
    dlrt = methods.DLRT(model, lr=0.1, tol=0.5)
    forward = model if compile_with is None else torch.compile(model, backend=compile_with)
    data = torch.Generator().manual_seed(1)
    losses, ranks = [], []
    for _ in range(steps):
        x, y = torch.randn(6, 24, generator=data), torch.randint(0, 10, (6,), generator=data)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        dlrt.step()
        dlrt.zero_grad()
        losses.append(loss.item())
        ranks.append(tuple(layer.rank for layer in dlrt.layers))
    return torch.tensor(losses), ranks


def test_dlrt_on_compiled_model_matches_eager():
    # Each rank change replaces the factor Parameters; automatic dynamic shapes make the ranks
    # symbols at the first change.
    counting = Counting()
    losses, ranks = _train_dlrt(8, counting)
    want_losses, want_ranks = _train_dlrt(8)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert ranks == want_ranks and len(set(ranks)) > 2
    assert counting.graphs <= 2


@pytest.mark.slow
def test_ggr_under_inductor_matches_eager():
    counting = Counting("inductor")
    got = _train("GGR", 7, counting)
    want = _train("GGR", 7)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for mask, expected in zip(got[2], want[2]):
        assert torch.equal(mask, expected)
    assert counting.graphs <= 2
