"""2:4 op and layer: forward and every gradient vs the dense masked computation, per backend."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.kernels import available_backends
from sparsekern.ops import semi_linear, semi_linear_dynamic

from helpers import TOLERANCES

# (M, N, K): tokens not a multiple of the 96-token panels, N/K not multiples of the CPU blocking.
SHAPES = [(1, 4, 4), (7, 8, 12), (100, 36, 68), (193, 40, 132), (97, 140, 264), (0, 8, 8)]
CASES = [("reference", torch.float64), ("reference", torch.float32), ("reference", torch.bfloat16),
         ("reference", torch.float16), ("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float16),
         ("dense", torch.float64),
         ("dense", torch.float32),
         ("dense", torch.bfloat16), ("dense", torch.float16)]


def _weight(n, k, dtype, transposable, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dense = (w * sk.prune_2to4(w, transposable=transposable)).to(dtype)
    return sk.SemiStructuredMatrix.from_dense(dense, mask=sk.prune_2to4(w, transposable=transposable),
                                              with_transpose=transposable)


def _skip_unavailable(backend, dtype):
    if backend not in available_backends("semi_forward", torch.device("cpu"), dtype):
        pytest.skip(f"backend {backend} unavailable for {dtype} here")


@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_op_matches_dense_masked(backend, dtype, shape, transposable):
    _skip_unavailable(backend, dtype)
    m, n, k = shape
    g = torch.Generator().manual_seed(1)
    weight = _weight(n, k, dtype, transposable)
    weight.values.requires_grad_(True)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    bias = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    with sk.use_backend(backend):
        y = semi_linear(x, weight, bias)
    y.backward(dy)
    dense = weight.to_dense().detach().double().requires_grad_(True)
    x64, b64 = x.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
    y_ref = F.linear(x64, dense, b64)
    y_ref.backward(dy.double())
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(bias.grad.double(), b64.grad, **tol)
    # dW only at the kept positions, in the compressed layout.
    expected_dvalues = sk.SemiStructuredMatrix.from_dense(dense.grad * weight.mask, mask=weight.mask).values
    torch.testing.assert_close(weight.values.grad.double(), expected_dvalues, **tol)


@pytest.mark.parametrize("backend,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_forward_product_takes_the_bias(backend, dtype):
    """semi_forward(x, values, indices, bias) is the product plus the bias (the dense composite
    adds it inside its GEMM, the others after), and bias=None the plain product."""
    _skip_unavailable(backend, dtype)
    from sparsekern.kernels.registry import select_kernel
    g = torch.Generator().manual_seed(3)
    weight = _weight(40, 68, dtype, True)
    x = torch.randn(37, 68, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(40, generator=g, dtype=torch.float64).to(dtype)
    forward = select_kernel("semi_forward", x.device, dtype, backend)[1]
    plain = forward(x, weight.values, weight.indices)
    with_bias = forward(x, weight.values, weight.indices, bias)
    want = F.linear(x.double(), weight.to_dense().double(), bias.double())
    torch.testing.assert_close(with_bias.double(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(plain.double(), want - bias.double(), **TOLERANCES[dtype])


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512_if_present", "avx2"])
@pytest.mark.parametrize("blocking", [(64, 64), (128, 64), (32, 32), (5, 12)],
                         ids=["default", "bf16", "previous", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_forward_microkernels_and_blocking(avx512, blocking, dtype):
    _skip_unavailable("cpu", dtype)
    from sparsekern.kernels.semi import cpu
    weight = _weight(72, 200, dtype, False)
    x = torch.randn(197, 200).to(dtype)
    offsets, source = cpu.plan(weight.indices, None, 100, *blocking, pairs=dtype == torch.bfloat16)
    y = cpu.forward(x, weight.values, offsets, source, *blocking, avx512)
    torch.testing.assert_close(y, x @ weight.to_dense().T, **TOLERANCES[dtype])


def _rowwise_weight(rows, cols, keep):
    """A row-wise 2:4 weight keeping positions ``keep`` (one pair per group) of every group of each
    row, or the top-2 of random values where ``keep`` is None: columns then keep from none to
    all of a block's rows, and the two columns of a pair differ in count."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    if keep is None:
        return sk.SemiStructuredMatrix.from_dense(w * sk.prune_2to4(w))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for position in keep:
        mask[:, position::4] = True
    return sk.SemiStructuredMatrix.from_dense(w * mask, mask=mask)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512_if_present", "avx2"])
