"""bench/bench_bsr_triton.py without a GPU: its case list, masks, limit model, JSON rows, and
its refusal to run without CUDA. No kernel runs here."""
import importlib
import json
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(BENCH)
        yield importlib.import_module("bench_bsr_triton")


def test_the_full_sweep_and_the_quick_config(bench):
    full = bench.cases()
    assert len(full) == len(set(full)) == 3 * 3 * 3 * 4 * 2
    assert {c.tokens for c in full} == {4096, 8192, 16384}
    assert {(c.out_features, c.in_features) for c in full} == {(4096, 4096), (4096, 11008), (11008, 4096)}
    assert {c.block for c in full} == {32, 64, 128} and {c.density for c in full} == {0.5, 0.25, 0.1, 0.05}
    assert {c.mask for c in full} == {"uniform", "skewed"}
    assert all(c.out_features % c.block == 0 and c.in_features % c.block == 0 for c in full)
    args = bench.parse_args(["--quick"])
    quick = bench.cases(args.tokens, args.shapes, args.blocks, args.densities, args.masks)
    assert quick == [bench.Case(4096, 4096, 4096, 64, 0.25, "uniform")]
    assert args.dtype == "bf16" and args.rounds == 5


def test_arguments_and_shapes_the_blocks_do_not_tile(bench):
    args = bench.parse_args(["--shapes", "4096x11008", "--tokens", "8192", "--masks", "skewed"])
    assert args.shapes == [(4096, 11008)] and args.tokens == [8192] and args.masks == ["skewed"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "4096by11008"])
    with pytest.raises(ValueError, match="not divisible"):
        bench.cases(shapes=[(4096, 4000)], blocks=[64])


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_masks_hold_the_density_and_are_reproducible(bench, kind):
    grid = (86, 32)
    for density in (0.5, 0.05):
        mask = bench.block_mask(kind, grid, density, seed=1)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == round(density * grid[0] * grid[1])
    assert torch.equal(bench.block_mask(kind, grid, 0.1, seed=2), bench.block_mask(kind, grid, 0.1, seed=2))
    assert int(bench.block_mask(kind, (2, 2), 0.01).sum()) == 1  # at least one block


def test_skewed_rows_follow_a_power_law(bench):
    grid, density = (344, 128), 0.1
    uniform = bench.block_mask("uniform", grid, density).sum(1).double()
    skewed = bench.block_mask("skewed", grid, density).sum(1).double()
    # A few rows hold most blocks (capped at a full row), many hold almost none.
    assert skewed.max() > 4 * uniform.max() and skewed.max() <= grid[1]
    assert (skewed == 0).sum() > (uniform == 0).sum()
    assert skewed.std() > 3 * uniform.std()


def test_unknown_mask_kind(bench):
    with pytest.raises(ValueError, match="unknown mask kind"):
        bench.block_mask("banded", (4, 4), 0.5)


def test_bytes_count_touched_rows_and_columns_once(bench):
    case = bench.Case(tokens=10, out_features=8, in_features=12, block=4, density=0.5, mask="uniform")
    mask = torch.tensor([[True, False, False], [True, True, False]])  # block column 2 unused
    stored = 3 * (16 * 2 + 8)
    nbytes = bench.product_bytes(case, mask, element_bytes=2)
    assert nbytes["fwd"] == 2 * (10 * 8 + 10 * 8) + stored    # X columns of 2 block columns, all of Y
    assert nbytes["dx"] == 2 * (10 * 8 + 10 * 12) + stored    # dY columns of both block rows, all of dX
    assert nbytes["dw"] == 2 * (10 * 8 + 10 * 8) + stored     # the dY and X columns blocks touch


def test_the_limit_is_the_slower_of_compute_and_bandwidth(bench):
    dense_ms = {"fwd": 1.0, "dx": 1.0, "dw": 2.0}
    nbytes = {"fwd": 1e9, "dx": 1e6, "dw": 1e6}  # 1 GB at 1000 GB/s: 1 ms; 1 MB: 0.001 ms
    limit = bench.limits(dense_ms, density=0.25, nbytes=nbytes, bandwidth_gbs=1000.0)
    assert limit["fwd"] == pytest.approx((1.0, "memory"))
    assert limit["dx"] == pytest.approx((0.25, "compute")) and limit["dw"] == pytest.approx((0.5, "compute"))
    assert limit["step"][0] == pytest.approx(1.75)
    pct = bench.pct_of_limit(limit, {"fwd": 2.0, "dx": 0.25, "dw": 1.0, "step": 3.25})
    assert pct == pytest.approx({"fwd": 0.5, "dx": 1.0, "dw": 0.5, "step": 1.75 / 3.25})


def test_rows_are_json_lines_with_the_device(bench, tmp_path, capsys):
    from timing import environment
    path = tmp_path / "results" / "rows.jsonl"
    rows = [dict(environment(torch.device("cpu")), bench="bsr_triton", tokens=4096, pct_limit_step=0.5,
                 torch_errors={"torch_bsr_fwd_tuned": "missing"})]
    bench.write_rows(rows, str(path))
    bench.write_rows(rows, str(path))  # appends
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) == rows[0] for line in lines)
    assert json.loads(lines[0])["device"]
    assert json.dumps(rows[0]) in capsys.readouterr().out
    bench.write_rows(rows, "")  # printed only


def test_refuses_to_run_without_cuda(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--quick"])


def test_missing_torch_apis_are_reported_not_raised(bench, monkeypatch):
    from torch.sparse import _triton_ops
    monkeypatch.setattr(_triton_ops, "sampled_addmm", None, raising=False)
    ops, reason = bench._torch_triton_ops()
    assert ops is None and "sampled_addmm" in reason
    fns, errors = bench.torch_baselines(None, 64, None, None, tune=True)
    assert fns == {} and set(errors) == {"torch_bsr_fwd", "torch_bsr_dx", "torch_sampled_dw",
                                         "torch_bsr_fwd_tuned", "torch_bsr_dx_tuned"}
