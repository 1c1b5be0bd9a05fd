"""low_rank_linear and LowRankLinear against the dense computation x (U S Vᵀ)ᵀ + b.

Every CPU backend (reference, dense, cpu) is checked on awkward shapes (non powers of
two, no tokens, rank 1 and full rank, leading batch dims), forward and every
gradient, in both gradient modes (factor gradients, and the K/L gradients DLRT
uses), plus fp64 gradcheck of the op.
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
from helpers import relative_error
from sparsekern.formats.lowrank import truncation_rank
from sparsekern.ops import low_rank_linear

BACKENDS = ("reference", "dense", "cpu")
# (lead dims of x, in, out, rank)
SHAPES = [((5,), 7, 6, 3), ((3, 4), 33, 17, 5), ((0,), 9, 8, 2), ((11,), 10, 13, 1), ((6,), 12, 9, 9)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _operands(lead, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(*lead, k), make(n, r), make(r, r), make(k, r), (make(n) if bias else None)


def _dense(x, U, S, V, bias):
    y = x @ (U @ S @ V.T).T
    return y if bias is None else y + bias


def _grads(out, inputs, dy):
    wanted = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, dy))
    return [None if t is None else next(grads) for t in inputs]


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"x{s[0]}-in{s[1]}-out{s[2]}-r{s[3]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_factor_gradients_match_dense(backend, shape, dtype, bias):
    lead, k, n, r = shape
    inputs = _operands(lead, k, n, r, dtype, bias)
    exact = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_ref = _dense(*exact)
    dy = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with sk.use_backend(backend):
        y = low_rank_linear(*inputs)
        grads = _grads(y, inputs, dy.to(dtype))
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert relative_error(y, y_ref) < _tol(dtype)
    for got, want in zip(grads, _grads(y_ref, exact, dy)):
        if want is not None:
            assert got.dtype == dtype and relative_error(got, want) < _tol(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"x{s[0]}-in{s[1]}-out{s[2]}-r{s[3]}")
def test_kl_mode_gives_dlrt_gradients(backend, shape):
    """kl_grads=True: U gets dK = dW V, V gets dL = dWᵀ U, S and x their usual gradients."""
    lead, k, n, r = shape
    x, U, S, V, b = _operands(lead, k, n, r, torch.float64)
    dy = torch.randn(*lead, n, dtype=torch.float64)
    with sk.use_backend(backend):
        y = low_rank_linear(x, U, S, V, b, kl_grads=True)
        dx, dK, dS, dL, db = _grads(y, [x, U, S, V, b], dy)
    dW = dy.reshape(-1, n).T @ x.detach().reshape(-1, k)
    Ud, Sd, Vd = U.detach(), S.detach(), V.detach()
    torch.testing.assert_close(dK, dW @ Vd)
    torch.testing.assert_close(dL, dW.T @ Ud)
    torch.testing.assert_close(dS, Ud.T @ dW @ Vd)
    torch.testing.assert_close(dx, dy @ (Ud @ Sd @ Vd.T))
    torch.testing.assert_close(db, dy.reshape(-1, n).sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_fp64(backend, bias):
    inputs = _operands((2, 3), 6, 5, 3, torch.float64, bias)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: low_rank_linear(*a), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients_are_computed(backend):
    x, U, S, V, b = _operands((4,), 6, 5, 2, torch.float64)
    x.requires_grad_(False)
    S.requires_grad_(False)
    with sk.use_backend(backend):
        low_rank_linear(x, U, S, V, b).sum().backward()
    assert x.grad is None and S.grad is None
    assert U.grad is not None and V.grad is not None and b.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_alone(backend):
    """Only the bias trains (the cpu backend otherwise takes db from dU's pass over dy)."""
    x, U, S, V, b = _operands((3, 4), 6, 5, 2, torch.float64)
    for t in (x, U, S, V):
        t.requires_grad_(False)
    dy = torch.randn(3, 4, 5, dtype=torch.float64)
    with sk.use_backend(backend):
        low_rank_linear(x, U, S, V, b).backward(dy)
    torch.testing.assert_close(b.grad, dy.sum((0, 1)))


def test_bad_inputs_name_the_problem():
    x, U, S, V, b = (t.detach() for t in _operands((4,), 6, 5, 3, torch.float32))
    with pytest.raises(ValueError, match=r"last dim of 6"):
        low_rank_linear(x[:, :5], U, S, V)
    with pytest.raises(ValueError, match=r"do not form U S V"):
        low_rank_linear(x, U, S[:2, :2], V)
    with pytest.raises(ValueError, match=r"do not form U S V"):
        low_rank_linear(x, U, S, V[:, :2])
    with pytest.raises(ValueError, match=r"must be 2-D"):
        low_rank_linear(x, U[None], S, V)
    with pytest.raises(TypeError, match=r"V has dtype torch.float64"):
        low_rank_linear(x, U, S, V.double())
    with pytest.raises(ValueError, match=r"bias has shape \(4,\)"):
        low_rank_linear(x, U, S, V, b[:4])
    with pytest.raises(TypeError, match=r"floating"):
        low_rank_linear(x.long(), U.long(), S.long(), V.long())
    with pytest.raises(TypeError, match=r"U must be a tensor"):
        low_rank_linear(x, U.tolist(), S, V)


# ---------------------------------------------------------------- LowRankLinear

def test_layer_matches_linear_with_its_dense_weight():
    layer = sk.LowRankLinear(20, 12, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dense_weight(), layer.bias))
    U, V = layer.U.detach(), layer.V.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64))
    assert layer.rank == 4 and "rank=4" in repr(layer)


