"""The triton backend of the block-sparse products.

On CPU the kernels run in triton's interpreter (TRITON_INTERPRET=1, set per test
by the ``interpreter`` fixture so other test modules keep their backend lists),
at small shapes, against the dense masked computation with the tolerances every
backend uses. There every buffer ``torch.empty`` hands out is NaN-filled, so a
block (or partial sum) a kernel fails to write fails the test. GPU tests
(autotuned kernels) are marked ``gpu``.
"""
import dataclasses
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import sparsekern as sk
from helpers import TOLERANCES, random_bsr, stored_blocks
from sparsekern.kernels.bsr import reference

# triton itself is imported lazily (inside tests), like the package does: the kernels
# must work in the interpreter whether or not triton was imported before the env var.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CPU = torch.device("cpu")
TESTS = pathlib.Path(__file__).resolve().parent


uses_interpreter = pytest.mark.usefixtures("interpreter")


def _kernels():
    from sparsekern.kernels.bsr import triton_forward, triton_grad
    return triton_forward, triton_grad


# (out, in), block, density, empty block rows, empty block cols
STRUCTURES = {
    "b16-half": ((64, 96), 16, 0.5, (), ()),
    "b32-empty-row-col": ((96, 64), 32, 0.7, (1,), (0,)),
    "b64-dense": ((64, 128), 64, 1.0, (), ()),
    "b128-empty-row": ((256, 128), 128, 1.0, (1,), ()),
    "rect32x64": ((64, 128), (32, 64), 0.5, (), ()),
    "rect16x32": ((48, 96), (16, 32), 0.5, (), ()),
    "rect32x16-empty-cols": ((64, 48), (32, 16), 0.8, (), (0, 2)),
    "rect8x24-narrow": ((40, 72), (8, 24), 0.4, (), ()),
    "density0": ((32, 48), 16, 0.0, (), ()),
}


def _case(name, dtype, m, seed=0):
    shape, block, density, empty_rows, empty_cols = STRUCTURES[name]
    weight = random_bsr(shape, block, density, dtype=dtype, seed=seed, empty_rows=empty_rows, empty_cols=empty_cols)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, shape[1], generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(m, shape[0], generator=g, dtype=torch.float64).to(dtype)
    return weight, x, dy


def _dense_products(weight, x, dy):
    w, x, dy = weight.to_dense().double(), x.double(), dy.double()
    return x @ w.T, dy @ w, stored_blocks(dy.T @ x, weight.layout)


# fp32 on every structure; the half types on two (the interpreter is slow).
PRODUCT_CASES = [pytest.param(name, torch.float32, id=f"{name}-fp32") for name in STRUCTURES] + [
    pytest.param(name, dtype, id=f"{name}-{label}")
    for dtype, label in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")] for name in ("b16-half", "rect32x64")]


@uses_interpreter
@pytest.mark.parametrize("name,dtype", PRODUCT_CASES)
def test_products_match_dense_masked(name, dtype):
    forward, grad = _kernels()
    weight, x, dy = _case(name, dtype, m=19)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(7)).to(dtype)
    y_ref, dx_ref, dw_ref = _dense_products(weight, x, dy)
    y_ref = y_ref + bias.double()
    tol = TOLERANCES[dtype]
    y = forward.bsr_forward(x, weight.values, weight.layout, bias)
    dx = forward.bsr_grad_input(dy, weight.values, weight.layout)
    dw = grad.bsr_grad_weight(dy, x, weight.layout)[0]
    assert (y.dtype, dx.dtype, dw.dtype) == (dtype,) * 3
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    torch.testing.assert_close(dw.double(), dw_ref, **tol)


@uses_interpreter
def test_zero_tokens_and_zero_blocks():
    forward, grad = _kernels()
    weight, x, dy = _case("b16-half", torch.float32, m=0)
    assert forward.bsr_forward(x, weight.values, weight.layout).shape == (0, 64)
    assert forward.bsr_grad_input(dy, weight.values, weight.layout).shape == (0, 96)
    assert torch.equal(grad.bsr_grad_weight(dy, x, weight.layout)[0], torch.zeros_like(weight.values))
    empty, x, dy = _case("density0", torch.float32, m=5)
    assert torch.equal(forward.bsr_forward(x, empty.values, empty.layout), torch.zeros(5, 32))
    assert grad.bsr_grad_weight(dy, x, empty.layout)[0].shape == (0, 16, 16)


