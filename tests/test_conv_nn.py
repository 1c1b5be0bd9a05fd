"""``SparseConv2d`` as a drop-in nn.Conv2d: outputs and gradients against the nn.Conv2d it
stands for, padding forms, unbatched and empty batches, dtypes and autocast, structure
changes, state_dict, dense conversions and clear errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from helpers import relative_error
from sparsekern.kernels.conv import gather_blocks

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")]
CPU = torch.device("cpu")

# (in, out, kernel, kwargs of the layer, block, input (H, W))
CONFIGS = {
    "3x3-uneven": (10, 13, 3, dict(padding=1), 4, (6, 5)),
    "stride2-dilation2": (12, 8, 3, dict(stride=2, padding=2, dilation=2), 4, (9, 11)),
    "same-even-kernel": (7, 9, (2, 4), dict(padding="same"), 4, (6, 8)),
    "valid-5x5": (6, 8, 5, dict(padding="valid"), 4, (7, 9)),
    "groups2": (12, 16, 3, dict(padding=(0, 1), groups=2), 4, (5, 7)),
    "1x1-no-bias": (20, 24, 1, dict(bias=False), 8, (4, 4)),
}


def _layer(name, density=0.6, dtype=torch.float64, seed=0):
    c, o, k, kwargs, bs, _ = CONFIGS[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny grids may leave block rows empty: fine here
        return sk.SparseConv2d(c, o, k, **kwargs, block_size=bs, density=density, dtype=dtype)


def _input(name, batch=2, dtype=torch.float64, channels_last=True, seed=1):
    c, _, _, _, _, hw = CONFIGS[name]
    x = torch.randn(batch, c, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _grads(module, x):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward((torch.arange(y.numel()) % 3 + 1).view(y.shape).to(y.dtype))
    params = [p.grad for p in module.parameters()]
    return y, x.grad, params


@pytest.mark.parametrize("backend", [None, "cpu"], ids=["auto", "cpu"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_dense_conv_it_stands_for(name, channels_last, backend):
    if backend is not None and backend not in sk.kernels.available_backends("conv_forward", CPU, torch.float64):
        pytest.skip(f"backend {backend} cannot run here")
    layer = _layer(name)
    dense = layer.to_dense()
    x = _input(name, channels_last=channels_last)
    with sk.use_backend(backend):
        y, dx, (dvalues, *dbias) = _grads(layer, x)
    y_ref, dx_ref, (dweight, *dbias_ref) = _grads(dense, x)
    assert torch.allclose(y, y_ref, atol=1e-10) and torch.allclose(dx, dx_ref, atol=1e-10)
    assert torch.allclose(dvalues, gather_blocks(dweight, layer.layout(), layer.geometry), atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(dbias, dbias_ref))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_padding_forms_match_f_conv2d():
    for name, padding in (("same-even-kernel", "same"), ("valid-5x5", "valid")):
        layer, x = _layer(name), _input(name)
        expected = F.conv2d(x, layer.dense_weight(), layer.bias, padding=padding)
        assert torch.allclose(layer(x), expected, atol=1e-10)


def test_unbatched_and_empty_batches():
    layer = _layer("3x3-uneven")
    x = _input("3x3-uneven")
    assert torch.allclose(layer(x[0]), layer(x)[0], atol=1e-12)
    empty = _input("3x3-uneven", batch=0).requires_grad_()
    y = layer(empty)
    assert y.shape == (0, 13, 6, 5)
    y.sum().backward()
    assert empty.grad.shape == empty.shape and not layer.values.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_layers(dtype):
    layer = _layer("groups2", dtype=dtype)
    x = _input("groups2", dtype=dtype)
    y, dx, (dvalues, _) = _grads(layer, x)
    reference = _layer("groups2").to_dense()
    with torch.no_grad():
        reference.weight.copy_(layer.dense_weight().double())
        reference.bias.copy_(layer.bias.double())
    y_ref, dx_ref, (dweight, _) = _grads(reference, x.double())
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and relative_error(y, y_ref) < bound and relative_error(dx, dx_ref) < bound
    assert relative_error(dvalues, gather_blocks(dweight, layer.layout(), layer.geometry)) < bound


def test_autocast_computes_in_low_precision_with_fp32_masters():
    layer = _layer("3x3-uneven", dtype=torch.float32)
    x = _input("3x3-uneven", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_dense = layer.to_dense()(x)
    assert y.dtype == y_dense.dtype == torch.bfloat16
    assert relative_error(y, y_dense) < 2e-2
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32


def test_set_block_mask_restructure_and_carry():
    layer = _layer("3x3-uneven", density=0.5)
    old_mask, old_values, param = layer.block_mask.clone(), layer.values.detach().clone(), layer.values
    new_mask = old_mask.clone()
    new_mask[0] = ~new_mask[0]
    slots = layer.restructure(new_mask)
    assert layer.values is param and layer.values.shape[0] == int(new_mask.sum()) == layer.nnz_blocks
    kept = slots >= 0
    assert torch.equal(layer.values.detach()[kept], old_values[slots[kept]])
    assert not layer.values.detach()[~kept].any()
    moments = torch.randn(old_values.shape, dtype=old_values.dtype)
    moved = layer.carry(moments, slots)
    assert torch.equal(moved[kept], moments[slots[kept]]) and not moved[~kept].any()
    layer.set_block_mask(old_mask)
    assert torch.equal(layer.block_mask, old_mask) and layer.mask is layer.block_mask
    x = _input("3x3-uneven")
    assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-10)


def test_restructure_refuses_a_layout_of_another_shape():
    layer = _layer("3x3-uneven")
    other = _layer("groups2")
    with pytest.raises(ValueError, match="does not fit"):
        layer.restructure(other.layout())
    with pytest.raises(ValueError, match="values has shape"):
        layer.restructure(layer.block_mask, values=layer.values.detach()[:1])


def test_state_dict_round_trip_with_another_nnz():
    source = _layer("groups2", density=0.8, seed=3)
    target = _layer("groups2", density=0.3, seed=4)
    assert source.nnz_blocks != target.nnz_blocks
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.block_mask, source.block_mask) and target.nnz_blocks == source.nnz_blocks
    x = _input("groups2")
    assert torch.equal(target(x), source(x))
    wrong = sk.SparseConv2d(11, 16, 3, padding=(0, 1), groups=1, block_size=4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong.load_state_dict(_layer("3x3-uneven").state_dict())


def test_from_dense_and_back():
    conv = nn.Conv2d(10, 13, 3, padding=1, dtype=torch.float64)
    exact = sk.SparseConv2d.from_dense(conv, block_size=4)
    assert exact.density == 1.0 and torch.equal(exact.dense_weight(), conv.weight)
    x = _input("3x3-uneven")
    assert torch.allclose(exact(x), conv(x), atol=1e-10)
    with torch.no_grad():
        conv.weight[:4, :4] = 0  # one block holds only zeros
    assert sk.SparseConv2d.from_dense(conv, block_size=4).nnz_blocks == exact.nnz_blocks - 1
    top = sk.SparseConv2d.from_dense(conv, block_size=4, density=0.25)
    norms = conv.weight.detach().reshape(13, 10, 9)
    assert top.nnz_blocks == round(0.25 * 12)
    dense = top.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.padding == conv.padding
    kept = top.dense_weight().detach().reshape(13, 10, 9)
    assert kept.norm() > 0 and torch.equal(kept[kept != 0], norms[kept != 0])
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1, 2] = True
    assert torch.equal(sk.SparseConv2d.from_dense(conv, block_size=4, block_mask=mask).block_mask, mask)


def test_reset_parameters_is_nn_conv2d_init_on_stored_blocks():
    layer = _layer("3x3-uneven", density=1.0)
    bound = 1 / (10 * 9) ** 0.5
    weight = layer.dense_weight()
    assert weight.abs().max() <= bound and weight.abs().max() > bound / 2
    assert layer.values.detach()[layer.layout().row_indices == 3][:, 1:].abs().sum() == 0  # channels 13..15: padding


@pytest.mark.parametrize("make, error, message", [
    (lambda: sk.SparseConv2d(8, 8, 3, padding_mode="reflect", block_size=4), ValueError, "padding_mode='zeros'"),
    (lambda: sk.SparseConv2d(8, 12, 3, groups=2, block_size=4), ValueError, "out_channels / groups = 6"),
    (lambda: sk.SparseConv2d(8, 9, 3, groups=2, block_size=4), ValueError, "divisible by groups"),
    (lambda: sk.SparseConv2d(8, 8, 3, padding="full", block_size=4), ValueError, "'full'"),
    (lambda: sk.SparseConv2d(8, 8, 3, stride=2, padding="same", block_size=4), ValueError, "strided"),
    (lambda: sk.SparseConv2d(8, 8, 0, block_size=4), ValueError, "kernel_size"),
    (lambda: sk.SparseConv2d(8, 8, 3, block_size=4, density=1.5), ValueError, "density"),
    (lambda: sk.SparseConv2d.from_dense(nn.Linear(3, 3)), TypeError, "nn.Conv2d"),
])
def test_construction_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_forward_errors_name_the_offending_value():
    layer = _layer("3x3-uneven")
    with pytest.raises(ValueError, match="has 9 channels"):
        layer(torch.randn(2, 9, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got shape \(10, 6\)"):
        layer(torch.randn(10, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.float32 but the weight has dtype torch.float64"):
        layer(torch.randn(2, 10, 6, 5))


def test_crippled_layer_warning_and_repr():
    with pytest.warns(UserWarning, match=r"SparseConv2d\(64, 64, .*stores no block"):
        sk.SparseConv2d(64, 64, 3, block_size=32, density=0.1)
    text = repr(_layer("groups2"))
    assert "SparseConv2d(12, 16, kernel_size=(3, 3)" in text and "groups=2" in text and "block_size=4" in text


def test_meta_device_is_refused_clearly():
    with pytest.raises(ValueError, match="SparseConv2d cannot be built on the meta device"):
        sk.SparseConv2d(32, 32, 3, block_size=16, density=0.5, device="meta")
