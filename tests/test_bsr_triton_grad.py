"""The triton SDD kernel (sampled weight gradient dW = dyᵀ x on stored blocks).

In triton's interpreter on CPU (``interpreter`` fixture: TRITON_INTERPRET=1 and
NaN-filled ``torch.empty``, so a block or partial sum the kernel fails to write
fails the test), against the dense product read on the stored blocks: gathered
tiles of every group size, partly filled groups, sub-tiles of wide blocks, split
token chunks, strided inputs. Also the tile schedule, the autotune space, and the
dense route with its dispatch rule (plain torch). GPU tests are marked ``gpu``.
"""
import dataclasses
import importlib.util

import pytest
import torch

import sparsekern as sk
from helpers import TOLERANCES, random_bsr

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
uses_interpreter = pytest.mark.usefixtures("interpreter")
CUDA = torch.device("cuda")


def _grad():
    from sparsekern.kernels.bsr import triton_grad
    return triton_grad


def _want(dy, x, layout):
    return _grad().dense_grad_weight(dy.double(), x.double(), layout)


def _case(shape, block, density, m, dtype=torch.float32, seed=0, **mask_kwargs):
    weight = random_bsr(shape, block, density, dtype=dtype, seed=seed, **mask_kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, shape[1], generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(m, shape[0], generator=g, dtype=torch.float64).to(dtype)
    return weight.layout, x, dy


def _mask_layout(mask, block):
    br, bc = block
    return sk.BlockSparseMatrix.from_dense(torch.zeros(mask.shape[0] * br, mask.shape[1] * bc), block,
                                           block_mask=mask).layout


# (out, in), block, density, empty block rows, empty block cols
STRUCTURES = {
    "b16-dense-rows": ((64, 160), 16, 0.9, (), ()),
    "b16-half-empty-row": ((64, 96), 16, 0.5, (2,), ()),
    "b32": ((96, 64), 32, 0.7, (), ()),
    "rect16x32": ((48, 96), (16, 32), 0.5, (), ()),
    "rect8x24-subtiles": ((40, 72), (8, 24), 0.4, (), ()),
    "rect32x8": ((64, 48), (32, 8), 0.8, (), (0, 2)),
    "b64-full": ((64, 128), 64, 1.0, (), ()),
}


@uses_interpreter
@pytest.mark.parametrize("m", [1, 19, 100], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("name", STRUCTURES)
def test_matches_dense_fp32(name, m):
    shape, block, density, rows, cols = STRUCTURES[name]
    layout, x, dy = _case(shape, block, density, m, empty_rows=rows, empty_cols=cols)
    got, dbias = _grad().bsr_grad_weight(dy, x, layout, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _want(dy, x, layout), **TOLERANCES[torch.float32])
    torch.testing.assert_close(dbias, dy.sum(0))
    assert _grad().bsr_grad_weight(dy, x, layout)[1] is None


@uses_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["b16-dense-rows", "rect8x24-subtiles"])
def test_matches_dense_half(name, dtype):
    shape, block, density, rows, cols = STRUCTURES[name]
    layout, x, dy = _case(shape, block, density, 23, dtype=dtype, empty_rows=rows, empty_cols=cols)
    got = _grad().bsr_grad_weight(dy, x, layout)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), _want(dy, x, layout), **TOLERANCES[dtype])


@uses_interpreter
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_every_group_size(group):
    """Rows of 11, 0, 1 and 5 blocks: full and partly filled groups of each size."""
    grad = _grad()
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[0, 1:] = True
    mask[2, 7] = True
    mask[3, ::2] = mask[3, 1] = True
    mask[3, 10] = False
    layout = _mask_layout(mask, (16, 16))
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(21, 192, generator=g), torch.randn(21, 64, generator=g)
    got = grad.sdd(x=x, dy=dy, layout=layout, interpret_meta=dict(TR=16, TC=16, GROUP=group, BM=16))
    torch.testing.assert_close(got.double(), _want(dy, x, layout), **TOLERANCES[torch.float32])


