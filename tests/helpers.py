"""Shared test utilities: random block-sparse operands, per-dtype tolerances, gloo workers."""
import contextlib
import gc
import os
import sys

import torch
import torch.distributed as dist

import sparsekern as sk

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def microkernel_paths():
    """pytest params (isa, portable_loops) for every microkernel path this CPU can check: each
    path it runs natively, and the AVX-512 tile geometry on the portable loops where it lacks
    AVX-512F (its SIMD loops then run only on a CPU that has it)."""
    import pytest
    from sparsekern.kernels import microkernel
    paths = [pytest.param((name, False), id=name) for name in microkernel.runnable_isas()]
    if "avx512" not in microkernel.runnable_isas():
        paths.append(pytest.param(("avx512", True), id="avx512-tiles-portable-loops"))
    return paths


@contextlib.contextmanager
def thread_count(threads):
    """Context: torch's intra-op thread count set to ``threads``, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_at_thread_counts(products, threads):
    """``products()`` (a sequence of tensors) gives bitwise the same results on 1 and ``threads`` threads."""
    runs = []
    for t in (1, threads):
        with thread_count(t):
            runs.append(products())
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def on_path(family, path):
    """Context: ``family``'s compiled kernels on ``path`` (from :func:`microkernel_paths`)."""
    import contextlib
    from sparsekern.kernels import microkernel

    @contextlib.contextmanager
    def switched():
        microkernel.set_isa(family, *path)
        try:
            yield path
        finally:
            microkernel.set_isa(family, None)
    return switched()


# bf16 tile engines: name -> (path, what a family with bf16 tile products then reports)
BF16_ENGINES = {"amx": ("amx", "avx512f+amx"), "dot": ("avx512", "avx512f+avx512_bf16")}


def on_bf16_engine(family, name):
    """Generator for a fixture: ``family``'s kernels on bf16 engine ``name``'s path, or a skip
    where the CPU lacks the path or the engine."""
    import pytest
    from sparsekern.kernels import microkernel
    path, reported = BF16_ENGINES[name]
    if path not in microkernel.runnable_isas():
        pytest.skip(f"the {path} path does not run on this CPU")
    with on_path(family, (path, False)):
        if microkernel.microkernel_isa(family) != reported:
            pytest.skip(f"no {name} engine on this CPU (the {path} path reports {microkernel.microkernel_isa(family)})")
        yield


def random_block_mask(grid, density, generator=None, empty_rows=(), empty_cols=()):
    """Bool grid with round(density * cells) blocks, then whole rows/columns cleared."""
    cells = grid[0] * grid[1]
    keep = torch.randperm(cells, generator=generator)[: int(round(density * cells))]
    mask = torch.zeros(cells, dtype=torch.bool)
    mask[keep] = True
    mask = mask.view(grid)
    for r in empty_rows:
        mask[r] = False
    for c in empty_cols:
        mask[:, c] = False
    return mask


def random_bsr(shape, block_size, density, dtype=torch.float64, seed=0, **mask_kwargs):
    g = torch.Generator().manual_seed(seed)
    br, bc = (block_size, block_size) if isinstance(block_size, int) else block_size
    mask = random_block_mask((shape[0] // br, shape[1] // bc), density, g, **mask_kwargs)
    dense = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return sk.BlockSparseMatrix.from_dense(dense, (br, bc), block_mask=mask)


def stored_blocks(dense, layout):
    """The (nnz, br, bc) blocks of a dense (rows, cols) matrix at ``layout``'s stored positions."""
    (rb, cb), (br, bc) = layout.grid, layout.block_size
    return dense.reshape(rb, br, cb, bc).transpose(1, 2)[layout.row_indices, layout.col_indices]


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def output_and_grads(model, x):
    """(model(x), a copy of every parameter's gradient of sum(y²)); gradients are cleared after."""
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y, grads


def every_layer_kind(conv_block_size=4):
    """A small model with one layer of every kind (block-sparse and low-rank conv, block-sparse,
    2:4 static and dynamic, low-rank linear) on (N, 4, H, W) inputs, 5 outputs."""
    return torch.nn.Sequential(
        sk.SparseConv2d(4, 8, 3, block_size=conv_block_size, density=0.5), torch.nn.ReLU(),
        sk.LowRankConv2d(8, 8, 3, rank=3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        sk.SparseLinear(8, 16, block_size=4, density=0.5), torch.nn.ReLU(),
        sk.SemiSparseLinear(16, 16), torch.nn.ReLU(), sk.SemiSparseLinear(16, 16, mode="dynamic"), torch.nn.ReLU(),
        sk.LowRankLinear(16, 5, rank=3))


def run_gloo_worker(rank, world, init_file, body):
    """``body()`` on one rank of a gloo process group, for ``mp.spawn``.

    On success every rank meets at a barrier (no collective is still in flight), and
    the process ends without interpreter finalization: a gloo thread that drops the
    last reference to a tensor while Python shuts down takes the GIL and aborts the
    process (SIGABRT, "terminate called without an active exception"). On an error
    the exception propagates as usual, so ``mp.spawn`` reports it.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body()
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
