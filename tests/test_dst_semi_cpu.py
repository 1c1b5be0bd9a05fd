"""The C++ 2:4 DST kernels (csrc/semi/dst_update.cpp, the ``cpu`` backend of the
semi_drop_grow / semi_restructure / semi_carry / semi_decompress_sum / semi_gather_kept products) take exactly
the decisions of the plain-torch ``reference`` backend: the rule, set_mask's bookkeeping, the
optimizer-state carry, the probe's complement indices and dense gradient. Ties included."""
import contextlib

import pytest
import torch

import sparsekern as sk
from sparsekern.formats.semi import decompress, kept_positions, pack_indices
from sparsekern.methods import functional as Fn
from sparsekern.methods.dst.semi_probe import SemiProbe, complement_indices
from sparsekern.nn.semi_linear import carry
from sparsekern.formats.semi_prune import prune_2to4

pytestmark = pytest.mark.skipif(
    "cpu" not in sk.kernels.available_backends("semi_drop_grow", torch.device("cpu"), torch.float32),
    reason="the compiled 2:4 extension (with its DST kernels) is not built")


@pytest.fixture
def plain_torch():
    """Call it to run the rest of the test on the reference (plain-torch) backend."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(sk.use_backend("reference"))


def both_paths(plain_torch, fn):
    """fn() with the C++ kernels, then with plain torch."""
    with sk.use_backend("cpu"):
        fast = fn()
    plain_torch()
    return fast, fn()


def _case(rows, cols, transposable, dtype, ties, seed):
    g = torch.Generator().manual_seed(seed)
    mask = prune_2to4(torch.randn(rows, cols, generator=g), transposable=transposable)
    if ties:  # few distinct values: ties at the drop threshold and inside groups and tiles
        weight = torch.randint(-2, 3, (rows, cols), generator=g).to(dtype)
        grad = torch.randint(-2, 3, (rows, cols), generator=g).to(dtype)
    else:
        weight, grad = torch.randn(rows, cols, generator=g, dtype=dtype), torch.randn(rows, cols, generator=g,
                                                                                      dtype=dtype)
    return weight * mask, mask, grad


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_rigl_rule_same_as_plain_torch(plain_torch, transposable, dtype, ties, fraction):
    weight, mask, grad = _case(20, 24, transposable, dtype, ties, seed=int(fraction * 10))
    fast, plain = both_paths(plain_torch, lambda: Fn.semi_rigl_update(weight, mask, grad, fraction,
                                                                      transposable=transposable))
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])
    assert fast[1].dtype == weight.dtype


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_every_drop_count_on_a_tied_layer(plain_torch, transposable):
    # all |w| in {0, 1, 2}: the k-th value is tied for most k, and the lower flat index must go first
    weight, mask, grad = _case(12, 16, transposable, torch.float32, ties=True, seed=5)
    active = int(mask.sum())
    fast = [Fn.semi_drop_and_grow(mask, weight.abs(), grad.abs(), n, transposable=transposable)
            for n in range(active + 1)]
    plain_torch()
    for n in range(active + 1):
        assert torch.equal(fast[n], Fn.semi_drop_and_grow(mask, weight.abs(), grad.abs(), n,
                                                          transposable=transposable)), n


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_signed_scores_and_negative_zero(plain_torch, transposable):
    # semi_drop_and_grow takes the scores as given: negative values, -0.0 == +0.0
    g = torch.Generator().manual_seed(2)
    mask = prune_2to4(torch.randn(16, 16, generator=g), transposable=transposable)
    drop = torch.randint(-3, 3, (16, 16), generator=g).float()
    drop[drop == 0] = torch.where(torch.rand(int((drop == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    grow = torch.randn(16, 16, generator=g) - 1.0
    fast, plain = both_paths(plain_torch, lambda: Fn.semi_drop_and_grow(mask, drop, grow, 40,
                                                                        transposable=transposable))
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nan_drop_scores_leave_last(plain_torch, transposable, dtype):
    # NaNs of both signs (0/0 gives a negative one on x86) rank after every number, signed or |.|
    weight, mask, grad = _case(16, 16, transposable, dtype, ties=True, seed=6)
    nan = torch.tensor(float("nan"), dtype=dtype)
    kept = mask.nonzero()[:8]
    weight[kept[:, 0], kept[:, 1]] = torch.stack([nan, -nan] * 4)
    assert weight[kept[1, 0], kept[1, 1]].signbit()
    fast, plain = both_paths(plain_torch, lambda: (
        Fn.semi_drop_and_grow(mask, weight, grad, 40, transposable=transposable),
        Fn.semi_rigl_update(weight, mask, grad, 0.5, transposable=transposable)))
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1][0], plain[1][0])
    assert fast[1][1].isnan().sum() == plain[1][1].isnan().sum() == 8  # the NaN weights all stay
    torch.testing.assert_close(fast[1][1], plain[1][1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_set_rule_same_as_plain_torch_with_float64_weights(plain_torch, transposable):
    # float32 noise against float64 weights: the kernel compares in float64 (exact)
    weight, mask, _ = _case(16, 32, transposable, torch.float64, ties=False, seed=3)
    fast, plain = both_paths(plain_torch, lambda: Fn.semi_set_update(
        weight, mask, 0.4, generator=torch.Generator().manual_seed(7), transposable=transposable))
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])


def test_multithreaded_kernel_same_decision(plain_torch):
    weight, mask, grad = _case(256, 64, True, torch.float32, ties=True, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = [Fn.semi_rigl_update(weight, mask, grad, 0.3, transposable=t)[0] for t in (False, True)]
    finally:
        torch.set_num_threads(threads)
    plain_torch()
    assert all(torch.equal(f, Fn.semi_rigl_update(weight, mask, grad, 0.3, transposable=t)[0])
               for f, t in zip(fast, (False, True)))


@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
def test_rule_errors_on_both_paths(plain_torch, transposable):
    bad = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    row_only = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    ones = torch.ones(4, 8)
    for _ in range(2):
        with pytest.raises(ValueError, match="transposable" if transposable else "not exactly 2:4"):
            Fn.semi_drop_and_grow(bad, ones, ones, 1, transposable=transposable)
        if transposable:
            with pytest.raises(ValueError, match="not exactly transposable"):
                Fn.semi_drop_and_grow(row_only, ones, ones, 1, transposable=True)
        plain_torch()


# ---------------------------------------------------------------- set_mask, carry, probe

@pytest.mark.parametrize("transposable", [False, True], ids=["rows", "transposable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("shape", [(12, 20), (16, 24)], ids=["odd-groups", "even-groups"])
def test_set_mask_same_as_plain_torch(plain_torch, transposable, dtype, shape):
    out_features, in_features = shape  # 20 and 12 columns: rows of W and Wᵀ end in half a byte
    new_mask = prune_2to4(torch.randn(out_features, in_features), transposable=transposable)

    def run():
        torch.manual_seed(0)
        layer = sk.SemiSparseLinear(in_features, out_features, transposable=transposable, dtype=dtype)
        slots = layer.set_mask(new_mask)
        return slots, layer.values.detach(), layer.indices, layer.indices_t

    fast, plain = both_paths(plain_torch, run)
    for a, b in zip(fast, plain):
        assert (a is None and b is None) or torch.equal(a, b)


def test_set_mask_errors_on_both_paths(plain_torch):
    for _ in range(2):
        layer = sk.SemiSparseLinear(8, 4, transposable=True)
        with pytest.raises(ValueError, match="exactly 2 of every 4"):
            layer.set_mask(torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]] * 4, dtype=torch.bool))
        with pytest.raises(ValueError, match="transposable"):
            layer.set_mask(torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 4, dtype=torch.bool))
        plain_torch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_carry_same_as_plain_torch(plain_torch, dtype):
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(6, 10, generator=g).to(dtype)
    slots = torch.randint(-1, 60, (6, 10), generator=g)
    fast, plain = both_paths(plain_torch, lambda: carry(tensor, slots))
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 12), (16, 24), (0, 8), (3, 4)], ids=str)
def test_gather_kept_same_as_plain_torch_and_inverts_decompress(plain_torch, dtype, shape):
    from sparsekern.kernels.registry import select_kernel
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(*shape, generator=g).to(dtype)
    mask = prune_2to4(torch.randn(*shape, generator=g))
    _, indices = sk.formats.semi.compress(dense, mask)
    gather = lambda: select_kernel("semi_gather_kept", dense.device, dtype)[1](dense, indices)  # noqa: E731
    fast, plain = both_paths(plain_torch, gather)
    assert torch.equal(fast, plain)
    assert torch.equal(decompress(fast, indices, shape[1]), dense * mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [4, 36, 100, 4096])
def test_decompressed_weight_same_on_every_path(plain_torch, dtype, cols):
    """One source (the dense composite's weight): the AVX-512 expand (where the CPU has
    AVX512-VBMI2) and the scalar loop (allow_avx512=False, as SPARSEKERN_CPU_ISA=avx2 asks) give
    the plain-torch result bit for bit: canonical metadata (lo < hi, what restructure writes),
    and arbitrary bytes (lo >= hi: the later value wins), row tails of 1-7 groups."""
    ops = sk.kernels.semi.cpu.ops()
    g = torch.Generator().manual_seed(cols)
    rows = 9
    values = torch.randn(rows, cols // 2, generator=g).to(dtype)
    canonical = pack_indices(kept_positions(prune_2to4(torch.randn(rows, cols, generator=g))))
    arbitrary = torch.randint(0, 256, canonical.shape, dtype=torch.uint8, generator=g)
    for indices in (canonical, arbitrary):
        scalar = ops.semi_decompress_sum_cpu([values], [indices], cols, False)
        expanded = ops.semi_decompress_sum_cpu([values], [indices], cols, True)
        plain_torch()
        want = sk.kernels.semi.decompress_sum([values], [indices], cols)
        assert torch.equal(scalar, want) and torch.equal(expanded, want)


def test_gather_kept_refuses_indices_of_another_shape():
    ops = sk.kernels.semi.cpu.ops()
    dense = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"indices must be uint8 of shape \(4, 1\)"):
        ops.semi_gather_kept_cpu(dense, torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="multiple of 4 columns"):
        ops.semi_gather_kept_cpu(torch.randn(4, 6), torch.zeros(4, 1, dtype=torch.uint8))


@pytest.mark.parametrize("cols", [12, 16])
def test_complement_indices(cols):
    mask = prune_2to4(torch.randn(8, cols), transposable=True)
    assert torch.equal(complement_indices(pack_indices(kept_positions(mask))), pack_indices(kept_positions(~mask)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probe_dense_grad_same_as_plain_torch(plain_torch, dtype):
    torch.manual_seed(1)
    layer = sk.SemiSparseLinear(20, 8, transposable=False, dtype=dtype)
    layer.values.grad = torch.randn_like(layer.values)
    probe = SemiProbe(layer)
    rest = probe.probe.values.grad = torch.randn_like(layer.values)
    fast, plain = both_paths(plain_torch, lambda: probe.dense_grad("layer"))
    probe.remove()
    assert torch.equal(fast, plain)
    assert torch.equal(plain, decompress(layer.values.grad, layer.indices, 20) +
                       decompress(rest, complement_indices(layer.indices), 20))
