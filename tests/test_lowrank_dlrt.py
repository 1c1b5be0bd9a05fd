"""DLRT: the parallel rank-adaptive BUG step, truncation, rank bounds, optimizer state.

The reference for one step is dense: W₁ = W₀ - lr P_T(dW) with
P_T(Z) = UUᵀZ + ZVVᵀ - UUᵀZVVᵀ and dW = dYᵀX, then the best rank-r₁
approximation with r₁ from the tolerance rule.
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.methods.lowrank import dlrt as dlrt_module
from sparsekern.formats.lowrank import truncation_rank

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(n_in, n_out, r, seed=0, dtype=torch.float64, bias=False):
    torch.manual_seed(seed)
    return sk.LowRankLinear(n_in, n_out, r, bias=bias, dtype=dtype)


def _tangent_step(layer, x, dy, lr):
    """Dense W₀ - lr P_T(dW) for the layer's current factors."""
    U, S, V = (t.detach() for t in (layer.U, layer.S, layer.V))
    dW = dy.T @ x
    PU, PV = U @ U.T, V @ V.T
    return U @ S @ V.T - lr * (PU @ dW + dW @ PV - PU @ dW @ PV)


def _best_rank(W, r):
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def _orthonormality_error(layer):
    U, V = layer.U.detach(), layer.V.detach()
    eye = torch.eye(layer.rank, dtype=U.dtype)
    return max((U.T @ U - eye).abs().max().item(), (V.T @ V - eye).abs().max().item())


def _backward(layer, x, dy):
    layer(x).backward(dy)


@pytest.mark.parametrize("n_in,n_out,r,tokens", [(13, 11, 3, 20), (9, 7, 4, 1), (12, 10, 6, 30)],
                         ids=["full-rank-grad", "rank-1-grad", "2r-exceeds-out"])
def test_one_step_is_the_projected_gradient_step(n_in, n_out, r, tokens):
    layer = _layer(n_in, n_out, r)
    x, dy = torch.randn(tokens, n_in, dtype=torch.float64), torch.randn(tokens, n_out, dtype=torch.float64)
    dlrt = sk.DLRT(layer, 0.3, tol=0.0, rmin=1)
    expected = _tangent_step(layer, x, dy, 0.3)
    _backward(layer, x, dy)
    dlrt.step()
    torch.testing.assert_close(layer.dense_weight().detach(), expected, rtol=1e-10, atol=1e-10)
    assert _orthonormality_error(layer) < 1e-12


