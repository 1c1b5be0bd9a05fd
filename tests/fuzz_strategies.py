"""Shared hypothesis strategies and settings of the fuzz tests (tests/test_fuzz_*.py).

Shapes stay tiny so every property runs many examples in seconds. Tensor values
come from a drawn seed (fast, reproducible) except where the values themselves
are the point (NaN / inf / ties in the DST rules): those are drawn element by
element so hypothesis can shrink them.
"""
import math

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def fuzz_settings(max_examples):
    """Reproducible in CI (derandomized, no example database written into the tree)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2 ** 31 - 1)
# An int (square blocks) or an explicit (rows, cols) pair, rectangular included.
block_sizes = st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4)))
# Leading dims of an input: none, or up to two (0 included: M = 0 tokens).
lead_shapes = st.lists(st.integers(0, 3), max_size=2).map(tuple)
# How an input is laid out in memory: the ops must not care.
memory_layouts = st.sampled_from(["contiguous", "transposed", "strided"])
# Values where ranking rules break: NaN, ±inf, signed zeros, many equal magnitudes.
special_floats = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True, width=32))


def as_pair(block_size):
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


def randn(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def input_base_shape(lead, features, memory_layout):
    """Shape of the contiguous tensor that :func:`as_input` views as (*lead, features)."""
    if memory_layout == "transposed":
        return (features, *lead)
    if memory_layout == "strided":
        return (*lead, 2 * features)
    return (*lead, features)


def as_input(base, memory_layout):
    """``base`` seen as (*lead, features): itself, a transposed view, or a view with stride 2."""
    if memory_layout == "transposed":
        return base.movedim(0, -1)
    if memory_layout == "strided":
        return base[..., ::2]
    return base


def random_input(lead, features, dtype, seed, memory_layout="contiguous"):
    return as_input(randn(input_base_shape(lead, features, memory_layout), seed, dtype), memory_layout)


def special_tensor(draw, shape, dtype=torch.float32):
    """A tensor of ``shape`` whose elements are drawn from :data:`special_floats`."""
    array = draw(hnp.arrays(np.float32, shape, elements=special_floats))
    return torch.from_numpy(array.copy()).to(dtype)


def bool_tensor(draw, shape):
    return torch.from_numpy(draw(hnp.arrays(np.bool_, shape)).copy())
