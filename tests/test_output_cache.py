"""The CPU kernels' large outputs come from the huge-page allocator (csrc/common/huge_page_output.h).

Promises: outputs of at least 2 MB start on a 2 MB boundary (Linux), they are
ordinary tensors (correct values, resizable), and their
gradients flow like any other. A freed output's block is reused for the next
output of the same size, the cache stays within SPARSEKERN_OUTPUT_CACHE_MB
(0: off), and ``sparsekern.empty_output_cache()`` releases it. Temporaries (the
conv kernels' padded copies) share one cached block, the largest so far.
"""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

import sparsekern as sk

HUGE_PAGE = 2 << 20
# 512 x 1024 fp32 = 2 MB: the smallest output that takes the huge-page path.
TOKENS, FEATURES = 512, 1024

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux-only")


def _layer(name):
    torch.manual_seed(0)
    if name == "low_rank":
        return sk.LowRankLinear(FEATURES, FEATURES, 16)
    if name == "block_sparse":
        return sk.SparseLinear(FEATURES, FEATURES, block_size=32, density=0.25)
    return sk.SemiSparseLinear(FEATURES, FEATURES)


def _empty_cache():
    gc.collect()  # tensors of earlier tests caught in reference cycles
    sk.empty_output_cache()


@pytest.mark.parametrize("name", ["low_rank", "block_sparse", "semi_structured"])
def test_large_outputs_are_huge_page_aligned_and_correct(name):
    layer = _layer(name)
    x = torch.randn(TOKENS, FEATURES, requires_grad=True)
    y = layer(x)
    assert y.data_ptr() % HUGE_PAGE == 0
    dense = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4)
    y.backward(torch.ones_like(y))
    assert x.grad.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(x.grad, layer.dense_weight().sum(0).expand_as(x), rtol=1e-4, atol=1e-4)


def test_small_outputs_use_the_default_allocator():
    layer = _layer("low_rank")
    y = layer(torch.randn(3, FEATURES))
    assert y.shape == (3, FEATURES) and torch.isfinite(y).all()


def test_huge_page_outputs_resize():
    layer = _layer("low_rank")
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


def _address_of_one_freed_output(layer):
    """Start from an empty cache, free one 2 MB output; the cache then holds its block."""
    _empty_cache()
    with torch.no_grad():
        address = layer(torch.randn(TOKENS, FEATURES)).data_ptr()
    assert sk.output_cache_info() == {"bytes": HUGE_PAGE, "blocks": 1}
    return address


def test_a_freed_output_block_is_reused_with_fresh_values():
    layer = _layer("low_rank")
    address = _address_of_one_freed_output(layer)
    x = torch.randn(TOKENS, FEATURES)
    with torch.no_grad():
        second = layer(x)
        assert second.data_ptr() == address and sk.output_cache_info()["blocks"] == 0
        torch.testing.assert_close(second, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias),
                                   rtol=1e-4, atol=1e-4)


def test_other_sizes_do_not_take_a_cached_block():
    layer = _layer("low_rank")
    address = _address_of_one_freed_output(layer)
    with torch.no_grad():
        bigger = layer(torch.randn(2 * TOKENS, FEATURES))
    assert bigger.data_ptr() != address
    assert sk.output_cache_info() == {"bytes": HUGE_PAGE, "blocks": 1}


def test_empty_output_cache_releases_every_block():
    layer = _layer("block_sparse")
    x = torch.randn(TOKENS, FEATURES, requires_grad=True)
    layer(x).backward(torch.ones(TOKENS, FEATURES))
    x.grad = None
    assert sk.output_cache_info()["bytes"] >= 2 * HUGE_PAGE  # y and dx
    sk.empty_output_cache()
    assert sk.output_cache_info() == {"bytes": 0, "blocks": 0}