@pytest.mark.parametrize("tol,rmax", [(0.0, 4), (0.5, None)], ids=["same-rank", "rank-change"])
def test_factors_stay_row_major_contiguous(tol, rmax):
    """The fused op needs contiguous factors: a column-major U from LAPACK would be copied in every forward."""
    layer = _layer(40, 30, 4)
    dlrt = sk.DLRT(layer, 0.1, tol=tol, rmin=1, rmax=rmax)
    for _ in range(dlrt_module._REORTH_EVERY + 1):  # the re-orthonormalization's QR is column-major too
        _backward(layer, torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 30, dtype=torch.float64))
        dlrt.step()
        assert all(p.is_contiguous() for p in (layer.U, layer.S, layer.V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["drifted", "rank-deficient"])
def test_orthonormalize_gives_q_r_with_positive_diagonal(dtype, case):
    """The periodic re-orthonormalization: Cholesky QR on a drifted basis, Householder on a degenerate one."""
    torch.manual_seed(0)
    A = torch.linalg.qr(torch.randn(300, 12, dtype=torch.float64)).Q
    if case == "drifted":
        A = A + 1e-5 * torch.randn_like(A)
    else:
        A[:, 5] = A[:, 2]  # AᵀA singular: no Cholesky factor
    A = A.to(dtype)
    Q, R = dlrt_module._orthonormalize(A)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(Q @ R, A, rtol=0, atol=100 * eps)
    assert torch.equal(R, R.triu()) and bool((R.diagonal() >= 0).all())
    assert float((Q.T @ Q - torch.eye(12, dtype=dtype)).abs().max()) < 100 * eps


def _direction(n, r, k, condition, seed=0):
    """An orthonormal U (n, r) and a direction (n, k) whose part outside U has condition number
    `condition` (one singular value 1 / condition, the others 1)."""
    torch.manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, r + k, dtype=torch.float64)).Q
    U, W = basis[:, :r], basis[:, r:]
    spectrum = torch.ones(k, dtype=torch.float64)
    spectrum[-1] = 1 / condition
    outside = W @ torch.diag(spectrum) @ torch.linalg.qr(torch.randn(k, k, dtype=torch.float64)).Q
    return U, outside + U @ (0.1 * torch.randn(r, k, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("condition", [1.0, 60.0], ids=["well-conditioned", "kappa-60"])
def test_new_directions_are_orthonormal_outside_u(dtype, condition, monkeypatch):
    """float32: R from a Cholesky of the float64 Gram (no geqrf); float64: Householder. Both
    give Q ⟂ U orthonormal to ~eps κ and (I - UUᵀ) direction = Q R. κ = 60 is about the
    largest the fold accepts at k = 40; a float32 Gram there would be off by ~4 eps κ."""
    U, direction = (t.to(dtype) for t in _direction(500, 6, 40, condition))
    projected = direction - U @ (U.T @ direction)
    if dtype == torch.float32:
        def no_geqrf(*args, **kwargs):
            raise AssertionError("float32 directions take the Cholesky route")
        monkeypatch.setattr(torch, "geqrf", no_geqrf)
    new, R = dlrt_module._new_directions(U, direction.clone(), U.T @ direction)
    assert new.coeffs is not None  # folded: Q = D R⁻¹
    Q = new.augmented_times(U, torch.cat([torch.zeros(6, 40, dtype=dtype), torch.eye(40, dtype=dtype)]))
    eps = torch.finfo(dtype).eps
    assert float((Q.T @ Q - torch.eye(40, dtype=dtype)).abs().max()) < eps * (20 + 2 * condition)
    assert float((U.T @ Q).abs().max()) < eps * (20 + 2 * condition)
    assert torch.equal(R, R.triu())
    torch.testing.assert_close(Q @ R, projected, rtol=0, atol=50 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_new_directions_take_the_projected_householder_route(dtype):
    """A direction of rank 2 in 5 columns: no Cholesky factor / R⁻¹ too large, so Q is Householder's, projected."""
    U, direction = _direction(200, 4, 5, 1.0)
    direction = (direction[:, :2] @ torch.randn(2, 5, dtype=torch.float64)).to(dtype)
    U = U.to(dtype)
    new, R = dlrt_module._new_directions(U, direction.clone(), U.T @ direction)
    assert new.coeffs is None  # Q itself, not D R⁻¹
    Q = new.basis
    eps = torch.finfo(dtype).eps
    assert float((Q.T @ Q - torch.eye(5, dtype=dtype)).abs().max()) < 100 * eps
    assert float((U.T @ Q).abs().max()) < 100 * eps
    torch.testing.assert_close(Q @ R, direction - U @ (U.T @ direction), rtol=0, atol=100 * eps * float(direction.abs().max()))


@pytest.mark.parametrize("tol", [0.05, 0.3])
def test_truncation_keeps_the_best_rank_given_by_tol(tol):
    layer = _layer(20, 16, 5)
    x, dy = torch.randn(40, 20, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    exact = _tangent_step(layer, x, dy, 0.5)
    r1 = max(2, truncation_rank(torch.linalg.svdvals(exact), tol))
    dlrt = sk.DLRT(layer, 0.5, tol=tol)
    _backward(layer, x, dy)
    dlrt.step()
    assert layer.rank == r1 == dlrt.ranks()[0]
    torch.testing.assert_close(layer.dense_weight().detach(), _best_rank(exact, r1), rtol=1e-9, atol=1e-9)
    assert _orthonormality_error(layer) < 1e-12


def test_absolute_tolerance_and_rank_bounds():
    x, dy = torch.randn(40, 20, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    for kwargs, check in [(dict(tol=1e9, absolute=True, rmin=3), lambda r: r == 3),
                          (dict(tol=0.0, rmax=7), lambda r: r == 7),
                          (dict(tol=0.0), lambda r: r == 10)]:   # 2r: the augmented basis
        layer = _layer(20, 16, 5)
        dlrt = sk.DLRT(layer, 0.5, **kwargs)
        _backward(layer, x, dy)
        dlrt.step()
        assert check(layer.rank), (kwargs, layer.rank)
        assert layer.U.shape == (16, layer.rank) and layer.V.shape == (20, layer.rank)


def _least_squares(r0, optimizer, lr, steps, seed=0):
    """Fit Y = X W*ᵀ with rank(W*) = 5 starting from rank r0; returns (layer, first loss, last loss)."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(30, 5, generator=g) @ torch.randn(5, 40, generator=g) / 5
    x = torch.randn(400, 40, generator=g)
    y = x @ w_star.T
    torch.manual_seed(seed)
    layer = sk.LowRankLinear(40, 30, r0, bias=False)
    dlrt = sk.DLRT(layer, lr, tol=0.05, optimizer=optimizer)
    losses = []
    for _ in range(steps):
        loss = (layer(x) - y).square().sum(1).mean()
        loss.backward()
        dlrt.step()
        dlrt.zero_grad()
        losses.append(loss.item())
        assert _orthonormality_error(layer) < 1e-5
    return layer, losses[0], losses[-1]


@pytest.mark.parametrize("optimizer,r0,lr,steps", [("sgd", 20, 0.2, 120), ("sgd", 2, 0.2, 120), ("adam", 20, 0.1, 200)],
                         ids=["sgd-from-above", "sgd-from-below", "adam-from-above"])
def test_rank_5_least_squares_ends_at_rank_5(optimizer, r0, lr, steps):
    """From below, the rank grows only while the gradient has K/L components (the
    first steps here); at a stationary point of the rank-r manifold dK = dL = 0."""
    layer, first, last = _least_squares(r0, optimizer, lr, steps)
    assert abs(layer.rank - 5) <= 1
    assert last < 1e-3 * first


def test_adam_state_follows_rank_changes():
    layer = _layer(20, 16, 8, dtype=torch.float32)
    dlrt = sk.DLRT(layer, 0.05, tol=0.4, optimizer="adam")
    x = torch.randn(64, 20)
    ranks = []
    for _ in range(6):
        layer(x).square().sum().backward()
        dlrt.step()
        dlrt.zero_grad()
        r = layer.rank
        ranks.append(r)
        shapes = {name: tuple(dlrt.state[(layer, name)][i].shape) for name in "KLS" for i in (0, 1)}
        assert shapes == {"K": (16, r), "L": (20, r), "S": (r, r)}
        assert all(torch.isfinite(t).all() and (t >= 0).all() for t in (dlrt.state[(layer, n)][1] for n in "KLS"))
    assert ranks[0] < 8  # the rank did change


def test_adam_state_rotation_is_exact_for_permutations_and_signs():
    layer = _layer(6, 5, 3)
    dlrt = sk.DLRT(layer, 0.1, tol=0.0, optimizer="adam")
    m = {n: torch.randn(*s, dtype=torch.float64) for n, s in (("K", (5, 3)), ("L", (6, 3)), ("S", (3, 3)))}
    v = {n: t.square() for n, t in m.items()}
    dlrt.state.update({(layer, n): (m[n], v[n]) for n in "KLS"})
    perm = torch.tensor([[0.0, -1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # new rank 2: drop old 2nd
    dlrt._carry_state(layer, perm, perm)
    (mK, vK), (mS, vS) = dlrt.state[(layer, "K")], dlrt.state[(layer, "S")]
    torch.testing.assert_close(mK, torch.stack([m["K"][:, 2], -m["K"][:, 0]], 1))
    torch.testing.assert_close(vK, torch.stack([v["K"][:, 2], v["K"][:, 0]], 1))
    torch.testing.assert_close(mS, perm.T @ m["S"] @ perm)
    torch.testing.assert_close(vS, mS.square())


def test_other_parameters_get_the_same_rule_and_unused_layers_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(sk.LowRankLinear(8, 6, 2), nn.ReLU(), nn.Linear(6, 3))
    unused = sk.LowRankLinear(4, 4, 2)
    model.add_module("unused", unused)
    dlrt = sk.DLRT(model, 0.1, tol=0.0, rmax=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model[2](model[1](model[0](torch.randn(5, 8)))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    dlrt.step()
    for name in ("0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), before[name] - 0.1 * grads[name])
    torch.testing.assert_close(unused.U.detach(), before["unused.U"])
    assert model[0].kl_grads and unused.kl_grads


def test_rank_deficient_gradient_keeps_bases_orthonormal_over_many_steps():
    layer = _layer(64, 48, 8, dtype=torch.float32)
    dlrt = sk.DLRT(layer, 0.05, tol=0.01, rmax=16)
    for _ in range(dlrt_module._REORTH_EVERY + 5):
        x = torch.randn(2, 64)  # gradient of rank <= 2 every step
        layer(x).sum().backward()
        dlrt.step()
        dlrt.zero_grad()
        assert _orthonormality_error(layer) < 1e-5


def test_bad_arguments():
    layer = _layer(6, 5, 2)
    with pytest.raises(ValueError, match="lr"):
        sk.DLRT(layer, 0.0, tol=0.1)
    with pytest.raises(ValueError, match="tol"):
        sk.DLRT(layer, 0.1, tol=-1)
    with pytest.raises(ValueError, match="rmin"):
        sk.DLRT(layer, 0.1, tol=0.1, rmin=0)
    with pytest.raises(ValueError, match="rmax"):
        sk.DLRT(layer, 0.1, tol=0.1, rmin=3, rmax=2)
    with pytest.raises(ValueError, match="optimizer"):
        sk.DLRT(layer, 0.1, tol=0.1, optimizer="lion")
    with pytest.raises(ValueError, match="no sparsekern.LowRankLinear"):
        sk.DLRT(nn.Linear(3, 3), 0.1, tol=0.1)


@pytest.mark.parametrize("shape", [(96, 96), (130, 70), (70, 130)], ids=["square", "tall", "wide"])
def test_truncated_svd_of_fp32_through_the_float64_gram(shape, monkeypatch):
    """From 64 a side, fp32 Ŝ is factored by eigh of its float64 Gram (no gesdd): σ within fp32
    rounding of float64's, both vector sets orthonormal, matrix Q = P Σ, down to σ = 1e-5 σ₁."""
    torch.manual_seed(0)
    m, n = shape
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64)).Q
    matrix = (left * torch.logspace(0, -5, k, dtype=torch.float64)) @ right.T
    matrix = matrix.float()
    exact = torch.linalg.svdvals(matrix.double())

    def no_gesdd(*args, **kwargs):
        raise AssertionError("fp32 matrices of 64 or more a side take the Gram route")

    monkeypatch.setattr(torch.linalg, "svd", no_gesdd)
    r1 = k - 3
    P, sigma, Q = dlrt_module._truncated_svd(matrix, lambda s: r1)
    assert P.shape == (m, r1) and sigma.shape == (r1,) and Q.shape == (n, r1)
    assert all(t.dtype == torch.float32 for t in (P, sigma, Q))
    eps = torch.finfo(torch.float32).eps
    assert float((sigma.double() - exact[:r1]).abs().max()) < 4 * eps * float(exact[0])
    for vectors in (P, Q):
        assert float((vectors.T @ vectors - torch.eye(r1)).abs().max()) < 50 * eps
    torch.testing.assert_close(matrix @ Q, P * sigma, rtol=0, atol=50 * eps * float(exact[0]))


def test_truncated_svd_keeps_gesdd_where_a_kept_singular_value_is_zero():
    """A kept σ of ~0 (rmin above Ŝ's rank) has no vector from the Gram: gesdd chooses one."""
    torch.manual_seed(0)
    matrix = torch.randn(80, 2) @ torch.randn(2, 80)  # rank 2
    calls = []
    svd = torch.linalg.svd

    def counted(*args, **kwargs):
        calls.append(1)
        return svd(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.linalg, "svd", counted)
        P, sigma, Q = dlrt_module._truncated_svd(matrix, lambda s: 4)
    assert calls and P.shape == (80, 4)
    assert float((P.T @ P - torch.eye(4)).abs().max()) < 1e-5
    assert float((Q.T @ Q - torch.eye(4)).abs().max()) < 1e-5


def test_fp32_step_with_a_gram_svd_is_the_projected_gradient_step():
    """An fp32 layer whose Ŝ is 64 x 64 (r = 32): one step equals the float64 dense step."""
    n_in, n_out, r, tokens = 96, 80, 32, 50
    x, dy = torch.randn(tokens, n_in, dtype=torch.float64), torch.randn(tokens, n_out, dtype=torch.float64)
    reference = _layer(n_in, n_out, r)
    expected = _tangent_step(reference, x, dy, 0.1)
    layer = _layer(n_in, n_out, r, dtype=torch.float32)  # the same initialization, rounded
    dlrt = sk.DLRT(layer, 0.1, tol=0.0, rmin=1, rmax=2 * r)
    _backward(layer, x.float(), dy.float())
    dlrt.step()
    assert layer.rank == 2 * r
    scale = float(expected.abs().max())
    torch.testing.assert_close(layer.dense_weight().detach().double(), expected, rtol=0, atol=1e-5 * scale)
    assert _orthonormality_error(layer) < 1e-5


def test_svd_failure_falls_back_to_float64(monkeypatch):
    """gesdd can fail to converge on Ŝ (many ~0 singular values); the step must still be exact."""
    layer = _layer(13, 11, 3, dtype=torch.float32)
    x, dy = torch.randn(20, 13), torch.randn(20, 11)
    expected = _tangent_step(_layer(13, 11, 3), x.double(), dy.double(), 0.3).float()  # same init in fp64
    svd, calls = torch.linalg.svd, []

    def flaky_svd(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    dlrt = sk.DLRT(layer, 0.3, tol=0.0, rmin=1)
    _backward(layer, x, dy)
    dlrt.step()
    assert calls == [torch.float32, torch.float64] and layer.S.dtype == torch.float32
    torch.testing.assert_close(layer.dense_weight().detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_a_checkpoint_is_bit_exact(optimizer, tmp_path):
    def run(model, dlrt, steps, x):
        for _ in range(steps):
            (model(x) - 1).square().mean().backward()
            dlrt.step()
            dlrt.zero_grad()

    def fresh(seed=0):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(sk.LowRankLinear(20, 16, 8), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return model, sk.DLRT(model, 0.05, tol=0.3, optimizer=optimizer)

    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    straight, straight_dlrt = fresh()
    run(straight, straight_dlrt, 12, x)

    first, first_dlrt = fresh()
    run(first, first_dlrt, 5, x)
    torch.save({"model": first.state_dict(), "dlrt": first_dlrt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, resumed_dlrt = fresh(seed=7)  # other initial values and rank history
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(checkpoint["model"])
    resumed_dlrt.load_state_dict(checkpoint["dlrt"])
    run(resumed, resumed_dlrt, 7, x)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_model_is_refused():
    model = torch.nn.Sequential(sk.LowRankLinear(20, 16, 8))
    dlrt = sk.DLRT(model, 0.05, tol=0.3, optimizer="adam")
    with pytest.raises(ValueError, match="parameter 'missing'"):
        dlrt.load_state_dict({"steps": 1, "moments": {"params.missing": (torch.zeros(1), torch.zeros(1))}})
