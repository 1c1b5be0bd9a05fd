"""Property-based checks of every linear op and the block-sparse convolution: the default
backend against the ``reference`` backend, and the reference against a float64 dense
computation, on random shapes, blocks, densities, dtypes and memory layouts (conv: random
geometry too); forward and every gradient.

The dense float64 oracle covers what the two backends share (the op wrapper: leading dims,
strides, bias, the choice of gradients), which a backend-against-backend check cannot."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import sparsekern as sk
from sparsekern.kernels.conv import ConvGeometry, dense_conv_weight, gather_blocks
from fuzz_strategies import (as_input, as_pair, block_sizes, bool_tensor, fuzz_settings, input_base_shape, lead_shapes,
                             memory_layouts, randn, seeds)
from helpers import TOLERANCES, microkernel_paths, on_path, thread_count

OP_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
# Which of (x, weight, bias) get a gradient: every subset, so each backward branch runs alone too.
GRAD_WANTS = st.tuples(st.booleans(), st.booleans(), st.booleans())


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes gain nothing from threads


def backend_context(backend):
    return contextlib.nullcontext() if backend is None else sk.use_backend(backend)


def run_op(call, tensors, wants_grad, dy, backend=None):
    """``call(*leaves)`` under ``backend`` (None: automatic selection) and, for each leaf that
    wants one, the gradient of <y, dy> (None for the others). Leaves are fresh copies."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(bool(want))
              for t, want in zip(tensors, wants_grad)]
    with backend_context(backend):
        y = call(*leaves)
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
    return y.detach(), [next(grads) if leaf is not None and leaf.requires_grad else None for leaf in leaves]


def assert_within(actual, expected, bound, dtype, what):
    """|actual - expected| <= atol + rtol * bound entry by entry, with the tolerances of ``dtype``
    and ``bound`` the sum of the products' term magnitudes: rounding scales with the terms, not
    with a result that cancels (bfloat16 intermediates of a chain of products)."""
    tolerance = TOLERANCES[dtype]
    error = (actual.double() - expected.double()).abs()
    within = error <= tolerance["atol"] + tolerance["rtol"] * bound  # NaN is never within
    if not bool(within.all()):
        first = tuple((~within).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int((~within).sum())} of {error.numel()} entries differ beyond "
                             f"{tolerance} x term magnitude; first at {first}: {actual[first].item()} vs "
                             f"{expected[first].item()} (term magnitude {bound[first].item():.3g})")


def assert_results_close(actual, expected, bounds, dtype):
    (y, grads), (y_expected, grads_expected), (y_bound, grad_bounds) = actual, expected, bounds
    assert y.shape == y_expected.shape
    assert_within(y, y_expected, y_bound, dtype, "output")
    for i, (g, g_expected, bound) in enumerate(zip(grads, grads_expected, grad_bounds)):
        assert (g is None) == (g_expected is None)
        if g is not None:
            assert g.shape == g_expected.shape
            assert_within(g, g_expected, bound, dtype, f"gradient of input {i}")


def check_op(call, dense_call, tensors, wants_grad, dy, dtype, out_shape):
    """default ≈ reference ≈ float64 dense oracle, outputs and gradients."""
    default = run_op(call, tensors, wants_grad, dy)
    assert default[0].dtype == dtype and tuple(default[0].shape) == out_shape
    for grad in default[1]:
        assert grad is None or grad.dtype == dtype
    reference = run_op(call, tensors, wants_grad, dy, "reference")
    oracle = run_op(dense_call, [None if t is None else t.double() for t in tensors], wants_grad, dy.double())
    # Every output and gradient is a sum of products of the inputs: on their magnitudes it is
    # the sum of its terms' magnitudes.
    bounds = run_op(dense_call, [None if t is None else t.double().abs() for t in tensors], wants_grad,
                    dy.double().abs())
    assert_results_close(default, reference, bounds, dtype)
    assert_results_close(reference, oracle, bounds, dtype)


@st.composite
def input_cases(draw, in_features, out_features, dtype):
    """(x base, memory layout, dy, lead): x = as_input(x base, layout) has shape (*lead, in)."""
    lead, memory_layout, seed = draw(lead_shapes), draw(memory_layouts), draw(seeds)
    x_base = randn(input_base_shape(lead, in_features, memory_layout), seed, dtype)
    dy_layout = draw(memory_layouts)
    dy = as_input(randn(input_base_shape(lead, out_features, dy_layout), seed + 1, dtype), dy_layout)
    return x_base, memory_layout, dy, lead