@pytest.mark.parametrize("blocking", [(64, 64), (32, 32), (6, 12), (2, 4)], ids=["default", "32", "6x12", "2x4"])
@pytest.mark.parametrize("keep", [None, (0, 2), (1, 3), (2, 3)], ids=["random", "even", "odd", "high"])
def test_cpu_rowwise_grad_input_on_the_column_plan(avx512, blocking, keep):
    _skip_unavailable("cpu", torch.float32)
    from sparsekern.kernels.semi import cpu
    rows, cols = 203, 72          # rows: 4 blocks of 64 but the last partial
    weight = _rowwise_weight(rows, cols, keep)
    plan = cpu.plan_columns(weight.indices, cols, *blocking)
    assert plan[0].numel() == rows * cols // 2       # every kept entry once, no padding
    dy = torch.randn(197, rows)
    got = cpu.ops().semi_grad_input_rowwise_cpu(dy, weight.values, weight.indices, *plan, *blocking, avx512)
    torch.testing.assert_close(got, dy @ weight.to_dense(), **TOLERANCES[torch.float32])


@pytest.mark.skipif("cpu" not in available_backends("semi_forward", torch.device("cpu"), torch.float32),
                    reason="the cpu backend is not built")
def test_the_rowwise_grad_input_refuses_metadata_that_does_not_fit():
    from sparsekern.kernels.semi import cpu
    rows, cols = 20, 16
    weight = _rowwise_weight(rows, cols, None)
    offsets, source, segments = cpu.plan_columns(weight.indices, cols, 4, 12)
    dy = torch.randn(5, rows)

    def run(offsets=offsets, source=source, segments=segments, blocking=(4, 12)):
        return cpu.ops().semi_grad_input_rowwise_cpu(dy, weight.values, weight.indices, offsets, source, segments,
                                                     *blocking, True)

    torch.testing.assert_close(run(), dy @ weight.to_dense())
    for column, bad in ((0, -1), (0, offsets.numel()), (1, 13), (2, -1)):   # start, count > kc, count < 0
        bad_segments = segments.clone()
        bad_segments[1, 3, column] = bad
        with pytest.raises(ValueError, match="segments or offsets point outside"):
            run(segments=bad_segments)
    for bad in (-1, (rows - 12) * 96):   # as uint16: 65535; past the last block's 8 panel rows
        bad_offsets = offsets.clone()
        bad_offsets[-1] = bad
        with pytest.raises(ValueError, match="segments or offsets point outside"):
            run(offsets=bad_offsets)
    bad_source = source.clone()
    bad_source[2] = weight.values.numel()
    with pytest.raises(ValueError, match="source holds entries outside"):
        run(source=bad_source)
    with pytest.raises(RuntimeError, match="make them with plan_columns"):
        run(segments=segments[:1].contiguous())
    with pytest.raises(RuntimeError, match="bad blocking"):
        run(blocking=(3, 12))
    huge = torch.empty(2 ** 16, 2 ** 13, dtype=torch.uint8)   # W 65536 x 65536: 2^31 kept values (not read)
    with pytest.raises(RuntimeError, match="more than the column plan's int32 positions address"):
        cpu.plan_columns(huge, 2 ** 16)
    with pytest.raises(RuntimeError, match=r"dy has 19 columns but W has 20 rows"):
        cpu.ops().semi_grad_input_rowwise_cpu(dy[:, :19].contiguous(), weight.values, weight.indices, offsets,
                                              source, segments, 4, 12, True)