@uses_interpreter
@pytest.mark.parametrize("view", ["transposed", "every-other-column"])
def test_column_strided_dense_operand(view):
    """Called below the op layer with an x (or dy) whose columns are not contiguous."""
    forward, _ = _kernels()
    weight, x, dy = _case("rect16x32", torch.float32, m=11)

    def strided(t):
        if view == "transposed":
            return t.T.contiguous().T
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]

    sx, sdy = strided(x), strided(dy)
    assert sx.stride(1) != 1 and sdy.stride(1) != 1
    y_ref, dx_ref, _ = _dense_products(weight, x, dy)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(forward.bsr_forward(sx, weight.values, weight.layout).double(), y_ref, **tol)
    torch.testing.assert_close(forward.bsr_grad_input(sdy, weight.values, weight.layout).double(), dx_ref, **tol)


@uses_interpreter
class TestRefusedAtTheBoundary:
    """A corrupt layout or mismatched operand raises before any kernel reads out of bounds."""

    def _corrupt(self, weight, **fields):
        layout = weight.layout
        return dataclasses.replace(layout, **{name: fn(getattr(layout, name)) for name, fn in fields.items()})

    @pytest.mark.parametrize("field,product", [
        ("col_indices", "forward"), ("t_row_indices", "grad_input"), ("t_block_ids", "grad_input")])
    @pytest.mark.parametrize("value", [-1, 99])
    def test_index_out_of_range(self, field, product, value):
        forward, _ = _kernels()
        weight, x, dy = _case("b16-half", torch.float32, m=3)
        layout = self._corrupt(weight, **{field: lambda t: torch.where(torch.arange(t.numel()) == 1, value, t)})
        with pytest.raises(ValueError, match="corrupt"):
            if product == "forward":
                forward.bsr_forward(x, weight.values, layout)
            else:
                forward.bsr_grad_input(dy, weight.values, layout)

    def test_offsets_that_do_not_cover_the_blocks(self):
        forward, _ = _kernels()
        weight, x, _ = _case("b16-half", torch.float32, m=3)
        layout = self._corrupt(weight, row_offsets=lambda t: torch.cat([t[:-1], t[-1:] + 5]))
        with pytest.raises(ValueError, match="corrupt"):
            forward.bsr_forward(x, weight.values, layout)

    def test_mismatched_operands(self):
        forward, _ = _kernels()
        weight, x, dy = _case("b16-half", torch.float32, m=3)
        with pytest.raises(ValueError, match="dense operand"):
            forward.bsr_forward(x[:, :-16], weight.values, weight.layout)
        with pytest.raises(ValueError, match="values"):
            forward.bsr_grad_input(dy, weight.values[1:], weight.layout)
        with pytest.raises(ValueError, match="bias"):
            forward.bsr_forward(x, weight.values, weight.layout, torch.zeros(3))
        with pytest.raises(ValueError, match="dtypes"):
            forward.bsr_forward(x, weight.values.double(), weight.layout)


