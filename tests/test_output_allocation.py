"""The CPU kernels' large outputs come from the huge-page allocator (csrc/common/huge_page_output.h).

Promises: outputs of at least 2 MB start on a 2 MB boundary (Linux), they are
ordinary tensors (correct values, resizable), and their
gradients flow like any other.
"""
import sys

import pytest
import torch

import sparsekern as sk

HUGE_PAGE = 2 << 20
# 512 x 1024 fp32 = 2 MB: the smallest output that takes the huge-page path.
TOKENS, FEATURES = 512, 1024

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux-only")


def _layers():
    torch.manual_seed(0)
    return {
        "low_rank": sk.LowRankLinear(FEATURES, FEATURES, 16),
        "block_sparse": sk.SparseLinear(FEATURES, FEATURES, block_size=32, density=0.25),
        "semi_structured": sk.SemiSparseLinear(FEATURES, FEATURES),
    }


@pytest.mark.parametrize("name", ["low_rank", "block_sparse", "semi_structured"])
def test_large_outputs_are_huge_page_aligned_and_correct(name):
    layer = _layers()[name]
    x = torch.randn(TOKENS, FEATURES, requires_grad=True)
    y = layer(x)
    assert y.data_ptr() % HUGE_PAGE == 0
    dense = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4)
    y.backward(torch.ones_like(y))
    assert x.grad.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand_as(x), rtol=1e-4, atol=1e-4)


def test_small_outputs_use_the_default_allocator():
    layer = _layers()["low_rank"]
    y = layer(torch.randn(3, FEATURES))
    assert y.shape == (3, FEATURES) and torch.isfinite(y).all()


def test_huge_page_outputs_resize():
    layer = _layers()["low_rank"]
    with torch.no_grad():
        y = layer(torch.randn(TOKENS, FEATURES))
        y.resize_(2 * TOKENS, FEATURES)  # storage keeps its allocator, so it can grow
        y[TOKENS:].fill_(1.0)
        assert y.shape == (2 * TOKENS, FEATURES) and bool((y[TOKENS:] == 1).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_huge_page_outputs_keep_the_dtype(dtype):
    layer = sk.LowRankLinear(FEATURES, FEATURES, 16, dtype=dtype)
    tokens = HUGE_PAGE // (FEATURES * dtype.itemsize)  # the smallest huge-page output in this dtype
    x = torch.randn(tokens, FEATURES, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        expected = torch.nn.functional.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    assert y.dtype == dtype and y.untyped_storage().nbytes() == HUGE_PAGE
    assert y.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