@uses_interpreter
def test_wide_blocks_in_subtiles():
    layout, x, dy = _case((64, 96), (32, 48), 0.7, 20)
    got = _grad().sdd(dy, x, layout, interpret_meta=dict(TR=16, TC=16, GROUP=1, BM=16))
    torch.testing.assert_close(got.double(), _want(dy, x, layout), **TOLERANCES[torch.float32])


@uses_interpreter
@pytest.mark.parametrize("strides", ["column-strided", "row-strided"])
def test_strided_inputs(strides):
    """Transposed views (column stride != 1) are made contiguous; row-strided views
    (columns of a wider matrix) are read in place through their row stride."""
    layout, x, dy = _case((64, 96), 16, 0.5, 19)
    if strides == "column-strided":
        xs, dys = x.T.contiguous().T, dy.T.contiguous().T
        assert xs.stride(1) != 1 and dys.stride(1) != 1
    else:
        xs, dys = torch.cat([x, x], 1)[:, :96], torch.cat([dy, dy], 1)[:, 64:]
        assert xs.stride(0) == 192 and dys.stride(0) == 128
    got = _grad().bsr_grad_weight(dys, xs, layout)[0]
    torch.testing.assert_close(got.double(), _want(dy, x, layout), **TOLERANCES[torch.float32])


@uses_interpreter
def test_few_blocks_split_the_tokens():
    """Two blocks, 200 tokens: the interpreter's 4 slots ask for M chunks (fp32 partials)."""
    grad = _grad()
    layout, x, dy = _case((64, 128), 64, 1.0, 200)
    plan = grad.schedule(layout)
    tc, group = grad.group_shape(128, 64, plan.fill)
    assert grad.split_m(200, plan.n_items[grad.GROUPS.index(group)], 4, 16)[0] > 1
    torch.testing.assert_close(grad.bsr_grad_weight(dy, x, layout)[0].double(), _want(dy, x, layout),
                               **TOLERANCES[torch.float32])


@uses_interpreter
def test_no_tokens_and_no_blocks():
    grad = _grad()
    layout, x, dy = _case((32, 48), 16, 0.5, 0)
    assert torch.equal(grad.bsr_grad_weight(dy, x, layout)[0], torch.zeros(layout.nnz_blocks, 16, 16))
    empty, x, dy = _case((32, 48), 16, 0.0, 5)
    assert grad.bsr_grad_weight(dy, x, empty)[0].shape == (0, 16, 16)


class TestSchedule:
    def test_tiles_of_each_group_size(self):
        grad = _grad()
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
        plan = grad.plan(_mask_layout(mask, (16, 16)))
        tiles = {g: plan.items[s, :, :plan.n_items[s]].T.tolist() for s, g in enumerate(grad.GROUPS)}
        assert tiles[1] == [[i, 1] for i in range(8)]
        assert tiles[2] == [[0, 2], [2, 2], [4, 1], [5, 2], [7, 1]]
        assert tiles[4] == [[0, 4], [4, 1], [5, 3]]
        assert tiles[8] == tiles[16] == [[0, 5], [5, 3]]
        assert plan.fill == 4  # 8 blocks in 2 non-empty rows

    def test_cached_per_layout(self):
        grad = _grad()
        layout, _, _ = _case((64, 96), 16, 0.5, 1)
        assert grad.schedule(layout) is grad.schedule(layout)
        other = dataclasses.replace(layout, col_indices=layout.col_indices.flip(0))
        assert grad.schedule(other) is not grad.schedule(layout)

    @pytest.mark.parametrize("corruption", ["column", "row", "offsets"])
    def test_corrupt_layout_raises(self, corruption):
        layout, _, _ = _case((64, 96), 16, 0.5, 1)
        if corruption == "column":
            bad = dataclasses.replace(layout, col_indices=layout.col_indices + layout.grid[1])
        elif corruption == "row":
            bad = dataclasses.replace(layout, row_indices=layout.row_indices - 1)
        else:
            bad = dataclasses.replace(layout, row_offsets=layout.row_offsets.flip(0))
        with pytest.raises(ValueError, match="corrupt block layout"):
            _grad().schedule(bad)


