"""bsr_linear (forward, dX, dW, bias, grad_probe) against the dense masked computation,
on every backend that can run CPU tensors here."""
import pytest
import torch

import sparsekern as sk
from helpers import TOLERANCES, random_bsr, stored_blocks

CPU = torch.device("cpu")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cases():
    for dtype in DTYPES:
        for backend in sk.kernels.available_backends("bsr_forward", CPU, dtype):
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype).split('.')[-1]}")


BACKEND_DTYPE = list(_cases())

# (out, in), block, density, empty block rows, empty block cols
STRUCTURES = {
    "sq16-half": ((64, 96), 16, 0.5, (), ()),
    "rect16x8-empty-row-col": ((48, 80), (16, 8), 0.6, (1,), (0, 7)),
    "rect8x24": ((40, 72), (8, 24), 0.4, (), ()),
    "dense": ((32, 48), 16, 1.0, (), ()),
    "empty": ((32, 48), 16, 0.0, (), ()),
    "single-block": ((32, 32), 32, 1.0, (), ()),
}


def _dense_masked_reference(x, weight, bias, dy):
    x = x.detach().double().requires_grad_()
    w = weight.to_dense().detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    y = x @ w.T + (0 if b is None else b)
    y.backward(dy.double())
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPE)
@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=["M7", "batch2x3"])
def test_forward_and_gradients_match_dense_masked(backend, dtype, name, lead):
    shape, block, density, empty_rows, empty_cols = STRUCTURES[name]
    weight = random_bsr(shape, block, density, dtype=dtype, seed=1, empty_rows=empty_rows, empty_cols=empty_cols)
    weight.values.requires_grad_()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, shape[1], generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(*lead, shape[0], generator=g, dtype=torch.float64).to(dtype)

    with sk.use_backend(backend):
        y = sk.ops.bsr_linear(x, weight, bias)
        y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = _dense_masked_reference(x, weight, bias, dy)

    tol = TOLERANCES[dtype]
    assert y.shape == (*lead, shape[0]) and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), dx_ref, **tol)
    torch.testing.assert_close(bias.grad.double(), db_ref, **tol)
    # The sparse operand's gradient is the dense gradient restricted to its stored blocks.
    assert weight.values.grad.shape == weight.values.shape
    torch.testing.assert_close(weight.values.grad.double(), stored_blocks(dw_ref, weight.layout), **tol)


@pytest.mark.parametrize("backend", sk.kernels.available_backends("bsr_forward", CPU, torch.float64))
def test_gradcheck_fp64(backend):
    weight = random_bsr((24, 40), (8, 5), 0.5, seed=4)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return sk.ops.bsr_linear(x, sk.BlockSparseMatrix(values, weight.layout), bias)

    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, weight.values.clone().requires_grad_(), bias))


@pytest.mark.parametrize("backend,dtype", [c for c in BACKEND_DTYPE if c.values[1] in (torch.float64, torch.float32)])
@pytest.mark.parametrize("probe_density", [1.0, 0.3], ids=["dense-scores", "partial"])
def test_grad_probe_receives_sampled_gradient_on_its_blocks(backend, dtype, probe_density):
    weight = random_bsr((48, 64), 16, 0.4, dtype=dtype, seed=5)
    weight.values.requires_grad_()
    probe_mask = weight.block_mask.clone() if probe_density == 1.0 else torch.rand(3, 4) < probe_density
    if probe_density == 1.0:
        probe_mask[:] = True
    probe = sk.BlockSparseMatrix.from_dense(torch.zeros(48, 64, dtype=dtype), 16, block_mask=probe_mask)
    probe.values.requires_grad_()
    x = torch.randn(5, 64, dtype=dtype)
    dy = torch.randn(5, 48, dtype=dtype)
    with sk.use_backend(backend):
        y = sk.ops.bsr_linear(x, weight, grad_probe=probe)
        y.backward(dy)
    dense_grad = dy.double().T @ x.double()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), x.double() @ weight.to_dense().detach().double().T, **tol)
    torch.testing.assert_close(probe.values.grad.double(), stored_blocks(dense_grad, probe.layout), **tol)
    torch.testing.assert_close(weight.values.grad.double(), stored_blocks(dense_grad, weight.layout), **tol)


def test_no_weight_gradient_when_values_do_not_require_grad():
    weight = random_bsr((32, 32), 16, 0.5, dtype=torch.float32)
    x = torch.randn(4, 32, requires_grad=True)
    sk.ops.bsr_linear(x, weight).sum().backward()
    assert weight.values.grad is None and x.grad is not None


def test_zero_tokens():
    weight = random_bsr((32, 48), 16, 0.5, dtype=torch.float32)
    weight.values.requires_grad_()
    x = torch.randn(0, 48, requires_grad=True)
    y = sk.ops.bsr_linear(x, weight)
    y.sum().backward()
    assert y.shape == (0, 32)
    assert torch.equal(weight.values.grad, torch.zeros_like(weight.values))


class TestBadInput:
    weight = random_bsr((32, 48), 16, 0.5, dtype=torch.float32)

    def test_wrong_last_dim(self):
        with pytest.raises(ValueError, match=r"\(4, 40\).*\(32, 48\).*48"):
            sk.ops.bsr_linear(torch.randn(4, 40), self.weight)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="torch.float64.*torch.float32"):
            sk.ops.bsr_linear(torch.randn(4, 48, dtype=torch.float64), self.weight)

    def test_integer_input(self):
        weight = sk.BlockSparseMatrix.from_dense(torch.ones(16, 16, dtype=torch.int64), 8)
        with pytest.raises(TypeError, match="floating"):
            sk.ops.bsr_linear(torch.ones(2, 16, dtype=torch.int64), weight)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="meta.*cpu"):
            sk.ops.bsr_linear(torch.randn(4, 48, device="meta"), self.weight)

    def test_weight_not_block_sparse(self):
        with pytest.raises(TypeError, match="BlockSparseMatrix.*Tensor"):
            sk.ops.bsr_linear(torch.randn(4, 48), torch.randn(32, 48))

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias has shape \(31,\).*\(32,\)"):
            sk.ops.bsr_linear(torch.randn(4, 48), self.weight, torch.randn(31))

    def test_probe_structure(self):
        probe = random_bsr((32, 48), (16, 8), 1.0, dtype=torch.float32)
        with pytest.raises(ValueError, match="grad_probe"):
            sk.ops.bsr_linear(torch.randn(4, 48), self.weight, grad_probe=probe)


class TestBackendForcing:
    def test_unknown_backend_name(self):
        with pytest.raises(ValueError, match="'nope'.*reference"):
            with sk.use_backend("nope"):
                pass

    def test_forcing_a_backend_that_cannot_run_raises(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        weight = random_bsr((16, 16), 8, 1.0, dtype=torch.float32)
        with pytest.raises(sk.BackendUnavailableError, match="'(triton|cuda)'"):
            with sk.use_backend("cuda"):
                sk.ops.bsr_linear(torch.randn(2, 16), weight)

    def test_forced_backend_is_restored(self):
        with sk.use_backend("reference"):
            assert sk.kernels.forced_backend() == "reference"
        assert sk.kernels.forced_backend() is None

    def test_reference_always_available(self):
        name, _ = sk.kernels.select_kernel("bsr_forward", CPU, torch.float16)
        assert name in sk.kernels.available_backends("bsr_forward", CPU, torch.float16)