def _bf16_error_ratio(got, dense_bf16, exact):
    """‖got - exact‖ / ‖dense bf16 - exact‖ (Frobenius): the kernel's error against torch's own bf16."""
    return float((got.double() - exact).norm() / (dense_bf16.double() - exact).norm())


@pytest.mark.parametrize("shape,transposable", [((300, 136, 264), True), ((300, 136, 264), False),
                                                ((97, 36, 64), True), ((97, 37, 64), False)],
                         ids=["300x136x264-transposable", "300x136x264-rowwise", "97x36x64-transposable",
                              "97x37x64-rowwise"])
def test_cpu_bf16_products_err_no_more_than_dense_bf16(shape, transposable):
    """The bf16 kernels (fp32 sums of bf16 products, one rounding) against fp64: within 10 % of the
    error of torch's dense bf16 GEMMs on the same inputs, for y, dX and dW (odd token and row
    counts: the token-pair panels' padding)."""
    _skip_unavailable("cpu", torch.bfloat16)
    from sparsekern.kernels.semi import cpu
    m, n, k = shape
    weight = _weight(n, k, torch.bfloat16, transposable)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).bfloat16()
    dy = torch.randn(m, n, generator=g).bfloat16()
    dense, exact_w = weight.to_dense(), weight.to_dense().double()
    got = {"y": cpu.semi_forward(x, weight.values, weight.indices),
           "dx": cpu.semi_grad_input(dy, weight.values, weight.indices, weight.indices_t,
                                     weight.transpose_map() if transposable else None),
           "dw": cpu.semi_grad_weight(dy, x, weight.indices)}
    kept = weight.mask
    exact = {"y": x.double() @ exact_w.T, "dx": dy.double() @ exact_w, "dw": (dy.double().T @ x.double())[kept]}
    torch_bf16 = {"y": x @ dense.T, "dx": dy @ dense, "dw": (dy.T @ x)[kept]}
    for name in got:
        assert _bf16_error_ratio(got[name].flatten(), torch_bf16[name].flatten(), exact[name].flatten()) <= 1.1, name


def test_cpu_bf16_plan_refuses_a_group_keeping_one_position_twice():
    _skip_unavailable("cpu", torch.bfloat16)
    from sparsekern.kernels.semi import cpu
    weight = _weight(8, 16, torch.bfloat16, False)
    indices = weight.indices.clone()
    indices[5, 0] = 0b0101   # group 0 of row 5 keeps position 1 twice (entries 0 and 1)
    with pytest.raises(ValueError, match="row 5 of indices keeps a position of a group twice"):
        cpu.plan(indices, None, 8, pairs=True)
    cpu.plan(indices, None, 8)   # the fp32 kernels read each entry's column on its own: no refusal needed


@pytest.mark.parametrize("isa", ["avx2", "portable", "avx512"])
def test_cpu_half_kernels_follow_the_requested_isa(monkeypatch, isa):
    """bf16 runs the pair kernels on avx512 (with AVX512-BF16), the fp32 kernels widened on avx2;
    fp16 always the fp32 kernels; on portable nothing (the 2:4 kernels need AVX2)."""
    _skip_unavailable("cpu", torch.float32)
    from sparsekern.kernels.semi import cpu as semi_cpu
    if isa == "avx512" and not semi_cpu.bf16_pairs_usable():
        pytest.skip("the bf16 pair kernels need AVX512-BF16")
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", isa)
    from sparsekern.cli.machine import kernel_path   # what benchmark headers and rows name
    cpu = torch.device("cpu")
    if isa == "portable":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert kernel_path("semi_forward", cpu, dtype) == {"backend": "dense", "isa": None}
        return
    fp32 = "avx2-fma" if isa == "avx2" else "avx512f"
    assert kernel_path("semi_forward", cpu, torch.float32) == {"backend": "cpu", "isa": fp32}
    assert kernel_path("semi_forward", cpu, torch.bfloat16) == {
        "backend": "cpu", "isa": "avx512f+avx512_bf16" if isa == "avx512" else f"{fp32} (widened to fp32)"}
    assert kernel_path("semi_forward", cpu, torch.float16) == {"backend": "cpu", "isa": f"{fp32} (widened to fp32)"}
    weight = _weight(36, 68, torch.float64, True)
    x = torch.randn(100, 68, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        with sk.use_backend("cpu"):
            y = semi_linear(x.to(dtype), sk.SemiStructuredMatrix.from_dense(weight.to_dense().to(dtype),
                                                                             with_transpose=True))
        torch.testing.assert_close(y.double(), x.to(dtype).double() @ weight.to_dense().to(dtype).double().T,
                                   **TOLERANCES[dtype])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [36, 1000, 4100], ids=lambda r: f"out{r}")
