"""LowRankConv2d against F.conv2d with its dense kernel U S Vᵀ, gradients against autograd through the
dense composition (fp64), conversions, state dicts, autocast and bad arguments."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from helpers import output_and_grads
from sparsekern.formats.lowrank import truncation_rank

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # the dense reference's own notice about "same" with even kernels
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")]

F64 = torch.float64

# (in, out, kernel, rank, conv keyword arguments, input height, width)
SHAPES = {
    "3x3-pad1": (3, 5, 3, 2, dict(padding=1), 9, 8),
    "stride2": (4, 7, 3, 3, dict(stride=2, padding=1), 11, 10),
    "dilation2": (5, 6, 3, 4, dict(dilation=2, padding=(2, 1)), 10, 9),
    "same-even-kernel": (3, 7, (4, 2), 5, dict(padding="same"), 7, 9),
    "same-dilated": (2, 5, 3, 2, dict(padding="same", dilation=(2, 3)), 8, 11),
    "valid-5x5": (7, 11, 5, 6, dict(padding="valid"), 9, 12),
    "1x1": (13, 6, 1, 6, dict(), 5, 3),
    "rank1-rect-stride": (6, 9, (3, 5), 1, dict(stride=(2, 3), padding=(0, 2)), 12, 13),
}


def _dense_conv(layer, x, U, S, V, bias):
    """F.conv2d with the dense kernel U S Vᵀ (built differentiably, its gradient kept), padding as nn.Conv2d."""
    weight = U @ S @ V.T
    weight.retain_grad()
    kernel = weight.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
    return F.conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation), weight


def _layer(name, bias=True, dtype=F64, seed=0):
    n_in, n_out, k, r, kwargs, h, w = SHAPES[name]
    torch.manual_seed(seed)
    layer = sk.LowRankConv2d(n_in, n_out, k, r, bias=bias, dtype=dtype, **kwargs)
    with torch.no_grad():  # S off the diagonal and a bias far from 0: every term is visible
        layer.S.add_(0.3 * torch.randn_like(layer.S))
    return layer, (n_in, h, w)


@pytest.mark.parametrize("kl_grads", [False, True], ids=["factor-grads", "kl-grads"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_and_gradients_match_the_dense_composition(name, bias, kl_grads):
    layer, (n_in, h, w) = _layer(name, bias)
    layer.kl_grads = kl_grads
    x = torch.randn(3, n_in, h, w, dtype=F64, requires_grad=True)
    y = layer(x)
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.U, layer.S, layer.V)]
    b = layer.bias.detach().clone().requires_grad_() if bias else None
    expected, weight = _dense_conv(layer, *leaves, b)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)

    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    dx, dU, dS, dV = (t.grad for t in leaves)
    if kl_grads:  # the K/L-gradients dW V and dWᵀ U of the dense kernel gradient dW
        dU, dV = weight.grad @ leaves[3].detach(), weight.grad.T @ leaves[1].detach()
    for got, want in ((x.grad, dx), (layer.U.grad, dU), (layer.S.grad, dS), (layer.V.grad, dV)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kl_grads", [False, True])
def test_gradcheck_fp64(kl_grads):
    layer, (n_in, h, w) = _layer("same-even-kernel")
    layer.kl_grads = kl_grads
    x = torch.randn(2, n_in, h, w, dtype=F64, requires_grad=True)
    U, S, V, bias = (t.detach().clone().requires_grad_() for t in (layer.U, layer.S, layer.V, layer.bias))

    def run(x, S, bias, U=U, V=V):
        return torch.func.functional_call(layer, {"U": U, "S": S, "V": V, "bias": bias}, (x,))

    if kl_grads:  # kl mode's U and V gradients are not derivatives: x, S and bias only
        assert torch.autograd.gradcheck(run, (x, S, bias))
    else:
        assert torch.autograd.gradcheck(run, (x, S, bias, U, V))


def test_matches_nn_conv2d_from_to_dense_and_unbatched_input():
    for name in SHAPES:
        layer, (n_in, h, w) = _layer(name)
        conv = layer.to_dense()
        assert isinstance(conv, nn.Conv2d) and conv.padding == layer.padding
        x = torch.randn(2, n_in, h, w, dtype=F64)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x[0]), conv(x[0]), rtol=1e-12, atol=1e-12)


def test_batch_zero():
    layer, (n_in, h, w) = _layer("stride2")
    x = torch.randn(0, n_in, h, w, dtype=F64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, layer.out_channels, 6, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_channels_last_input():
    layer, (n_in, h, w) = _layer("dilation2")
    x = torch.randn(2, n_in, h, w, dtype=F64)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    y, yc = layer(x), layer(xc)
    torch.testing.assert_close(yc, y, rtol=1e-12, atol=1e-12)
    yc.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    xp = x.clone().requires_grad_()
    layer(xp).square().sum().backward()
    for got, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xc.grad, xp.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_full_rank_is_exact(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=bias, dtype=F64)
    layer = sk.LowRankConv2d.from_dense(conv)
    assert layer.rank == 8 and layer.stride == (2, 2) and layer.dilation == (1, 2)
    torch.testing.assert_close(layer.dense_weight(), conv.weight, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    round_trip = layer.to_dense()
    torch.testing.assert_close(round_trip.weight, conv.weight, rtol=1e-12, atol=1e-12)
    assert (round_trip.bias is None) == (not bias)


def test_from_dense_truncates_by_rank_or_tol():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 10, 3, padding="same", dtype=F64)
    matrix = conv.weight.detach().reshape(10, -1)
    s = torch.linalg.svdvals(matrix)
    for kwargs, r in [(dict(rank=3), 3), (dict(tol=0.3), truncation_rank(s, 0.3))]:
        layer = sk.LowRankConv2d.from_dense(conv, **kwargs)
        assert layer.rank == r and 1 <= r < 10
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(layer.dense_weight().reshape(10, -1), best, rtol=1e-10, atol=1e-12)
        assert layer.padding == "same"


def test_state_dict_round_trip_adopts_the_saved_rank():
    torch.manual_seed(0)
    saved = sk.LowRankConv2d(3, 6, 3, 5, padding=1)
    other = sk.LowRankConv2d(3, 6, 3, 2, padding=1)
    other.load_state_dict(saved.state_dict())
    assert other.rank == 5
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(other(x), saved(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        sk.LowRankConv2d(4, 6, 3, 2).load_state_dict(saved.state_dict())


def test_densify_turns_it_into_nn_conv2d():
    torch.manual_seed(0)
    model = nn.Sequential(sk.LowRankConv2d(3, 6, 3, 2, padding=1), nn.ReLU(), nn.Flatten(), sk.LowRankLinear(96, 4, 2))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    sk.densify(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_initial_output_scale_matches_nn_conv2d():
    torch.manual_seed(0)
    layer, conv = sk.LowRankConv2d(16, 64, 3, 16), nn.Conv2d(16, 64, 3)
    x = torch.randn(8, 16, 12, 12)
    with torch.no_grad():
        ratio = (layer(x) - layer.bias[:, None, None]).std() / (conv(x) - conv.bias[:, None, None]).std()
    assert 0.7 < float(ratio) < 1.4


def test_autocast_matches_nn_conv2d():
    torch.manual_seed(0)
    layer = sk.LowRankConv2d(4, 8, 3, 3, padding=1)
    conv = layer.to_dense()
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = layer(x), conv(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    for param in layer.parameters():
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layers_run(dtype):
    torch.manual_seed(0)
    layer = sk.LowRankConv2d(4, 8, 3, 3, padding=1, dtype=dtype)
    x = torch.randn(2, 4, 6, 6, dtype=dtype, requires_grad=True)
    expected = F.conv2d(x.detach().float(), layer.dense_weight().detach().float(), layer.bias.detach().float(),
                        padding=1)
    y = layer(x)
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert all(p.grad.dtype == dtype for p in layer.parameters()) and x.grad.dtype == dtype


def test_set_factors_replaces_parameters_only_when_the_rank_changes():
    layer = sk.LowRankConv2d(3, 6, 3, 4)
    U = layer.U
    layer.set_factors(torch.zeros(6, 4), torch.eye(4), torch.zeros(27, 4))
    assert layer.U is U
    layer.set_factors(torch.zeros(6, 2), torch.eye(2), torch.zeros(27, 2))
    assert layer.U is not U and layer.rank == 2 and layer.V.shape == (27, 2)
    with pytest.raises(ValueError, match="do not fit a kernel of 6x27"):
        layer.set_factors(torch.zeros(6, 2), torch.eye(2), torch.zeros(9, 2))


def test_backward_across_new_factors_is_refused():
    layer = sk.LowRankConv2d(3, 6, 3, 4)
    y = layer(torch.randn(1, 3, 5, 5))
    layer.set_factors(layer.U, layer.S, layer.V)
    with pytest.raises(RuntimeError, match="LowRankConv2d: a weight used by this forward was replaced"):
        y.sum().backward()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_channels=0), ValueError, "in_channels must be a positive int, got 0"),
    (dict(out_channels=2.0), ValueError, "out_channels must be a positive int, got 2.0"),
    (dict(kernel_size=(3, 0)), ValueError, r"kernel_size must be an int >= 1 or a pair of them, got \(3, 0\)"),
    (dict(stride=0), ValueError, "stride must be an int >= 1"),
    (dict(dilation=(1, 2, 3)), ValueError, "dilation must be"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0 or a pair of them, got -1"),
    (dict(padding="full"), ValueError, "padding must be 'same', 'valid'.*got 'full'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(rank=7), ValueError, r"rank must be an int in \[1, 6\] .* got 7"),
    (dict(rank=0), ValueError, r"rank must be an int in \[1, 6\]"),
    (dict(dtype=torch.int32), TypeError, "LowRankConv2d supports dtypes"),
])
def test_bad_arguments_name_the_value(kwargs, error, match):
    args = dict(in_channels=3, out_channels=6, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sk.LowRankConv2d(**args)


def test_bad_inputs_and_conversions_name_the_problem():
    layer = sk.LowRankConv2d(3, 6, 3, 2)
    with pytest.raises(ValueError, match=r"input has shape \(2, 4, 5, 5\), expected \(N, 3, H, W\)"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"input has shape \(5, 3\)"):
        layer(torch.randn(5, 3))
    with pytest.raises(TypeError, match="input must be a tensor, got list"):
        layer([1.0])
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the layer's factors have dtype"):
        layer(torch.randn(1, 3, 5, 5, dtype=F64))
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        sk.LowRankConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="groups=1 and padding_mode='zeros', got groups=3"):
        sk.LowRankConv2d.from_dense(nn.Conv2d(3, 6, 3, groups=3))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sk.LowRankConv2d.from_dense(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="either rank or tol"):
        sk.LowRankConv2d.from_dense(nn.Conv2d(3, 6, 3), rank=2, tol=0.1)


def test_torch_compile_traces_forward_and_backward_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Each low-rank layer's input gradient reaches a parameter below it (the leading 1x1 conv's).
    model = nn.Sequential(nn.Conv2d(3, 3, 1), sk.LowRankConv2d(3, 8, 3, 2, padding=1), nn.ReLU(),
                          sk.LowRankConv2d(8, 5, (3, 2), 3, stride=2, bias=False))
    x = torch.randn(2, 3, 9, 8)
    y_eager, grads_eager = output_and_grads(model, x)
    y_compiled, grads_compiled = output_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch.testing.assert_close(y_compiled, y_eager)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want)
