"""``LowRankConv2d``: a drop-in ``nn.Conv2d`` whose kernel, as an (out, in·kh·kw) matrix, is W = U S Vᵀ.

Computed as a rank-r convolution with Vᵀ (reshaped to (r, in, kh, kw)) giving
a = conv(x, Vᵀ), then a 1x1 convolution with K = U S and the bias; the dense
kernel is never formed. S is folded into the 1x1 side rather than the rank-r
conv because DLRT's K-gradient dW V = Σ_tokens dy aᵀ needs a itself.

Both products are ``F.conv2d`` calls (and their ``torch.nn.grad`` adjoints):
the rank-r conv is a convolution, and the 1x1 one is a linear map over channels
whose tokens (batch x pixels) are not contiguous rows unless the input is
channels-last; going through ``ops.low_rank_linear`` instead would need the
im2col matrix of x (in·kh·kw times the input's memory).

U, S, V and the DLRT interface (``kl_grads``, ``set_factors``, ``rank``) are
``LowRankFactors``' (``lowrank_factors.py``), shared with ``LowRankLinear``, with
V's rows indexed by (in channel, ky, kx).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import saved_tensors
from ..ops.first_order import first_order
from ..ops.forward_mode import tangent
from ..ops.transforms import dual_level_active, forward_mode, refuse_forward_mode
from .dense_export import dense_conv2d
from .lowrank_factors import LowRankFactors
from .parameter import carry_requires_grad


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _pair(name, value, minimum):
    """``value`` as an (h, w) pair of ints >= minimum."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return tuple(pair)


def _conv_padding(padding, kernel_size, stride, dilation):
    """(symmetric padding for the conv, extra right/bottom padding) for nn.Conv2d's ``padding``.

    "same" with an odd total padding puts the extra pixel on the right/bottom, as torch does."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return tuple(t // 2 for t in total), tuple(t % 2 for t in total)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int >= 0 or a pair of them, got {padding!r}")
    return _pair("padding", padding, 0), (0, 0)


class _LowRankConv2dFunction(torch.autograd.Function):
    """y = conv1x1(conv(x, Vᵀ), U S) + bias with LowRankLinear's gradients of U, S, V.

    Backward with G = Uᵀ dy (per token) and dK = Σ dy aᵀ = dW V (dW never formed):
    dS = Uᵀ dK, dL = Σ patch(x) Gᵀ = dWᵀ U (conv weight gradient), dx = convᵀ(G, S Vᵀ);
    kl_grads: dU = dK, dV = dL; else dU = dK Sᵀ, dV = dL S. r x r products act on
    the weight side (out·r² or in·kh·kw·r² flops), never on the tokens."""

    # forward and setup_context apart, and ``a`` an output of its own: what torch.func's
    # transforms need of a Function (generate_vmap_rule batches all three itself).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, U, S, V, bias, kernel_size, stride, padding, dilation, kl_grads):
        r = S.shape[0]
        a = F.conv2d(x, V.T.reshape(r, x.shape[1], *kernel_size), None, stride, padding, dilation)
        return F.conv2d(a, (U @ S)[:, :, None, None], bias), a

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, U, S, V, bias, kernel_size, stride, padding, dilation, kl_grads = inputs
        ctx.save_for_backward(x, output[1], U, S, V)
        ctx.mark_non_differentiable(output[1])
        ctx.conv = (stride, padding, dilation)
        ctx.kernel_size, ctx.kl_grads, ctx.has_bias = kernel_size, kl_grads, bias is not None

    @staticmethod
    def backward(ctx, dy, _da):
        # Torch's products throughout, so a second backward can run through them, with a
        # recomputed with its graph (the forward's copy has none); DLRT's K/L-gradients are
        # not the gradient of any function of (U, S, V) and refuse one.
        if not torch.is_grad_enabled():
            return _gradients(ctx, dy, False)
        if ctx.kl_grads:
            return _kl_gradients(ctx, dy, False)
        return _gradients(ctx, dy, True)


class _LowRankConv2dForwardMode(_LowRankConv2dFunction):
    """The same Function with its forward-mode derivative, for forward mode only: dynamo traces no
    Function that defines a jvp (torch.compile would break its graph on every call)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _LowRankConv2dFunction.setup_context(ctx, inputs, output)
        x, U, S, V = inputs[:4]
        ctx.save_for_forward(x, output[1], U, S, V)

    @staticmethod
    def jvp(ctx, d_x, d_U, d_S, d_V, d_bias, *_):
        """The forward's tangent, in torch's convolutions (DLRT mode refuses: its K/L-gradients are
        no derivative, and a Hessian would mix the two)."""
        if ctx.kl_grads:
            refuse_forward_mode("LowRankConv2d in DLRT mode (kl_grads=True)", active=True)
        x, a, U, S, V = ctx.saved_tensors
        r = S.shape[0]

        def rank_conv(inputs, factor):
            return F.conv2d(inputs, factor.T.reshape(r, x.shape[1], *ctx.kernel_size), None, *ctx.conv)
        d_a = tangent([None if d_x is None else rank_conv(d_x, V), None if d_V is None else rank_conv(x, d_V)],
                      lambda: torch.zeros_like(a))
        d_US = tangent([None if d_U is None else d_U @ S, None if d_S is None else U @ d_S], lambda: None)
        d_y = F.conv2d(d_a, (U @ S)[:, :, None, None], d_bias)
        if d_US is not None:
            d_y = d_y + F.conv2d(a, d_US[:, :, None, None])
        return d_y, None  # a is marked non-differentiable