def test_cpu_grad_weight_task_split(threads, rows):
    """dW splits W's rows into tasks of 64..512 rows by the thread count: every split is exact."""
    _skip_unavailable("cpu", torch.float32)
    from sparsekern.kernels.semi import cpu
    weight = _weight(rows, 40, torch.float32, False)
    x, dy = torch.randn(200, 40), torch.randn(200, rows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu.semi_grad_weight(dy, x, weight.indices)
    finally:
        torch.set_num_threads(before)
    want = (dy.T @ x)[weight.to_dense() != 0].view(rows, 20)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cpu_plan_cache_follows_structure():
    _skip_unavailable("cpu", torch.float32)
    from sparsekern.kernels.semi import cpu
    a, b = _weight(8, 16, torch.float32, False, seed=0), _weight(8, 16, torch.float32, False, seed=1)
    x = torch.randn(3, 16)
    with sk.use_backend("cpu"):
        torch.testing.assert_close(semi_linear(x, a), x @ a.to_dense().T)
        a.indices.copy_(b.indices)          # in-place structure change: the plan is rebuilt
        a.values.copy_(b.values)
        torch.testing.assert_close(semi_linear(x, a), x @ b.to_dense().T)
    key = ("rows", id(b.indices), id(None))
    semi_linear(x, b)
    assert key in cpu._plans
    with sk.use_backend("cpu"):             # row-wise dX: the column plan, cached the same way
        semi_linear(x.requires_grad_(), b).sum().backward()
    column_key = ("columns", id(b.indices), id(None))
    assert column_key in cpu._plans
    del b
    assert key not in cpu._plans and column_key not in cpu._plans


def test_forced_cpu_backend_rejects_float64():
    weight = _weight(8, 8, torch.float64, True)
    with sk.use_backend("cpu"), pytest.raises(sk.BackendUnavailableError, match="float32"):
        semi_linear(torch.randn(2, 8, dtype=torch.float64), weight)


def test_leading_batch_dims():
    weight = _weight(8, 12, torch.float32, True)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(semi_linear(x, weight), x @ weight.to_dense().T)


@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
def test_gradcheck(transposable, backend):
    weight = _weight(8, 12, torch.float64, transposable)
    values = weight.values.clone().requires_grad_(True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        w = sk.SemiStructuredMatrix(values, weight.indices, weight.shape, indices_t=weight.indices_t)
        return semi_linear(x, w, bias)

    w_dense = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, values, bias))
        assert torch.autograd.gradcheck(
            lambda x, b: semi_linear_dynamic(x, w_dense.detach(), b, transposable=transposable), (x, bias))


@pytest.mark.parametrize("transposable", [True, False], ids=["transposable", "rowwise"])
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("cpu", torch.float32),
                                           ("cpu", torch.bfloat16), ("cpu", torch.float16),
                                           ("dense", torch.float64)], ids=str)
def test_dynamic_op_straight_through(backend, dtype, transposable):
    _skip_unavailable(backend, dtype)
    w = torch.randn(16, 24, dtype=dtype, requires_grad=True)
    x = torch.randn(9, 24, dtype=dtype, requires_grad=True)
    dy = torch.randn(9, 16, dtype=dtype)
    with sk.use_backend(backend):
        y = semi_linear_dynamic(x, w, transposable=transposable)
    y.backward(dy)
    masked = (w.detach() * sk.prune_2to4(w.detach(), transposable=transposable)).double()
    x64, dy64 = x.detach().double(), dy.double()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), x64 @ masked.T, **tol)
    torch.testing.assert_close(x.grad.double(), dy64 @ masked, **tol)
    torch.testing.assert_close(w.grad.double(), dy64.T @ x64, **tol)   # dense straight-through gradient