@uses_interpreter
class TestLoadBalance:
    def test_plan_splits_long_segments_and_runs_longest_first(self):
        forward, _ = _kernels()
        items, slot_rows = forward.plan([40, 1, 0, 3], min_segment=4)
        # target = max(4, ceil(44 / 4)) = 11: the 40-block row is cut in 4 pieces of 10.
        pieces = [it for it in items if it[0] == 0]
        assert [hi - lo for _, lo, hi, _ in pieces] == [10, 10, 10, 10]
        assert sorted(slot for *_, slot in pieces) == [0, 1, 2, 3] and slot_rows == [0, 0, 0, 0]
        assert [hi - lo for _, lo, hi, _ in items] == [10, 10, 10, 10, 3, 1, 0]
        assert (2, 41, 41, -1) in items  # an empty row is still written (with zeros)

    def test_uniform_rows_are_not_split(self):
        forward, _ = _kernels()
        items, slot_rows = forward.plan([9, 8, 10, 7])
        assert slot_rows == [] and len(items) == 4

    @pytest.mark.parametrize("skew", ["row", "col"])
    def test_skewed_layout_goes_through_partial_sums(self, skew):
        # One full block row (forward) or column (dX) of 24 blocks, the rest nearly empty:
        # the long segment is cut in pieces whose partials the merge kernel adds (with the bias).
        forward, _ = _kernels()
        mask = torch.zeros(4, 24, dtype=torch.bool)
        mask[0] = True
        mask[2, 5] = mask[3, 7] = True
        if skew == "col":
            mask = mask.T.contiguous()
        dense = torch.randn(mask.shape[0] * 16, mask.shape[1] * 16, dtype=torch.float64)
        weight = sk.BlockSparseMatrix.from_dense(dense.float(), 16, block_mask=mask)
        layout = weight.layout
        if skew == "row":
            args = (layout.row_offsets, None, layout.col_indices, layout.grid[1])
        else:
            args = (layout.col_offsets, layout.t_block_ids, layout.t_row_indices, layout.grid[0])
        plan = forward.schedule(*args)
        assert plan.n_slots > 1 and plan.split_rows.tolist() == [0]
        assert forward.schedule(*args) is plan  # built once per layout
        g = torch.Generator().manual_seed(3)
        x = torch.randn(9, weight.shape[1], generator=g)
        dy = torch.randn(9, weight.shape[0], generator=g)
        y_ref, dx_ref, _ = _dense_products(weight, x, dy)
        if skew == "row":
            bias = torch.randn(weight.shape[0], generator=g)
            got, want = forward.bsr_forward(x, weight.values, layout, bias), y_ref + bias.double()
        else:
            got, want = forward.bsr_grad_input(dy, weight.values, layout), dx_ref
        torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])

    def test_round_slices_cover_a_round_with_no_empty_slice(self):
        forward, _ = _kernels()
        prefix = [0, 5, 8, 9, 10, 12]  # five items of 5, 3, 1, 1, 2 block-steps
        for programs in (1, 2, 7, 40):
            rows, table = forward.round_slices(prefix, programs)
            row, item, pos = table.tolist()
            assert (row[-1], item[-1], pos[-1]) == (rows, 0, rows * 12) and (row[0], item[0], pos[0]) == (0, 0, 0)
            assert all(b - a >= 1 for a, b in zip(pos, pos[1:]))  # every slice starts a unit
            assert all(p == r * 12 + prefix[i] for r, i, p in zip(row, item, pos))
            assert rows * 12 >= forward.ROUND_UNITS * programs * 5

    @pytest.mark.parametrize("m", [1, 33])
    def test_programs_split_rounds_of_units(self, m, monkeypatch):
        """Full rounds (rotated slices) and the last partial round, with more units than
        programs and more programs than units: every unit is written once."""
        forward, _ = _kernels()
        seen = set()
        for slots in (2, 3, 16):
            monkeypatch.setattr(forward, "parallel_slots", lambda device, n=slots: n)
            weight, x, dy = _case("b32-empty-row-col", torch.float32, m=m)
            y_ref, dx_ref, _ = _dense_products(weight, x, dy)
            torch.testing.assert_close(forward.bsr_forward(x, weight.values, weight.layout).double(), y_ref,
                                       **TOLERANCES[torch.float32])
            torch.testing.assert_close(forward.bsr_grad_input(dy, weight.values, weight.layout).double(), dx_ref,
                                       **TOLERANCES[torch.float32])
            layout = weight.layout
            rows, _ = forward.schedule(layout.row_offsets, None, layout.col_indices, layout.grid[1]).round_slices(
                2 * slots)
            n_rows = -(-m // forward._INTERPRET_TILE["BT"]) * 2  # 32-row blocks in 16-row sub-tiles
            seen.add((min(n_rows // rows, 2), n_rows % rows > 0))
        if m > 1:  # several full rounds; one full round and a partial one; only a partial one
            assert {(2, False), (1, True), (0, True)} <= seen, seen


@pytest.mark.parametrize("block", [(16, 16), (8, 24), (32, 64), (128, 128)], ids=str)
def test_autotune_has_several_configs_fitted_to_the_block(block, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled-mode (autotuned) kernel
    forward, _ = _kernels()
    dsd, _ = forward._kernel(False)
    assert dsd.keys == ["M_BUCKET", "D_BUCKET", "OUT_B", "IN_B", "V_STRIDE_OUT", "HAS_BIAS"]
    configs = forward.configs_for(block[0], block[1], 2, forward.SM90_SHARED)
    assert len(configs) >= 5 and len({str(c) for c in configs}) == len(configs)
    assert all(16 <= c.kwargs["BO"] <= max(16, triton_next_pow2(block[0]))
               and 16 <= c.kwargs["BK"] <= max(16, triton_next_pow2(block[1])) for c in configs)


def test_configs_fit_the_shared_memory_they_are_given():
    forward, _ = _kernels()
    a100 = 166912
    for elem_size in (2, 4):
        kept = forward.configs_for(64, 64, elem_size, a100, hopper=False)
        assert kept and all(forward.shared_bytes(c.kwargs["BT"], c.kwargs["BO"], c.kwargs["BK"], c.num_stages,
                                                 elem_size, hopper=False) <= a100 for c in kept)
        assert len(kept) < len(forward.configs_for(64, 64, elem_size, forward.SM90_SHARED))
    assert len(forward.configs_for(64, 64, 4, a100, False)) < len(forward.configs_for(64, 64, 2, a100, False))
    assert len(forward.configs_for(64, 64, 4, 1024)) == 1  # nothing fits: the smallest stays


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@uses_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("probe", [None, "dense", "partial"])
def test_bsr_linear_on_triton_matches_reference(dtype, probe):
    """The whole op (leading batch dims, bias, grad_probe) forced onto triton."""
    weight, _, _ = _case("rect16x32", dtype, m=1, seed=4)
    weight.values.requires_grad_()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 96, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(48, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(2, 3, 48, generator=g).to(dtype)
    grad_probe = None
    if probe is not None:
        mask = torch.ones(3, 3, dtype=torch.bool) if probe == "dense" else torch.eye(3, dtype=torch.bool)
        grad_probe = sk.BlockSparseMatrix.from_dense(torch.zeros(48, 96, dtype=dtype), (16, 32), block_mask=mask)
        grad_probe.values.requires_grad_()
    results = {}
    for backend in ("triton", "reference"):
        leaves = [x, weight.values, bias] + ([] if grad_probe is None else [grad_probe.values])
        for leaf in leaves:
            leaf.grad = None
        with sk.use_backend(backend):
            y = sk.ops.bsr_linear(x, weight, bias, grad_probe=grad_probe)
            y.backward(dy)
        results[backend] = [y.detach()] + [leaf.grad for leaf in leaves]
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got.double(), want.double(), **TOLERANCES[dtype])


class TestAvailability:
    @uses_interpreter
    def test_cpu_needs_the_interpreter(self, monkeypatch):
        from sparsekern.kernels.bsr.triton_backend import unavailable
        assert unavailable(CPU, torch.float32) is None
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET=1" in unavailable(CPU, torch.float32)
        assert "triton" not in sk.kernels.available_backends("bsr_forward", CPU, torch.float32)

    def test_dtypes_and_devices(self, monkeypatch):
        from sparsekern.kernels.bsr.triton_backend import unavailable
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert "torch.float64" in unavailable(CPU, torch.float64)
        assert unavailable(torch.device("cuda"), torch.bfloat16) is None  # no CUDA query: a probe only
        assert "mps" in unavailable(torch.device("mps"), torch.float16)

    def test_cuda_tensors_prefer_triton(self):
        name, _ = sk.kernels.select_kernel("bsr_forward", torch.device("cuda"), torch.float16)
        assert name == "triton"

    def test_import_loads_no_triton(self):
        code = ("import sys, sparsekern; "
                "assert 'triton' not in sys.modules, 'import sparsekern loaded triton'; "
                "assert 'sparsekern.kernels.bsr.triton_forward' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True)


@uses_interpreter
def test_interpreter_and_compiled_modes_share_a_process(tmp_path):
    """triton imported first without TRITON_INTERPRET, then interpreted kernels, then a
    compiled one: the order of a GPU test run (CPU interpreter tests, then GPU tests)."""
    code = f"""
import os, sys
sys.path[:0] = [{repr(str(TESTS))}, {repr(str(TESTS.parent))}]
import triton
os.environ["TRITON_INTERPRET"] = "1"
import torch, sparsekern as sk
from sparsekern.kernels.bsr import triton_forward, triton_grad
w = sk.BlockSparseMatrix.from_dense(torch.randn(32, 48), 16)
x = torch.randn(5, 48)
torch.testing.assert_close(triton_forward.bsr_forward(x, w.values, w.layout), x @ w.to_dense().T)
triton_grad.bsr_grad_weight(torch.randn(5, 32), x, w.layout)[0]
del os.environ["TRITON_INTERPRET"]
import test_bsr_triton
test_bsr_triton.compile_for_gpu(80)
"""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def compile_for_gpu(arch):
    """Compile the DSD kernel and its merge kernel to cubin for sm_<arch> (ptxas ships with
    triton); no GPU needed. DSD at a rectangular block, dX orientation (W read transposed),
    fp32 (tf32). The SDD kernel has its own compile tests."""
    import gpu_compile
    from test_bsr_triton_compile import dsd_signature
    forward, _ = _kernels()
    signature, aligned = dsd_signature("fp32")
    dsd = gpu_compile.compile_kernel(
        forward._dsd_kernel, signature,
        dict(OUT_B=64, IN_B=32, V_STRIDE_OUT=1, V_STRIDE_IN=64, IDENTITY=False, HAS_BIAS=False, PRECISION="tf32",
             UPCAST=False, stride_ak=1, BT=128, BO=64, BK=32), arch=arch, num_warps=4, num_stages=3, aligned=aligned)
    merge = gpu_compile.compile_kernel(
        forward._merge_kernel, dict(part_ptr="*fp32", out_ptr="*bf16", bias_ptr="*bf16", rows_ptr="*i64",
                                    slot_offsets_ptr="*i32", M="i32", stride_om="i32"),
        dict(OUT_B=64, HAS_BIAS=True, **forward._MERGE_TILE), arch=arch)
    for compiled in (dsd, merge):
        assert compiled.asm["cubin"]


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_targets(arch, monkeypatch, tmp_path):
    """Without a GPU, still compile the DSD and merge kernels to cubin (ptxas included) for sm_80 and
    sm_90, so GPU-only code paths (tensor-core dots, bf16, tf32) are at least valid."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # private: other processes compile too
    compile_for_gpu(arch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block", [16, 32, 64, 128, (32, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_autotuned_products_match_reference(block, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forward, grad = _kernels()
    torch.manual_seed(0)
    weight = random_bsr((512, 768), block, 0.3, dtype=dtype, seed=6)
    layout = weight.layout.to("cuda")
    values = weight.values.cuda()
    x = torch.randn(1000, 768, device="cuda", dtype=dtype)
    dy = torch.randn(1000, 512, device="cuda", dtype=dtype)
    bias = torch.randn(512, device="cuda", dtype=dtype)
    x_columns = x.T.contiguous().T  # column-strided: the kernel reads it through its strides
    # Reference in fp64 on the same inputs; tolerances scale with the reduction length.
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
    for got, want in [
        (forward.bsr_forward(x, values, layout, bias),
         reference.bsr_forward(x.double(), values.double(), layout, bias.double())),
        (forward.bsr_forward(x_columns, values, layout), reference.bsr_forward(x.double(), values.double(), layout)),
        (forward.bsr_grad_input(dy, values, layout), reference.bsr_grad_input(dy.double(), values.double(), layout)),
        (grad.bsr_grad_weight(dy, x, layout)[0], reference.bsr_grad_weight(dy.double(), x.double(), layout)[0]),
    ]:
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 300, 5000])
def test_gpu_skewed_layout_single_token_and_rounds(m, monkeypatch):
    """One full block row and one full block column among sparse ones (split segments,
    the merge kernel), one token (integer arguments specialized to 1), and enough
    tokens for several full rounds, compiled and autotuned."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forward, _ = _kernels()
    mask = torch.rand(16, 24, generator=torch.Generator().manual_seed(8)) < 0.1
    mask[3], mask[:, 5] = True, True
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(16 * 64, 24 * 64), 64, block_mask=mask)
    layout, values = weight.layout.to("cuda"), weight.values.to("cuda", torch.bfloat16)
    assert forward.schedule(layout.row_offsets, None, layout.col_indices, layout.grid[1]).n_slots > 0
    x = torch.randn(m, 24 * 64, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, 16 * 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(16 * 64, device="cuda", dtype=torch.bfloat16)
    tol = dict(rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(forward.bsr_forward(x, values, layout, bias).double(),
                               reference.bsr_forward(x.double(), values.double(), layout, bias.double()), **tol)
    torch.testing.assert_close(forward.bsr_grad_input(dy, values, layout).double(),
                               reference.bsr_grad_input(dy.double(), values.double(), layout), **tol)
