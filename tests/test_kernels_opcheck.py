"""Every compiled kernel is a dispatcher op that passes ``torch.library.opcheck``: its
schema (no hidden mutation or aliasing), its fake (exact output shapes, dtypes and
strides), and its use under AOT dispatch with dynamic shapes. Small awkward shapes,
every dtype the op supports, no tokens (M = 0) where an op takes them."""
import pytest
import torch

import sparsekern as sk
from helpers import random_bsr
from test_conv_cases import conv_case, output_gradient
from sparsekern.formats.semi import compress, transpose_permutation
from sparsekern.formats.semi_prune import prune_2to4
from sparsekern.kernels.bsr import cpu as bsr_cpu
from sparsekern.kernels.conv import cpu as conv_cpu
from sparsekern.kernels.lowrank import cpu as lowrank_cpu
from sparsekern.kernels.semi import cpu as semi_cpu

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOKENS = [0, 7]


def _ops(module, family):
    ops = module.ops()
    if ops is None:
        pytest.skip(f"the compiled {family} extension is not built")
    return ops


def _semi_ops():
    if semi_cpu._unavailable(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the 2:4 C++ kernels cannot run here")
    return semi_cpu.ops()


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- block-sparse

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_bsr_forward_and_grad_input(dtype, m, with_bias):
    ops = _ops(bsr_cpu, "bsr")
    weight = random_bsr((35, 33), (5, 3), 0.5, dtype=dtype, seed=1)
    layout, (n, k) = weight.layout, weight.shape
    bias = _randn(n, dtype=dtype, seed=2) if with_bias else None
    torch.library.opcheck(ops.bsr_forward_cpu.default,
                          (_randn(m, k, dtype=dtype), weight.values, layout.row_offsets, layout.col_indices, n, bias))
    torch.library.opcheck(ops.bsr_grad_input_cpu.default,
                          (_randn(m, n, dtype=dtype), weight.values, layout.col_offsets, layout.t_block_ids,
                           layout.t_row_indices, k))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_bsr_grad_weight(dtype, m):
    ops = _ops(bsr_cpu, "bsr")
    layout = random_bsr((35, 33), (5, 3), 0.5, seed=1).layout
    torch.library.opcheck(ops.bsr_grad_weight_cpu.default,
                          (_randn(m, 35, dtype=dtype), _randn(m, 33, dtype=dtype, seed=1), layout.row_indices,
                           layout.col_indices, 5, 3))


# ---------------------------------------------------------------- low-rank

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("transpose_b", [False, True], ids=["ab", "abT"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_lowrank_matmul(dtype, m, transpose_b, with_bias):
    ops = _ops(lowrank_cpu, "lowrank")
    b = _randn(*((17, 5) if transpose_b else (5, 17)), dtype=dtype, seed=1)
    bias = _randn(17, dtype=dtype, seed=2) if with_bias else None
    torch.library.opcheck(ops.lowrank_matmul_cpu.default, (_randn(m, 5, dtype=dtype), b, transpose_b, bias))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("column_sums", [False, True], ids=["nosums", "sums"])
def test_lowrank_transposed_matmul(dtype, tokens, column_sums):
    ops = _ops(lowrank_cpu, "lowrank")
    torch.library.opcheck(ops.lowrank_transposed_matmul_cpu.default,
                          (_randn(tokens, 13, dtype=dtype), _randn(tokens, 5, dtype=dtype, seed=1), column_sums))


# ---------------------------------------------------------------- 2:4 products (float32, bfloat16)

def _semi_weight(rows, cols, transposable, seed=0):
    dense = _randn(rows, cols, seed=seed)
    mask = prune_2to4(dense, transposable=transposable)
    values, indices = compress(dense, mask)
    indices_t = compress(dense.T, mask.T)[1] if transposable else None
    return values, indices, indices_t


def _semi_dtypes():
    return [torch.float32] + ([torch.bfloat16] if semi_cpu.bf16_pairs_usable() else [])


@pytest.mark.parametrize("m", TOKENS + [97])
@pytest.mark.parametrize("through_map", [False, True], ids=["rowwise", "transpose-map"])
def test_semi_plan_and_forward(m, through_map):
    ops = _semi_ops()
    rows, cols, nb, kc = 12, 20, 5, 12
    values, indices, indices_t = _semi_weight(rows, cols, transposable=True)
    for dtype in _semi_dtypes():
        pairs = dtype == torch.bfloat16
        if through_map:  # the forward on Wᵀ (dX), its values read out of W's
            perm = transpose_permutation(indices, indices_t, (rows, cols)).to(torch.int32)
            plan_args, x = (indices_t, perm, rows // 2, nb, kc, pairs), _randn(m, rows).to(dtype)
        else:
            plan_args, x = (indices, None, cols // 2, nb, kc, pairs), _randn(m, cols).to(dtype)
        torch.library.opcheck(ops.semi_plan_cpu.default, plan_args)
        offsets, source = ops.semi_plan_cpu(*plan_args)
        for allow_avx512 in (False, True):
            torch.library.opcheck(ops.semi_forward_cpu.default,
                                  (x, values.to(dtype), offsets, source, nb, kc, allow_avx512))


@pytest.mark.parametrize("m", TOKENS + [97])
@pytest.mark.parametrize("rows", [0, 12, 30])
def test_semi_plan_columns_and_grad_input_rowwise(m, rows):
    ops = _semi_ops()
    cols, nb, kc = 20, 4, 12
    values, indices, _ = _semi_weight(rows, cols, transposable=False)
    torch.library.opcheck(ops.semi_plan_columns_cpu.default, (indices, cols, nb, kc))
    plan = ops.semi_plan_columns_cpu(indices, cols, nb, kc)
    for allow_avx512 in (False, True):
        torch.library.opcheck(ops.semi_grad_input_rowwise_cpu.default,
                              (_randn(m, rows), values, indices, *plan, nb, kc, allow_avx512))


@pytest.mark.parametrize("m", TOKENS)
def test_semi_grad_weight(m):
    ops = _semi_ops()
    _, indices, _ = _semi_weight(12, 20, transposable=False)
    for dtype in _semi_dtypes():
        torch.library.opcheck(ops.semi_grad_weight_cpu.default,
                              (_randn(m, 12).to(dtype), _randn(m, 20, seed=1).to(dtype), indices))


@pytest.mark.parametrize("shape", [(4, 4), (12, 20), (0, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semi_prune_compress(shape, transposable, dtype):
    ops = _semi_ops()
    torch.library.opcheck(ops.semi_prune_compress_cpu.default, (_randn(*shape).to(dtype), transposable))


# ---------------------------------------------------------------- 2:4 DST update kernels

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [0, 8])
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("absolute,with_weight", [(False, False), (True, True)], ids=["signed", "abs-weight"])
def test_semi_drop_grow(dtype, rows, transposable, absolute, with_weight):
    ops = _ops(semi_cpu, "semi")
    mask = prune_2to4(_randn(rows, 12), transposable=transposable)
    drop, grow = _randn(rows, 12, dtype=dtype, seed=1), _randn(rows, 12, dtype=dtype, seed=2)
    torch.library.opcheck(ops.semi_drop_grow_cpu.default,
                          (drop, mask, grow, mask.numel() // 5, transposable, absolute, with_weight))


@pytest.mark.parametrize("rows", [0, 8])
@pytest.mark.parametrize("cols", [12, 16])
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
def test_semi_restructure(rows, cols, transposable):
    ops = _ops(semi_cpu, "semi")
    old = _semi_weight(rows, cols, transposable)[1]
    mask = prune_2to4(_randn(rows, cols, seed=3), transposable=transposable)
    torch.library.opcheck(ops.semi_restructure_cpu.default, (mask, old, transposable))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("rows", [0, 6])
def test_semi_carry(dtype, rows):
    ops = _ops(semi_cpu, "semi")
    slots = torch.randint(-1, 60, (rows, 10), generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(ops.semi_carry_cpu.default, (_randn(6, 10, dtype=dtype), slots))


@pytest.mark.parametrize("dtype", FLOATS + [torch.bool], ids=str)
@pytest.mark.parametrize("rows", [0, 5])
@pytest.mark.parametrize("pairs", [1, 3])
def test_semi_decompress_sum(dtype, rows, pairs):
    ops = _ops(semi_cpu, "semi")
    matrices = [_semi_weight(rows, 20, transposable=False, seed=seed) for seed in range(pairs)]
    values = [(v != 0) if dtype == torch.bool else v.to(dtype) for v, _, _ in matrices]
    torch.library.opcheck(ops.semi_decompress_sum_cpu.default, (values, [i for _, i, _ in matrices], 20))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("rows", [0, 5])
def test_semi_gather_kept(dtype, rows):
    ops = _ops(semi_cpu, "semi")
    _, indices, _ = _semi_weight(rows, 20, transposable=False)
    torch.library.opcheck(ops.semi_gather_kept_cpu.default, (_randn(rows, 20, dtype=dtype), indices))


# ---------------------------------------------------------------- block-sparse conv

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", ["stride2", "groups2-stride1x2", "batch0", "empty-block-rows"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_products(dtype, case, channels_last):
    ops = _ops(conv_cpu, "conv")
    x, values, layout, geometry, bias = conv_case(case, dtype)
    dy = output_gradient(x, geometry)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    geo = geometry.as_list()
    torch.library.opcheck(ops.conv_forward_cpu.default, (x, values, layout.row_offsets, layout.col_indices, geo, bias))
    torch.library.opcheck(ops.conv_grad_input_cpu.default,
                          (dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices, geo,
                           list(x.shape[2:])))
    for bias_grad in (False, True):
        torch.library.opcheck(ops.conv_grad_weight_cpu.default,
                              (dy, x, layout.row_indices, layout.col_indices, geo, bias_grad))


def test_every_compiled_op_is_checked():
    """A new op in csrc/ must get a test here."""
    for module, family in ((bsr_cpu, "bsr"), (conv_cpu, "conv"), (lowrank_cpu, "lowrank"), (semi_cpu, "semi")):
        _ops(module, family)
    names = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("sparsekern::") and name.endswith("_cpu")}
    checked = {"bsr_forward_cpu", "bsr_grad_input_cpu", "bsr_grad_weight_cpu", "conv_forward_cpu",
               "conv_grad_input_cpu", "conv_grad_weight_cpu", "lowrank_matmul_cpu",
               "lowrank_transposed_matmul_cpu", "semi_plan_cpu", "semi_forward_cpu", "semi_grad_weight_cpu",
               "semi_plan_columns_cpu", "semi_grad_input_rowwise_cpu",
               "semi_prune_compress_cpu", "semi_drop_grow_cpu", "semi_restructure_cpu", "semi_carry_cpu",
               "semi_decompress_sum_cpu", "semi_gather_kept_cpu"}
    assert names == checked
