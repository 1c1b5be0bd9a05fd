import io
import warnings

import pytest
import torch
from torch import nn

import sparsekern as sk
from helpers import TOLERANCES


@pytest.mark.parametrize("in_f,out_f,block", [(64, 32, 16), (70, 50, 16), (33, 17, (8, 16)), (5, 3, 32)],
                         ids=["divisible", "padded", "rect-padded", "smaller-than-block"])
def test_from_dense_is_exact(in_f, out_f, block):
    linear = nn.Linear(in_f, out_f).double()
    layer = sk.SparseLinear.from_dense(linear, block_size=block)
    x = torch.randn(4, 3, in_f, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), **TOLERANCES[torch.float64])
    assert torch.equal(layer.dense_weight(), linear.weight)
    assert layer.density == 1.0


def test_from_dense_density_keeps_largest_blocks():
    linear = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.mul_(0.01)
        linear.weight[:16, 32:48] = 5.0
        linear.weight[48:, :16] = -4.0
    layer = sk.SparseLinear.from_dense(linear, block_size=16, density=2 / 16)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = expected[3, 0] = True
    assert torch.equal(layer.block_mask, expected)
    assert layer.bias is None


def test_from_dense_with_block_mask():
    linear = nn.Linear(32, 32)
    mask = torch.tensor([[True, False], [False, True]])
    layer = sk.SparseLinear.from_dense(linear, block_size=16, block_mask=mask)
    expected = linear.weight.detach().clone()
    expected[:16, 16:] = expected[16:, :16] = 0
    assert torch.equal(layer.dense_weight(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_training_matches_dense_with_masked_weight(dtype):
    torch.manual_seed(0)
    layer = sk.SparseLinear(40, 24, block_size=8, density=0.5, dtype=dtype)
    dense = nn.Linear(40, 24, dtype=torch.float64)
    mask = layer.block_mask.repeat_interleave(8, 0).repeat_interleave(8, 1)[:24, :40]
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    sparse_opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = torch.randn(6, 40, dtype=torch.float64)
        target = torch.randn(6, 24, dtype=torch.float64)
        for module, opt, inp in ((layer, sparse_opt, x.to(dtype)), (dense, dense_opt, x)):
            opt.zero_grad()
            loss = ((module(inp).double() - target) ** 2).mean()
            loss.backward()
            if module is dense:
                dense.weight.grad.mul_(mask)
            opt.step()
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5),
           torch.bfloat16: dict(rtol=5e-2, atol=5e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(layer.dense_weight().double(), dense.weight.detach(), **tol)
    torch.testing.assert_close(layer.bias.double(), dense.bias.detach(), **tol)


def test_padding_stays_zero_and_gets_zero_gradient():
    layer = sk.SparseLinear(21, 13, block_size=8, dtype=torch.float64)
    layer(torch.randn(5, 21, dtype=torch.float64)).pow(2).sum().backward()
    full = sk.BlockSparseMatrix(layer.values.grad, layer.layout()).to_dense()
    assert torch.equal(full[13:], torch.zeros_like(full[13:]))
    assert torch.equal(full[:, 21:], torch.zeros_like(full[:, 21:]))
    padded_weight = sk.BlockSparseMatrix(layer.values.detach(), layer.layout()).to_dense()
    assert padded_weight[13:].abs().sum() == 0 and padded_weight[:, 21:].abs().sum() == 0


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_density_and_repr(density):
    layer = sk.SparseLinear(64, 64, block_size=16, density=density)
    assert layer.nnz_blocks == round(density * 16)
    assert layer.values.shape == (layer.nnz_blocks, 16, 16)
    assert f"density={layer.density:.4f}" in repr(layer) and "block_size=(16, 16)" in repr(layer)


def test_density_zero_outputs_bias():
    layer = sk.SparseLinear(20, 10, block_size=8, density=0.0)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), layer.bias.expand(3, 10))


def test_set_block_mask_keeps_surviving_values_and_parameter_identity():
    layer = sk.SparseLinear(48, 32, block_size=16, density=0.5, dtype=torch.float64)
    before = layer.dense_weight().detach().clone()
    param = layer.values
    new_mask = torch.zeros_like(layer.block_mask)
    survivor = layer.block_mask.nonzero()[0]
    new_mask[tuple(survivor)] = True
    new_blocks = (~layer.block_mask).nonzero()[:2]
    for rc in new_blocks:
        new_mask[tuple(rc)] = True
    layer.set_block_mask(new_mask)
    after = layer.dense_weight()
    assert layer.values is param and layer.values.shape[0] == int(new_mask.sum())
    r, c = survivor.tolist()
    assert torch.equal(after[16 * r:16 * r + 16, 16 * c:16 * c + 16], before[16 * r:16 * r + 16, 16 * c:16 * c + 16])
    for r, c in new_blocks.tolist():
        assert after[16 * r:16 * r + 16, 16 * c:16 * c + 16].abs().sum() == 0
    layer(torch.randn(2, 48, dtype=torch.float64)).sum().backward()
    assert layer.values.grad.shape == layer.values.shape


def test_structure_change_while_an_old_graph_is_alive():
    layer = sk.SparseLinear(32, 32, block_size=16, density=0.5)
    x = torch.randn(3, 32)
    loss = layer(x).sum()  # kept alive across the change, as a training loop's variable is
    loss.backward()
    layer.set_block_mask(torch.ones_like(layer.block_mask))
    loss = layer(x).sum()
    loss.backward()
    assert layer.values.grad.shape == (4, 16, 16)