def test_initial_output_scale_matches_linear():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    dense, low = nn.Linear(256, 512), sk.LowRankLinear(256, 512, 32)
    with torch.no_grad():
        ratio = (low(x) - low.bias).std() / (dense(x) - dense.bias).std()
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_full_rank_is_exact(bias):
    linear = nn.Linear(9, 6, bias=bias).double()
    layer = sk.LowRankLinear.from_dense(linear)
    assert layer.rank == 6
    torch.testing.assert_close(layer.dense_weight(), linear.weight)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x))


def test_from_dense_rank_and_tol_truncate_by_svd():
    torch.manual_seed(0)
    linear = nn.Linear(30, 20).double()
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    layer = sk.LowRankLinear.from_dense(linear, rank=5)
    torch.testing.assert_close(layer.dense_weight(), u[:, :5] @ torch.diag(s[:5]) @ vh[:5])
    layer = sk.LowRankLinear.from_dense(linear, tol=0.3)
    r = layer.rank
    assert s[r:].norm() <= 0.3 * s.norm() < s[r - 1:].norm()


def test_truncation_rank_rule():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    total = s.norm().item()
    assert truncation_rank(s, 0.0) == 4
    assert truncation_rank(s, 0.5 / total) == 3                # tail [0.5, 0] has norm 0.5 <= tol·‖s‖
    assert truncation_rank(s, 1.2 / total) == 2
    assert truncation_rank(s, 1.2, absolute=True) == 2
    assert truncation_rank(s, 10.0) == 0
    with pytest.raises(ValueError, match="tol"):
        truncation_rank(s, -1.0)


def test_state_dict_round_trip_adopts_the_saved_rank():
    src = sk.LowRankLinear(10, 8, 3)
    dst = sk.LowRankLinear(10, 8, 6)
    dst.load_state_dict(src.state_dict())
    assert dst.rank == 3
    torch.testing.assert_close(dst.dense_weight(), src.dense_weight())


def test_set_factors_replaces_parameters_only_when_the_rank_changes():
    layer = sk.LowRankLinear(10, 8, 3)
    U = layer.U
    layer.set_factors(torch.zeros(8, 3), torch.zeros(3, 3), torch.zeros(10, 3))
    assert layer.U is U
    layer.set_factors(torch.zeros(8, 2), torch.zeros(2, 2), torch.zeros(10, 2))
    assert layer.U is not U and layer.rank == 2 and layer.U.requires_grad
    with pytest.raises(ValueError, match="do not fit a 8x10 layer"):
        layer.set_factors(torch.zeros(8, 2), torch.zeros(2, 2), torch.zeros(9, 2))


def test_bf16_layer_trains_close_to_fp32():
    torch.manual_seed(0)
    ref = sk.LowRankLinear(24, 16, 4)
    low = sk.LowRankLinear(24, 16, 4, dtype=torch.bfloat16)
    low.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
    x = torch.randn(8, 24)
    ref(x).square().sum().backward()
    low(x.bfloat16()).float().square().sum().backward()
    for name in ("U", "S", "V", "bias"):
        assert relative_error(getattr(low, name).grad, getattr(ref, name).grad) < 3e-2


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\]"):
        sk.LowRankLinear(4, 6, 5)
    with pytest.raises(ValueError, match="in_features"):
        sk.LowRankLinear(0, 6, 1)
    with pytest.raises(TypeError, match="dtypes"):
        sk.LowRankLinear(4, 6, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="nn.Linear"):
        sk.LowRankLinear.from_dense(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="either rank or tol"):
        sk.LowRankLinear.from_dense(nn.Linear(4, 4), rank=2, tol=0.1)
    with pytest.raises(ValueError, match="expected last dim 4"):
        sk.LowRankLinear(4, 6, 2)(torch.randn(3, 5))


@pytest.mark.parametrize("kl_grads", [False, True], ids=["factors", "kl"])
def test_torch_compile_traces_without_graph_breaks(kl_grads):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(sk.LowRankLinear(12, 10, 3), nn.ReLU(), sk.LowRankLinear(10, 7, 2, bias=False))
    for layer in (model[0], model[2]):
        layer.kl_grads = kl_grads
    x = torch.randn(2, 5, 12, requires_grad=True)
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        y = run(x)
        y.square().sum().backward()
        results.append([y, x.grad] + [p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        x.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_a_non_contiguous_bias_is_accepted_and_a_0d_input_refused():
    g = torch.Generator().manual_seed(0)
    U, S, V = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((8, 2), (2, 2), (6, 2)))
    x, bias = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)[::2]
    torch.testing.assert_close(sk.ops.low_rank_linear(x, U, S, V, bias), x @ (U @ S @ V.T).T + bias)
    with pytest.raises(ValueError, match=r"input has shape \(\), expected last dim"):
        sk.LowRankLinear(6, 8, 2)(torch.tensor(1.0))


def test_backward_across_new_factors_is_refused():
    layer = sk.LowRankLinear(6, 8, 2)
    loss = layer(torch.randn(3, 6)).sum()
    layer.set_factors(layer.U.detach() * 2, layer.S.detach(), layer.V.detach())
    with pytest.raises(RuntimeError, match="replaced or modified in place before the backward"):
        loss.backward()


def test_float16_runs_the_cpu_kernels():
    """fp16 goes to the C++ products (widened to fp32 there) with the r-wide products in fp32, not
    to torch's fp16 GEMMs, which CPUs without AVX512-FP16 run far slower than fp32."""
    cpu = torch.device("cpu")
    if "cpu" not in sk.kernels.available_backends("lowrank_forward", cpu, torch.float32):
        pytest.skip("the compiled low-rank extension is not built")
    assert sk.kernels.select_kernel("lowrank_forward", cpu, torch.float16)[0] == "cpu"
    assert sk.kernels.select_kernel("lowrank_backward", cpu, torch.float16)[0] == "cpu"