# -- block-sparse ---------------------------------------------------------------

@fuzz_settings(250)
@given(block_size=block_sizes, grid=st.tuples(st.integers(0, 3), st.integers(1, 3)), dtype=OP_DTYPES,
       with_bias=st.booleans(), wants_grad=GRAD_WANTS, seed=seeds, data=st.data())
def test_bsr_linear_matches_reference_and_dense(block_size, grid, dtype, with_bias, wants_grad, seed, data):
    """Random block masks: empty block rows and columns, no stored block at all, every block."""
    br, bc = as_pair(block_size)
    out_features, in_features = grid[0] * br, grid[1] * bc
    layout = sk.BlockLayout.from_block_mask(bool_tensor(data.draw, grid), (out_features, in_features), (br, bc))
    values = randn((layout.nnz_blocks, br, bc), seed, dtype)
    bias = randn((out_features,), seed + 2, dtype) if with_bias else None
    x_base, memory_layout, dy, lead = data.draw(input_cases(in_features, out_features, dtype))

    def call(x_base, values, bias):
        return sk.ops.bsr_linear(as_input(x_base, memory_layout), sk.BlockSparseMatrix(values, layout), bias)

    def dense_call(x_base, values, bias):
        return F.linear(as_input(x_base, memory_layout), sk.BlockSparseMatrix(values, layout).to_dense(), bias)

    check_op(call, dense_call, [x_base, values, bias], wants_grad, dy, dtype, (*lead, out_features))


@fuzz_settings(60)
@given(block_size=st.sampled_from([16, 32, (16, 32), (32, 16), (8, 48)]),
       grid=st.tuples(st.integers(1, 3), st.integers(1, 3)), tokens=st.integers(0, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), with_bias=st.booleans(),
       wants_grad=GRAD_WANTS, memory_layout=memory_layouts, seed=seeds, data=st.data())
def test_bsr_linear_on_simd_blocks_and_two_threads(block_size, grid, tokens, dtype, with_bias, wants_grad,
                                                    memory_layout, seed, data):
    """Blocks the SIMD tiles and bf16 dot products take (multiples of 16 columns, or not), token
    counts off the tile heights, split between two threads."""
    br, bc = as_pair(block_size)
    out_features, in_features = grid[0] * br, grid[1] * bc
    layout = sk.BlockLayout.from_block_mask(bool_tensor(data.draw, grid), (out_features, in_features), (br, bc))
    values = randn((layout.nnz_blocks, br, bc), seed, dtype)
    bias = randn((out_features,), seed + 2, dtype) if with_bias else None
    x_base = randn(input_base_shape((tokens,), in_features, memory_layout), seed + 3, dtype)
    dy = randn((tokens, out_features), seed + 4, dtype)

    def call(x_base, values, bias):
        return sk.ops.bsr_linear(as_input(x_base, memory_layout), sk.BlockSparseMatrix(values, layout), bias)

    def dense_call(x_base, values, bias):
        return F.linear(as_input(x_base, memory_layout), sk.BlockSparseMatrix(values, layout).to_dense(), bias)

    with thread_count(2):
        check_op(call, dense_call, [x_base, values, bias], wants_grad, dy, dtype, (tokens, out_features))


# -- block-sparse conv -----------------------------------------------------------