def test_state_dict_round_trip_adopts_a_different_structure():
    source = sk.SparseLinear(64, 48, block_size=16, density=0.75)
    target = sk.SparseLinear(64, 48, block_size=16, density=0.25)
    assert source.nnz_blocks != target.nnz_blocks
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.block_mask, source.block_mask)
    assert torch.equal(target.dense_weight(), source.dense_weight())
    x = torch.randn(3, 64)
    torch.testing.assert_close(target(x), source(x))


def test_state_dict_with_wrong_grid_is_an_error():
    source = sk.SparseLinear(64, 48, block_size=16)
    target = sk.SparseLinear(64, 48, block_size=8)
    with pytest.raises(RuntimeError, match="block_mask"):
        target.load_state_dict(source.state_dict())


class TestBadArguments:
    @pytest.mark.parametrize("density", [-0.1, 1.5, "half"])
    def test_density_outside_unit_interval(self, density):
        with pytest.raises(ValueError, match="density"):
            sk.SparseLinear(16, 16, density=density)

    def test_features(self):
        with pytest.raises(ValueError, match="in_features.*0"):
            sk.SparseLinear(0, 16)

    def test_dtype(self):
        with pytest.raises(TypeError, match="torch.int32"):
            sk.SparseLinear(16, 16, dtype=torch.int32)

    def test_input_last_dim(self):
        with pytest.raises(ValueError, match=r"\(2, 15\).*16"):
            sk.SparseLinear(16, 8)(torch.randn(2, 15))

    def test_from_dense_needs_linear(self):
        with pytest.raises(TypeError, match="Conv2d"):
            sk.SparseLinear.from_dense(nn.Conv2d(1, 1, 1))

    def test_block_mask_shape(self):
        layer = sk.SparseLinear(32, 32, block_size=16)
        with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
            layer.set_block_mask(torch.ones(3, 3, dtype=torch.bool))


def test_a_checkpoint_of_another_feature_count_is_refused():
    padded_alike = sk.SparseLinear(60, 32), sk.SparseLinear(50, 32)  # same padded storage (32, 64)
    with pytest.raises(RuntimeError, match=r"size mismatch.*\(32, 60\).*\(32, 50\)"):
        padded_alike[1].load_state_dict(padded_alike[0].state_dict())
    buffer = io.BytesIO()
    torch.save(padded_alike[0].state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        padded_alike[1].load_state_dict(torch.load(buffer))
    padded_alike[1].load_state_dict(sk.SparseLinear(50, 32).state_dict())


def test_a_0d_input_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"input has shape \(\), expected last dim"):
        sk.SparseLinear(8, 4, block_size=4)(torch.tensor(1.0))


def test_padded_output_is_contiguous_like_nn_linear():
    layer = sk.SparseLinear(50, 40, block_size=32)
    y = layer(torch.randn(3, 50))
    assert y.is_contiguous() and y.view(-1).shape == (120,)
    layer_no_bias = sk.SparseLinear(50, 40, bias=False, block_size=32)
    assert layer_no_bias(torch.randn(2, 3, 50)).is_contiguous()


def test_a_non_contiguous_bias_is_accepted():
    weight = sk.BlockSparseMatrix.from_dense(torch.randn(32, 48, dtype=torch.float64), 16)
    bias = torch.randn(64, dtype=torch.float64)[::2]
    x = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(sk.ops.bsr_linear(x, weight, bias), x @ weight.to_dense().T + bias)


@pytest.mark.parametrize("same_nnz", [True, False])
def test_backward_across_a_restructure_is_refused(same_nnz):
    torch.manual_seed(0)
    layer = sk.SparseLinear(32, 32, block_size=8, density=0.5)
    loss = layer(torch.randn(2, 32)).sum()
    new_mask = layer.block_mask.flip(0) if same_nnz else torch.ones_like(layer.block_mask)
    layer.set_block_mask(new_mask)
    with pytest.raises(RuntimeError, match="replaced or modified in place before the backward"):
        loss.backward()
    assert layer.values.grad is None
    layer(torch.randn(2, 32)).sum().backward()  # a fresh forward trains the new structure
    assert layer.values.grad.shape == layer.values.shape


def test_a_structure_that_cripples_the_layer_gets_a_warning_saying_what_to_change():
    with pytest.warns(UserWarning, match=r"stores no block .*use a smaller block_size or a higher density"):
        sk.SparseLinear(64, 64, block_size=300, density=0.1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"output block rows store no block, so those outputs are the bias alone"):
        sk.SparseLinear(64, 64, block_size=16, density=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.SparseLinear(512, 512, block_size=32, density=0.5)
        sk.SparseLinear(64, 64, block_size=16, density=0.0)  # empty on purpose (converters fill it)


@pytest.mark.parametrize("how", ["argument", "context"])
def test_meta_device_is_refused_clearly(how):
    """The stored blocks are data: a meta layer could not know them (nor would to_empty restore them)."""
    with pytest.raises(ValueError, match="SparseLinear cannot be built on the meta device.*sparsify"):
        if how == "argument":
            sk.SparseLinear(64, 48, block_size=16, density=0.5, device="meta")
        else:
            with torch.device("meta"):
                sk.SparseLinear(64, 48, block_size=16, density=0.5)