def test_op_bad_inputs():
    weight = _weight(8, 12, torch.float32, True)
    with pytest.raises(ValueError, match=r"\(3, 10\)"):
        semi_linear(torch.randn(3, 10), weight)
    with pytest.raises(TypeError, match="float64"):
        semi_linear(torch.randn(3, 12, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match=r"bias has shape \(7,\)"):
        semi_linear(torch.randn(3, 12), weight, torch.randn(7))
    with pytest.raises(TypeError, match="SemiStructuredMatrix"):
        semi_linear(torch.randn(3, 12), weight.to_dense())
    with pytest.raises(ValueError, match=r"\(8, 10\)"):
        semi_linear_dynamic(torch.randn(3, 10), torch.randn(8, 10))


@pytest.mark.skipif("cpu" not in available_backends("semi_forward", torch.device("cpu"), torch.float32),
                    reason="the cpu backend is not built")
def test_the_cpu_kernels_refuse_out_of_range_metadata_instead_of_reading_outside():
    from sparsekern.kernels.semi import cpu
    rows, cols = 8, 16
    weight = sk.SemiStructuredMatrix.from_dense(
        torch.randn(rows, cols) * sk.prune_2to4(torch.randn(rows, cols), transposable=True), with_transpose=True)
    bad_map = weight.transpose_map().clone()
    bad_map[0, 0] = -1
    with pytest.raises(ValueError, match="transpose map entry 0 = -1 is outside"):
        cpu.plan(weight.indices_t, bad_map, rows // 2)
    for dtype in [torch.float32] + ([torch.bfloat16] if cpu.bf16_pairs_usable() else []):
        pairs, values = dtype == torch.bfloat16, weight.values.to(dtype)
        offsets, source = cpu.plan(weight.indices_t, weight.transpose_map(), rows // 2, pairs=pairs)
        bad_source = source.clone()
        bad_source[1, 1] = weight.values.numel()
        with pytest.raises(ValueError, match="source holds entries outside"):
            cpu.forward(torch.randn(3, rows, dtype=dtype), values, offsets, bad_source)
        panel_rows = 2 * 6 if pairs else rows   # Wᵀ's 8 columns: 8 rows of 96 lanes, or 2 groups x 6 pair rows
        for bad in (-1, panel_rows * 96):   # as uint16: 65535; the first row past the panel
            bad_offsets = offsets.clone()
            bad_offsets[-1, -1] = bad
            with pytest.raises(ValueError, match="offsets point outside the activation panels"):
                cpu.forward(torch.randn(3, rows, dtype=dtype), values, bad_offsets, source)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("transposable", [False, True])
def test_inf_and_nan_inputs_give_the_dense_masked_result_on_every_backend(transposable, dtype):
    torch.manual_seed(0)
    layer = sk.SemiSparseLinear(64, 40, transposable=transposable, bias=False, dtype=dtype)
    x = torch.randn(200, 64, dtype=dtype)
    x[3, 5], x[7, 9], x[7, 30], x[150, 1] = float("inf"), float("-inf"), float("inf"), float("nan")
    dy = torch.randn(200, 40, dtype=dtype)
    dy[11, 2] = float("inf")
    dense = layer.dense_weight().detach()
    expected_y, expected_dx = x @ dense.T, dy @ dense

    def same_ieee(a, b):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isposinf(), b.isposinf())
        assert torch.equal(a.isneginf(), b.isneginf())
        torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), **TOLERANCES[dtype])

    for backend in available_backends("semi_forward", torch.device("cpu"), dtype):
        with sk.use_backend(backend):
            xx = x.clone().requires_grad_()
            y = layer(xx)
            y.backward(dy)
        same_ieee(y.detach(), expected_y)
        same_ieee(xx.grad, expected_dx)