def _gradients(ctx, dy, recompute_a):
    """The backward's gradients, from the forward's a = conv(x, Vᵀ) or (``recompute_a``) a fresh
    one that carries its graph."""
    x, a, U, S, V = saved_tensors(ctx, "LowRankConv2d")
    if recompute_a:
        a = F.conv2d(x, V.T.reshape(V.shape[1], x.shape[1], *ctx.kernel_size), None, *ctx.conv)
    need_x, need_U, need_S, need_V, need_bias = ctx.needs_input_grad[:5]
    r, rank_weight_shape = S.shape[0], (S.shape[0], x.shape[1], *ctx.kernel_size)
    dx = dU = dS = dV = dbias = None
    if need_U or need_S:
        dK = torch.einsum("nohw,nrhw->or", dy, a)
        dS = U.T @ dK if need_S else None
        dU = (dK if ctx.kl_grads else dK @ S.T) if need_U else None
    if need_x or need_V:
        G = F.conv2d(dy, U.T[:, :, None, None])
        if need_V:
            dL = torch.nn.grad.conv2d_weight(x, rank_weight_shape, G, *ctx.conv).reshape(r, -1).T
            dV = dL if ctx.kl_grads else dL @ S
        if need_x:
            dx = torch.nn.grad.conv2d_input(x.shape, (S @ V.T).reshape(rank_weight_shape), G, *ctx.conv)
    if need_bias and ctx.has_bias:
        dbias = dy.sum((0, 2, 3))
    return dx, dU, dS, dV, dbias, None, None, None, None, None


_kl_gradients = first_order("LowRankConv2d in DLRT mode (kl_grads=True)")(_gradients)


class LowRankConv2d(LowRankFactors):
    """nn.Conv2d (groups 1, zero padding) with its kernel in low-rank form, never forming the dense kernel.

    Args:
        in_channels, out_channels: any positive ints.
        kernel_size, stride, dilation: an int or an (h, w) pair, as nn.Conv2d.
        rank: r, 1 <= r <= min(out_channels, in_channels·kh·kw).
        padding: an int >= 0, a pair, "valid" or "same" (stride 1), as nn.Conv2d.
        bias: learn an additive bias.
        device, dtype: of the parameters (float32, float64, bfloat16 or float16).

    Parameters: U (out, r), S (r, r), V (in·kh·kw, r), bias (out,). Cost per
    output pixel: 2 r (in·kh·kw + out) flops against 2 out·in·kh·kw dense.
    """

    _MATRIX_NAME = "a kernel of {rows}x{cols} (out x in·kh·kw)"

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, *, device=None, dtype=None):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        self.padding = padding if isinstance(padding, str) else _pair("padding", padding, 0)
        self._padding, self._extra_padding = _conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        patch = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_factors(out_channels, patch, rank, bias, device, dtype)

    @classmethod
    def from_dense(cls, conv, *, rank=None, tol=None):
        """Convert an ``nn.Conv2d`` (groups 1, zero padding) by truncated SVD of its kernel as an
        (out, in·kh·kw) matrix: ``rank`` keeps that many singular triplets, ``tol`` the fewest whose
        dropped tail is <= tol·‖W‖_F (the DLRT rule); neither keeps all of them, which is exact."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"from_dense needs groups=1 and padding_mode='zeros', got groups={conv.groups}, "
                             f"padding_mode={conv.padding_mode!r}")
        layer = cls._from_dense_matrix(conv.weight.reshape(conv.out_channels, -1), conv.bias, rank, tol,
                                       conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                       padding=conv.padding, dilation=conv.dilation)
        return carry_requires_grad(conv, layer)

    def dense_weight(self):
        """The dense (out, in, kh, kw) kernel U S Vᵀ (for inspection; training never forms it)."""
        return (self.U @ self.S @ self.V.T).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self):
        """The ``nn.Conv2d`` this layer stands for (effective kernel and bias, same device and dtype)."""
        return dense_conv2d(self)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (N, {self.in_channels}, H, W) "
                             f"or ({self.in_channels}, H, W)")
        if x.dim() == 3:
            return self.forward(x[None])[0]
        if any(self._extra_padding):
            x = F.pad(x, (0, self._extra_padding[1], 0, self._extra_padding[0]))
        return self._apply_factors(self._conv, x)

    def _conv(self, x, U, S, V, bias):
        if x.dtype != S.dtype:
            raise TypeError(f"input has dtype {x.dtype} but the layer's factors have dtype {S.dtype}")
        function = _LowRankConv2dForwardMode if forward_mode() or dual_level_active() else _LowRankConv2dFunction
        return function.apply(x, U, S, V, bias, self.kernel_size, self.stride, self._padding, self.dilation,
                              self.kl_grads)[0]

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {self._factors_repr()}")
