"""``cpu`` backend of the block-sparse products: the dispatcher ops of ``sparsekern._C_bsr``.

Register-blocked microkernels (AVX-512F, AVX2/FMA, or portable loops: the path the CPU runs,
kernels/microkernel.py) over packed operands, threads through ATen's pool
(``torch.set_num_threads``). float32/float64 run natively; bfloat16 on bf16 tile steps where the
path has them for the block shape (:func:`bf16_engine`), else like float16 packed to float32,
computed and accumulated in float32, and rounded once on output. Sources: csrc/bsr/.

The ops (``torch.ops.sparsekern.bsr_*_cpu``) and their fakes, registered on first use:

``bsr_forward_cpu(x, values, row_offsets, col_indices, out_features, bias=None)``
``bsr_grad_input_cpu(dy, values, col_offsets, t_block_ids, t_row_indices, in_features)``
``bsr_grad_weight_cpu(dy, x, row_indices, col_indices, block_rows, block_cols, bias_grad=False)`` -> (dvalues,
dbias; empty unless bias_grad: dY's column sums on the pass that packs it)
"""
import torch

from ..._extension import cpu_extension_unavailable, load_extension, load_ops
from ..floor import density_bucket, register_floor, tokens_bucket
from ..microkernel import cpu_capabilities
from ..registry import register_kernel

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _register_fakes():
    torch.library.register_fake("sparsekern::bsr_forward_cpu", _forward_fake)
    torch.library.register_fake("sparsekern::bsr_grad_input_cpu", _grad_input_fake)
    torch.library.register_fake("sparsekern::bsr_grad_weight_cpu", _grad_weight_fake)


def _forward_fake(x, values, row_offsets, col_indices, out_features, bias=None):
    return x.new_empty(x.shape[0], out_features)


def _grad_input_fake(dy, values, col_offsets, t_block_ids, t_row_indices, in_features):
    return dy.new_empty(dy.shape[0], in_features)


def _grad_weight_fake(dy, x, row_indices, col_indices, block_rows, block_cols, bias_grad=False):
    return x.new_empty(row_indices.shape[0], block_rows, block_cols), dy.new_empty(dy.shape[1] if bias_grad else 0)


def ops():
    """``torch.ops.sparsekern`` with the block-sparse ops and their fakes registered, or None."""
    return load_ops("bsr", _register_fakes)


def unavailable(device, dtype):
    return cpu_extension_unavailable("bsr", _DTYPES, device, dtype)


def bf16_engine(block_size):
    """What computes bfloat16 products of ``block_size`` blocks (an int, or (rows, cols)) on the
    current path: "amx tiles" (sides multiples of 32, the amx path), "dot-product tiles" (the
    same blocks on AVX512-BF16 dot products, the avx512 path), "amx strips" / "dot-product
    strips" (other multiples of 16: 16-column strips on half-depth AMX tiles, the amx path, or
    on dot products, the avx512 path), "widened to fp32", or "unavailable" (extension not built)."""
    module = load_extension("bsr")
    if module is None:
        return "unavailable"
    rows, cols = (block_size, block_size) if isinstance(block_size, int) else block_size
    return module.bf16_engine(rows, cols)


def bsr_forward(x, values, layout, bias=None):
    return ops().bsr_forward_cpu(x, values, layout.row_offsets, layout.col_indices, layout.shape[0], bias)


def bsr_grad_input(dy, values, layout):
    return ops().bsr_grad_input_cpu(dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices,
                                    layout.shape[1])


def bsr_grad_weight(dy, x, layout, bias_grad=False):
    dvalues, dbias = ops().bsr_grad_weight_cpu(dy, x, layout.row_indices, layout.col_indices, *layout.block_size,
                                               bias_grad)
    return dvalues, dbias if bias_grad else None


register_kernel("bsr_forward", "cpu", bsr_forward, unavailable)
register_kernel("bsr_grad_input", "cpu", bsr_grad_input, unavailable)
register_kernel("bsr_grad_weight", "cpu", bsr_grad_weight, unavailable)


def _layout_class(a, layout):
    grid = layout.grid
    return (tokens_bucket(a.shape[0]), layout.shape, layout.block_size,
            density_bucket(layout.nnz_blocks, grid[0] * grid[1]))


def _shape_class(a, _, layout, bias=None):
    return _layout_class(a, layout) + (bias is not None,)


def _sparse_enough(a, _, layout, bias=None):
    # At most a quarter of the dense work, computed in the call's own arithmetic: the kernels
    # won >= 2x there on every CPU measured (AVX2 kernels against MKL's AVX-512 code included).
    # Half-precision calls widened to fp32, on dot products where dense bf16 has AMX tiles, or on
    # half-depth AMX strips face a dense GEMM faster per multiply-add (on an AMX Xeon, block 16
    # bf16 widened: a step 0.48x of dense bf16 at a quarter; on AMX strips: forward 1.6x), so
    # those are measured.
    grid = layout.grid
    return 4 * layout.nnz_blocks <= grid[0] * grid[1] and _native_speed(a.dtype, layout.block_size)


def _native_speed(dtype, block_size):
    if dtype in (torch.float32, torch.float64):
        return True
    if dtype != torch.bfloat16:
        return False
    engine = bf16_engine(block_size)
    return engine == "amx tiles" or engine.startswith("dot-product") and not _cpu_has_amx_bf16()


def _cpu_has_amx_bf16():
    return cpu_capabilities().get("amx_bf16", False)


def _weight_class(dy, x, layout, bias_grad=False):
    return _layout_class(dy, layout) + (bias_grad,)


for _product in ("bsr_forward", "bsr_grad_input"):
    register_floor(_product, "dense", _shape_class, _sparse_enough)
register_floor("bsr_grad_weight", "dense", _weight_class, _sparse_enough)