@st.composite
def conv_geometries(draw):
    """Any geometry the layer accepts: channels not multiples of the block, groups holding whole
    block rows, 1 to 3 taps a side, strides and dilations of 1 or 2, asymmetric padding."""
    groups, block = draw(st.sampled_from([1, 1, 2])), draw(st.integers(1, 4))
    in_channels = groups * draw(st.integers(1, 6))
    out_channels = groups * block * draw(st.integers(1, 2)) if groups > 1 else draw(st.integers(1, 9))
    pair = st.tuples(st.integers(1, 3), st.integers(1, 3))
    kernel, stride, dilation = draw(pair), draw(pair.map(lambda p: (1 + p[0] // 3, 1 + p[1] // 3))), draw(pair)
    dilation = tuple(1 + d // 3 for d in dilation)
    padding = draw(st.tuples(*[st.integers(0, 2)] * 4))
    return ConvGeometry(in_channels, out_channels, groups, kernel, stride, padding, dilation, block)


def image_shape(draw, geometry):
    """(H, W) of at least one output pixel, up to a few pixels beyond."""
    (kh, kw), (t, b, l, r), (dh, dw) = geometry.kernel_size, geometry.padding, geometry.dilation
    return tuple(draw(st.integers(max(1, dh * (k - 1) + 1 - pad), dh * (k - 1) + 6))
                 for k, pad, dh in ((kh, t + b, dh), (kw, l + r, dw)))


# How a 4-D activation lies in memory: the ops must not care.
IMAGE_LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided", "channel_slice"])


def image_base_shape(shape, image_layout):
    n, c, h, w = shape
    return {"strided": (n, c, h, 2 * w), "channel_slice": (n, 2 * c, h, w)}.get(image_layout, shape)


def as_image(base, channels, image_layout):
    """``base`` seen as the activation: itself, channels-last, every other column, or the first
    ``channels`` channels of a channels-last tensor of twice as many."""
    if image_layout == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if image_layout == "strided":
        return base[..., ::2]
    if image_layout == "channel_slice":
        return base.contiguous(memory_format=torch.channels_last)[:, :channels]
    return base


@pytest.mark.parametrize("path", microkernel_paths())
@fuzz_settings(200)
@given(geometry=conv_geometries(), batch=st.integers(0, 2), dtype=OP_DTYPES, with_bias=st.booleans(),
       wants_grad=GRAD_WANTS, layouts=st.tuples(IMAGE_LAYOUTS, IMAGE_LAYOUTS), seed=seeds, data=st.data())
def test_sparse_conv2d_matches_reference_and_dense(path, geometry, batch, dtype, with_bias, wants_grad, layouts, seed,
                                                   data):
    """Random block masks (empty block rows and columns, none or every block stored) on random
    geometries and images, x and dY in any memory layout; on every microkernel path."""
    with on_path("conv", path):
        check_conv(geometry, batch, image_shape(data.draw, geometry), dtype, with_bias, wants_grad, layouts, seed,
                   data.draw)


@st.composite
def wide_conv_geometries(draw):
    """Blocks of 8 or 16 over up to three block rows and columns (the SIMD tiles, partly filled)."""
    block, groups = draw(st.sampled_from([8, 16])), draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(1, 3 * block))
    out_channels = groups * block * draw(st.integers(1, 2)) if groups > 1 else draw(st.integers(1, 3 * block))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (3, 1), (5, 5)]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    pad = (kernel[0] // 2, kernel[0] // 2, kernel[1] // 2, kernel[1] // 2)
    return ConvGeometry(in_channels, out_channels, groups, kernel, stride, pad, (1, 1), block)


@fuzz_settings(80)
@given(geometry=wide_conv_geometries(), batch=st.integers(1, 3), size=st.tuples(st.integers(5, 20), st.integers(5, 20)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_bias=st.booleans(), wants_grad=GRAD_WANTS,
       layouts=st.tuples(IMAGE_LAYOUTS, IMAGE_LAYOUTS), seed=seeds, data=st.data())
def test_sparse_conv2d_on_two_threads_and_larger_images(geometry, batch, size, dtype, with_bias, wants_grad, layouts,
                                                       seed, data):
    """Images of many rows split into row and pixel chunks between two threads."""
    with thread_count(2):
        check_conv(geometry, batch, size, dtype, with_bias, wants_grad, layouts, seed, data.draw)


def check_conv(geometry, batch, size, dtype, with_bias, wants_grad, layouts, seed, draw):
    bs, (kh, kw) = geometry.block_size, geometry.kernel_size
    layout = sk.BlockLayout.from_block_mask(bool_tensor(draw, geometry.grid), geometry.padded_shape, (bs, bs))
    blocks = randn((layout.nnz_blocks, bs, bs, kh, kw), seed, dtype)
    values = gather_blocks(dense_conv_weight(blocks, layout, geometry), layout, geometry)  # padding channels zero
    bias = randn((geometry.out_channels,), seed + 2, dtype) if with_bias else None
    x_layout, dy_layout = layouts
    x_base = randn(image_base_shape((batch, geometry.in_channels, *size), x_layout), seed + 3, dtype)
    out_shape = (batch, geometry.out_channels, *geometry.output_size(*size))
    dy = as_image(randn(image_base_shape(out_shape, dy_layout), seed + 4, dtype), geometry.out_channels, dy_layout)
    t, b, l, r = geometry.padding

    def call(x_base, values, bias):
        return sk.ops.sparse_conv2d(as_image(x_base, geometry.in_channels, x_layout), values, layout, geometry, bias)

    def dense_call(x_base, values, bias):
        x = F.pad(as_image(x_base, geometry.in_channels, x_layout), (l, r, t, b))
        return F.conv2d(x, dense_conv_weight(values, layout, geometry), bias, geometry.stride, 0, geometry.dilation,
                        geometry.groups)

    check_op(call, dense_call, [x_base, values, bias], wants_grad, dy, dtype, out_shape)


# -- 2:4 ------------------------------------------------------------------------

@st.composite
def semi_shapes(draw, in_groups=4, out_groups=3, outputs=9):
    """(out, in, transposable): in a multiple of 4 (up to ``in_groups`` groups of 4), out too if
    transposable (up to ``out_groups`` groups), else up to ``outputs``."""
    transposable = draw(st.booleans())
    out_features = 4 * draw(st.integers(1, out_groups)) if transposable else draw(st.integers(1, outputs))
    return out_features, 4 * draw(st.integers(1, in_groups)), transposable


@fuzz_settings(200)
@given(shape=semi_shapes(), dtype=OP_DTYPES, with_bias=st.booleans(), wants_grad=GRAD_WANTS, seed=seeds,
       zeros=st.sampled_from([0.0, 0.5, 1.5]), data=st.data())
def test_semi_linear_matches_reference_and_dense(shape, dtype, with_bias, wants_grad, seed, zeros, data):
    """Static 2:4 weights, with Wᵀ's indices (dX on the sparse path) or without, some with
    fewer than two nonzeros per group (the kept set then holds zeros too)."""
    out_features, in_features, _ = shape
    inputs = data.draw(input_cases(in_features, out_features, dtype))
    check_semi(shape, dtype, with_bias, wants_grad, seed, zeros, inputs)


@fuzz_settings(60)
@given(shape=semi_shapes(in_groups=60, out_groups=40, outputs=150), tokens=st.integers(0, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       with_bias=st.booleans(), wants_grad=GRAD_WANTS, seed=seeds, zeros=st.sampled_from([0.0, 0.5]),
       memory_layout=memory_layouts)
def test_semi_linear_on_wide_shapes_and_two_threads(shape, tokens, dtype, with_bias, wants_grad, seed, zeros,
                                                    memory_layout):
    """Shapes past the kernels' panels and tiles (64-column pair panels, 128-row blocks)."""
    out_features, in_features, _ = shape
    x_base = randn(input_base_shape((tokens,), in_features, memory_layout), seed + 3, dtype)
    dy = randn((tokens, out_features), seed + 4, dtype)
    with thread_count(2):
        check_semi(shape, dtype, with_bias, wants_grad, seed, zeros, (x_base, memory_layout, dy, (tokens,)))


def check_semi(shape, dtype, with_bias, wants_grad, seed, zeros, inputs):
    out_features, in_features, with_transpose = shape
    weight = randn((out_features, in_features), seed, dtype)
    weight = weight.masked_fill(weight.abs() < zeros, 0)
    weight = weight.masked_fill(~sk.prune_2to4(weight, transposable=with_transpose), 0)
    matrix = sk.SemiStructuredMatrix.from_dense(weight, with_transpose=with_transpose)
    bias = randn((out_features,), seed + 2, dtype) if with_bias else None
    x_base, memory_layout, dy, lead = inputs

    def sparse(values, **kwargs):
        return sk.SemiStructuredMatrix(values, matrix.indices, matrix.shape, **kwargs)

    def call(x_base, values, bias):
        return sk.ops.semi_linear(as_input(x_base, memory_layout), sparse(values, indices_t=matrix.indices_t), bias)

    def dense_call(x_base, values, bias):
        return F.linear(as_input(x_base, memory_layout), sparse(values).to_dense(), bias)

    check_op(call, dense_call, [x_base, matrix.values, bias], wants_grad, dy, dtype, (*lead, out_features))


@fuzz_settings(120)
@given(shape=semi_shapes(), dtype=OP_DTYPES, with_bias=st.booleans(), wants_grad=GRAD_WANTS, seed=seeds,
       data=st.data())
def test_semi_linear_dynamic_matches_reference_and_dense(shape, dtype, with_bias, wants_grad, seed, data):
    """A dense master weight pruned on every call; it gets the straight-through gradient dYᵀX."""
    out_features, in_features, transposable = shape
    weight = randn((out_features, in_features), seed, dtype)
    bias = randn((out_features,), seed + 2, dtype) if with_bias else None
    x_base, memory_layout, dy, lead = data.draw(input_cases(in_features, out_features, dtype))

    def call(x_base, weight, bias):
        return sk.ops.semi_linear_dynamic(as_input(x_base, memory_layout), weight, bias, transposable=transposable)

    def dense_call(x_base, weight, bias):
        kept = sk.prune_2to4(weight.detach(), transposable=transposable)
        straight_through = weight.detach() * kept + (weight - weight.detach())  # value W∘mask, gradient to all of W
        return F.linear(as_input(x_base, memory_layout), straight_through, bias)

    check_op(call, dense_call, [x_base, weight, bias], wants_grad, dy, dtype, (*lead, out_features))


# -- low-rank -------------------------------------------------------------------

@fuzz_settings(200)
@given(out_features=st.integers(1, 7), in_features=st.integers(1, 7), rank=st.integers(1, 5),
       dtype=OP_DTYPES, with_bias=st.booleans(), kl_grads=st.booleans(), transposed_factors=st.booleans(),
       wants_grad=st.tuples(*[st.booleans()] * 5), seed=seeds, data=st.data())
def test_low_rank_linear_matches_reference_and_dense(out_features, in_features, rank, dtype, with_bias, kl_grads,
                                                     transposed_factors, wants_grad, seed, data):
    """U, S, V as given or as transposed views; plain gradients or DLRT's K/L gradients."""
    inputs = data.draw(input_cases(in_features, out_features, dtype))
    check_low_rank((out_features, in_features, rank), dtype, with_bias, kl_grads, transposed_factors, wants_grad,
                   seed, inputs)


@fuzz_settings(60)
@given(shape=st.tuples(st.integers(1, 150), st.integers(1, 150), st.integers(1, 40)), tokens=st.integers(0, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), with_bias=st.booleans(), kl_grads=st.booleans(),
       transposed_factors=st.booleans(), wants_grad=st.tuples(*[st.booleans()] * 5), seed=seeds,
       memory_layout=memory_layouts)
def test_low_rank_linear_on_wide_shapes_and_two_threads(shape, tokens, dtype, with_bias, kl_grads, transposed_factors,
                                                        wants_grad, seed, memory_layout):
    """Features and ranks past the kernels' register tiles and strips, split between two threads."""
    out_features, in_features, _ = shape
    x_base = randn(input_base_shape((tokens,), in_features, memory_layout), seed + 4, dtype)
    dy = randn((tokens, out_features), seed + 5, dtype)
    with thread_count(2):
        check_low_rank(shape, dtype, with_bias, kl_grads, transposed_factors, wants_grad, seed,
                       (x_base, memory_layout, dy, (tokens,)))


def check_low_rank(shape, dtype, with_bias, kl_grads, transposed_factors, wants_grad, seed, inputs):
    out_features, in_features, rank = shape
    factor_shapes = [(out_features, rank), (rank, rank), (in_features, rank)]
    if transposed_factors:  # leaves are the (r, ·) tensors; the op sees their transposed views
        factor_shapes = [s[::-1] for s in factor_shapes]
    factors = [randn(s, seed + i, dtype) for i, s in enumerate(factor_shapes)]
    bias = randn((out_features,), seed + 3, dtype) if with_bias else None
    x_base, memory_layout, dy, lead = inputs
    view = (lambda t: t.T) if transposed_factors else (lambda t: t)

    def call(x_base, U, S, V, bias):
        return sk.ops.low_rank_linear(as_input(x_base, memory_layout), view(U), view(S), view(V), bias,
                                      kl_grads=kl_grads)

    def dense_call(x_base, U, S, V, bias):
        U, S, V = view(U), view(S), view(V)
        weight = U @ S @ V.T
        if kl_grads:  # same value; U gets dW V and V gets dWᵀ U (zero-valued terms carry them), S and x as usual
            Uc, Vc = U.detach(), V.detach()
            weight = Uc @ S @ Vc.T + (U - Uc) @ Vc.T + Uc @ (V - Vc).T
        return F.linear(as_input(x_base, memory_layout), weight, bias)

    tensors = [x_base, *factors, bias]
    check_op(call, dense_call, tensors, wants_grad, dy, dtype, (*lead, out_features))