def test_conv_products_cache_no_activation_sized_temporary():
    # The kernels place the padded input a few rows at a time per thread: with the outputs
    # kept alive, nothing an image-sized copy would have freed is left in the cache.
    if "cpu" not in sk.kernels.available_backends("conv_forward", torch.device("cpu"), torch.float32):
        pytest.skip("the conv cpu backend is not built")
    torch.manual_seed(0)
    layer = sk.SparseConv2d(32, 32, 3, padding=1, block_size=32)
    _empty_cache()
    kept = []
    with sk.use_backend("cpu"):
        for size in (48, 32, 64, 40):   # padded inputs of 5.1, 2.4, 8.9 and 3.6 MB
            x = torch.randn(16, 32, size, size).to(memory_format=torch.channels_last).requires_grad_()
            y = layer(x)
            y.backward(torch.ones_like(y))
            torch.testing.assert_close(y, torch.nn.functional.conv2d(x, layer.dense_weight(), layer.bias, padding=1),
                                       rtol=1e-4, atol=1e-4)
            kept += [y, x.grad]
            layer.zero_grad(set_to_none=True)
    assert sk.output_cache_info() == {"bytes": 0, "blocks": 0}


def test_concurrent_threads_get_distinct_correct_outputs():
    layer = _layer("low_rank")
    inputs = [torch.randn(TOKENS, FEATURES) for _ in range(4)]
    errors = []

    def work(x):
        with torch.no_grad():
            for _ in range(5):
                y = layer(x)
                if not torch.allclose(y, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias),
                                      rtol=1e-4, atol=1e-4):
                    errors.append("wrong values")

    threads = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


_CACHE_LIMIT_SCRIPT = """
import torch, sparsekern as sk
layer = sk.LowRankLinear(1024, 1024, 16)
with torch.no_grad():
    outputs = [layer(torch.randn(512 * k, 1024)) for k in (1, 2, 3)]  # 2, 4 and 6 MB
    del outputs
print(sk.output_cache_info()["bytes"] >> 20)
"""


@pytest.mark.parametrize("limit_mb, held_mb", [("0", 0), ("7", 6), ("12", 12)])
def test_the_cache_stays_within_its_limit(limit_mb, held_mb):
    # Freed in list order (2, 4, 6 MB): over the limit, the oldest go first.
    root = os.path.dirname(os.path.dirname(os.path.abspath(sk.__file__)))
    env = dict(os.environ, SPARSEKERN_OUTPUT_CACHE_MB=limit_mb,
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _CACHE_LIMIT_SCRIPT], env=env, capture_output=True, text=True,
                            check=True)
    assert int(result.stdout.split()[-1]) == held_mb


def _child_cache_report(queue):
    fresh = sk.output_cache_info()
    # OpenMP's pool does not survive a fork (a plain torch matmul hangs there too), so
    # one thread, as torch's DataLoader workers run.
    torch.set_num_threads(1)
    layer = _layer("low_rank")
    with torch.no_grad():
        layer(torch.randn(TOKENS, FEATURES))
    queue.put((fresh, sk.output_cache_info()))


def test_a_forked_child_starts_with_its_own_empty_cache():
    import multiprocessing
    layer = _layer("low_rank")
    _address_of_one_freed_output(layer)  # the parent's cache holds a block
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_cache_report, args=(queue,))
    child.start()
    fresh, after = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert fresh == {"bytes": 0, "blocks": 0} and after == {"bytes": HUGE_PAGE, "blocks": 1}
    assert sk.output_cache_info() == {"bytes": HUGE_PAGE, "blocks": 1}  # the parent's is untouched


@pytest.mark.parametrize("name,product", [("low_rank", "lowrank_forward"), ("block_sparse", "bsr_forward"),
                                          ("semi_structured", "semi_forward")])
def test_the_dense_composites_take_their_outputs_from_the_cache(name, product):
    layer = _layer(name)
    x = torch.randn(TOKENS, FEATURES)
    layer(x)                                  # loads the family's extension
    _empty_cache()
    with sk.use_backend("dense"):
        y = layer(x)
    assert y.data_ptr() % HUGE_PAGE == 0      # a cached huge-page block, not torch's allocator
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dense_weight(), layer.bias),
                               rtol=1e-4, atol=1e-4)
    held = sk.output_cache_info()["blocks"]
    del y
    assert sk.output_cache_info()["blocks"] == held + 1


def test_composite_output_falls_back_to_torch_without_the_extension():
    from sparsekern.kernels.output_cache import empty_output
    like = torch.zeros(1, dtype=torch.bfloat16)
    out = empty_output("no_such_family", (3, 5), like)
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16 and out.is_contiguous()