class _Tensor:
    """What the autotuner's prune reads of a tensor argument."""
    def __init__(self, dtype):
        self.dtype = dtype

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.mark.parametrize("block", [(16, 16), (8, 24), (32, 64), (128, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_autotune_space(block, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled-mode (autotuned) kernel
    grad = _grad()
    kernel = grad._kernel(False)
    assert kernel.keys == ["M_BUCKET", "FILL", "BR", "BC"]
    size = _Tensor(dtype).element_size()
    for fill in (1, 4, 16):
        configs = grad._prune(kernel.configs, dict(dy_ptr=_Tensor(dtype), FILL=fill), BR=block[0], BC=block[1])
        assert len(configs) >= 4 and len({str(c) for c in configs}) == len(configs)
        for c in configs:
            tr, tc, group, bm = (c.kwargs[k] for k in ("TR", "TC", "GROUP", "BM"))
            assert 16 <= tr <= max(16, grad.tile(128, block[0])) and tc == grad.tile(tc, block[1])
            assert group in grad.GROUPS and group <= fill and (group == 1 or tc >= block[1])
            assert c.num_stages >= 2 and c.num_stages * bm * (tr + group * tc) * size <= grad.SMEM_BUDGET
        assert max(c.kwargs["GROUP"] for c in configs) == min(fill, 256 // grad.tile(256, block[1]))


class TestDenseRoute:
    def test_decision(self):
        grad = _grad()
        dense, sparse = (_case((256, 256), 16, d, 1)[0] for d in (0.95, 0.3))
        assert grad.use_dense(16384, dense, torch.bfloat16, CUDA)
        assert not grad.use_dense(16384, sparse, torch.bfloat16, CUDA)
        assert not grad.use_dense(256, dense, torch.bfloat16, CUDA)  # few tokens: the dense dW's traffic dominates
        assert not grad.use_dense(16384, dense, torch.bfloat16, torch.device("cpu"))
        assert not grad.use_dense(0, dense, torch.bfloat16, CUDA)
        # With tokens enough to make the traffic negligible, the named threshold decides.
        above, below = (_case((320, 320), 16, grad.DENSE_DW_DENSITY + step, 1)[0] for step in (0.01, -0.01))
        assert grad.use_dense(10**9, above, torch.float32, CUDA)
        assert not grad.use_dense(10**9, below, torch.float32, CUDA)

    def test_crossover_falls_with_tokens(self):
        grad = _grad()
        layouts = [_case((320, 320), 16, d / 20, 1)[0] for d in range(1, 21)]

        def crossover(m):
            return min((lay.density for lay in layouts if grad.use_dense(m, lay, torch.bfloat16, CUDA)), default=None)

        assert crossover(512) is None
        assert 0.75 <= crossover(4096) <= 0.85 and crossover(65536) <= crossover(4096)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_dense_route_matches_reference(self, dtype):
        from sparsekern.kernels.bsr import reference
        layout, x, dy = _case((48, 96), (16, 32), 0.8, 37, dtype=dtype)
        got = _grad().dense_grad_weight(dy, x, layout)
        want = reference.bsr_grad_weight(dy.double(), x.double(), layout)[0]
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [16, 32, 64, 128, (32, 64)], ids=str)
def test_gpu_sdd_and_dense_route(block, dtype, monkeypatch):
    """The autotuned kernel at a sparse layout, the dense route at a dense one, and
    column-strided inputs, against fp64 on the same inputs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grad = _grad()
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    for density, m in [(0.3, 1000), (0.95, 16384)]:
        layout = random_bsr((512, 768), block, density, seed=6).layout.to("cuda")
        x = torch.randn(m, 768, device="cuda", dtype=dtype)
        dy = torch.randn(m, 512, device="cuda", dtype=dtype)
        assert grad.use_dense(m, layout, dtype, x.device) == (density > 0.9)
        for xs, dys in [(x, dy), (x.T.contiguous().T, dy.T.contiguous().T)]:
            got = grad.bsr_grad_weight(dys, xs, layout)[0]
            torch.testing.assert_close(got.double(), _want(dy, x, layout), **tol)
        torch.testing.assert_close(grad.sdd(dy, x, layout).double(), _want(dy, x, layout), **tol)
