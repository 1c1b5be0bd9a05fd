"""C++ 2:4 products and prune+compress on CPU (``sparsekern._C_semi``, csrc/semi/): fp32 on AVX2 + FMA
(AVX-512F where the CPU has it), bf16 on AVX512-BF16 dot products; fp16, and bf16 where those
cannot run, on the fp32 kernels (widened exactly, rounded once).

The extension is loaded on first use; without it (or on a CPU without AVX2, or
for another dtype) this backend reports itself unavailable and the registry
picks the reference one. Its kernels are dispatcher ops, whose fakes are
registered here (the DST update kernels' too: one extension, one place):

``semi_plan_cpu(indices, perm, half, nb, kc, pairs) -> (offsets, source)`` (``pairs``: for bf16)
``semi_forward_cpu(x, values, offsets, source, nb, kc, allow_avx512) -> y``
``semi_plan_columns_cpu(indices, cols, nb, kc) -> (offsets, source, segments)`` (row-wise W's dX)
``semi_grad_input_rowwise_cpu(dy, values, indices, offsets, source, segments, nb, kc, allow_avx512) -> dx``
``semi_grad_weight_cpu(dy, x, indices) -> dvalues``
``semi_prune_compress_cpu(dense, transposable) -> (values, indices, values_t?, indices_t?)``
``semi_drop_grow_cpu``, ``semi_restructure_cpu``, ``semi_carry_cpu``, ``semi_decompress_sum_cpu``,
``semi_gather_kept_cpu``:
    see :mod:`sparsekern.kernels.semi.dst_cpu`.

The kernels read W through a *plan* (its indices decoded to panel offsets, and
where each value of the weight stream comes from), built once per structure and
cached here against the index tensors themselves (weak references, so a plan
dies with its structure and a recycled address can never match a stale one).
"""
import weakref

import torch

from ..._extension import extension_failure, load_extension, load_ops
from ..floor import register_floor, tokens_bucket
from ..microkernel import requested_isa
from ..registry import register_kernel

# Forward blocking (weight rows per task, panel columns per block; docs/semi.md), by pairs: fp32
# panels of 64 columns take 24 KiB; bf16 pair panels 36 KiB, and measured fastest at 128 rows.
_BLOCKING = {False: (64, 64), True: (128, 64)}
_plans = {}           # (kind, id(indices), id(map)) -> (weak refs, indices version, plan)


def _register_fakes():
    fakes = {"semi_plan_cpu": _plan_fake, "semi_forward_cpu": _forward_fake,
             "semi_plan_columns_cpu": _plan_columns_fake, "semi_grad_input_rowwise_cpu": _grad_input_rowwise_fake,
             "semi_grad_weight_cpu": _grad_weight_fake, "semi_prune_compress_cpu": _prune_compress_fake,
             "semi_drop_grow_cpu": _drop_grow_fake, "semi_restructure_cpu": _restructure_fake,
             "semi_carry_cpu": _carry_fake, "semi_decompress_sum_cpu": _decompress_sum_fake,
             "semi_gather_kept_cpu": _gather_kept_fake}
    for name, fake in fakes.items():
        torch.library.register_fake(f"sparsekern::{name}", fake)


def _index_bytes(cols):
    return -(-cols // 8)  # packed 2-bit positions of cols/2 kept entries, four per byte


def _plan_fake(indices, perm, half, nb, kc, pairs):
    rows = indices.shape[0]
    return (indices.new_empty(rows, half // 2 if pairs else half, dtype=torch.int16),
            indices.new_empty(rows if perm is not None else 0, half, dtype=torch.int32))


def _forward_fake(x, values, offsets, source, nb, kc, allow_avx512):
    return x.new_empty(x.shape[0], offsets.shape[0])


def _plan_columns_fake(indices, cols, nb, kc):
    slots = torch.library.get_ctx().new_dynamic_size()  # the kept entries in stream order: data-dependent
    blocks = -(-indices.shape[0] // kc)
    return (indices.new_empty(slots, dtype=torch.int16), indices.new_empty(slots, dtype=torch.int32),
            indices.new_empty(blocks, cols // 2, 3, dtype=torch.int64))


def _grad_input_rowwise_fake(dy, values, indices, offsets, source, segments, nb, kc, allow_avx512):
    return dy.new_empty(dy.shape[0], 2 * values.shape[1])


def _grad_weight_fake(dy, x, indices):
    return x.new_empty(dy.shape[1], x.shape[1] // 2)


def _prune_compress_fake(dense, transposable):
    rows, cols = dense.shape
    values, indices = dense.new_empty(rows, cols // 2), dense.new_empty(rows, _index_bytes(cols), dtype=torch.uint8)
    if not transposable:
        return values, indices, None, None
    return values, indices, dense.new_empty(cols, rows // 2), dense.new_empty(cols, _index_bytes(rows),
                                                                               dtype=torch.uint8)


def _drop_grow_fake(drop, mask, grow, n_drop, transposable, absolute, with_weight):
    return torch.empty_like(mask), torch.empty_like(drop) if with_weight else None


def _restructure_fake(mask, old_indices, transposable):
    rows, cols = mask.shape
    indices_t = mask.new_empty(cols, _index_bytes(rows), dtype=torch.uint8) if transposable else None
    return mask.new_empty(rows, cols // 2, dtype=torch.int64), torch.empty_like(old_indices), indices_t


def _carry_fake(tensor, slots):
    return tensor.new_empty(slots.shape)


def _decompress_sum_fake(values, indices, cols, allow_avx512=False):
    return values[0].new_empty(values[0].shape[0], cols)


def _gather_kept_fake(dense, indices):
    return dense.new_empty(dense.shape[0], dense.shape[1] // 2)


def ops():
    """``torch.ops.sparsekern`` with the 2:4 ops and their fakes registered, or None."""
    return load_ops("semi", _register_fakes)


def _unavailable(device, dtype, dtypes=(torch.float32,)):
    if device.type != "cpu":
        return f"runs on CPU tensors only, got {device.type}"
    if dtype not in dtypes:
        return f"supports {', '.join(str(d).split('.')[-1] for d in dtypes)} only, got {dtype}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 + FMA, this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    if requested_isa() == "portable":
        return "SPARSEKERN_CPU_ISA=portable, and the 2:4 kernels have no portable path (AVX2/FMA at least)"
    if requested_isa() in ("avx512", "amx") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise ValueError(f"SPARSEKERN_CPU_ISA={requested_isa()}: this CPU cannot run the {requested_isa()} kernels "
                         f"(torch reports {torch.backends.cpu.get_cpu_capability()})")
    if ops() is None:
        return f"extension sparsekern._C_semi not loaded ({extension_failure('semi')})"
    return None


def bf16_pairs_usable():
    """Whether the bf16 forward / dX kernels run here: AVX512-BF16, and no lower path asked for."""
    module = load_extension("semi")
    return requested_isa() not in ("portable", "avx2") and module is not None and module.bf16_pairs_usable()


def _allow_avx512():
    """Whether the fp32 row kernels may take AVX-512F where the CPU has it (SPARSEKERN_CPU_ISA)."""
    return requested_isa() != "avx2"


def _widened(dtype):
    """Whether the products run ``dtype`` on the fp32 kernels: fp16 (no fp16 kernel; where the CPU
    lacks AVX512-FP16 torch's own fp16 GEMMs are far slower still), and bf16 where the pair
    kernels cannot run."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not bf16_pairs_usable())


def kernel_isa(dtype):
    """What the 2:4 products run in ``dtype`` here: "avx512f+avx512_bf16" (bf16 dot products),
    "avx512f" or "avx2-fma" (fp32; "... (widened to fp32)" for half types without a kernel of
    their own), None where the backend cannot run."""
    if _products_unavailable(torch.device("cpu"), dtype) is not None:
        return None
    if dtype == torch.bfloat16 and not _widened(dtype):
        return "avx512f+avx512_bf16"
    isa = load_extension("semi").fp32_row_isa(_allow_avx512())  # the choice forward() makes
    return f"{isa} (widened to fp32)" if _widened(dtype) else isa


def _products_unavailable(device, dtype):
    return _unavailable(device, dtype, (torch.float32, torch.bfloat16, torch.float16))


def plan(indices, transpose_map, half, nb=None, kc=None, pairs=False):
    """(panel offsets, value positions) of the weight stream of the structure ``indices``
    (values read through ``transpose_map`` when given), for the forward blocking ``nb``, ``kc``
    (default: the kernels'); ``pairs``: the bf16 kernels' (one offset per kept pair)."""
    default_nb, default_kc = _BLOCKING[pairs]
    return ops().semi_plan_cpu(indices, transpose_map, half, nb or default_nb, kc or default_kc, pairs)


def forward(x, values, offsets, source, nb=None, kc=None, allow_avx512=None):
    """y = x Wᵀ with W given by ``values`` and a plan made with the same blocking (and
    ``pairs`` for bf16); fp32 on the AVX-512 row kernels where the CPU has them, unless
    ``allow_avx512`` is False or SPARSEKERN_CPU_ISA asks for avx2."""
    if allow_avx512 is None:
        allow_avx512 = _allow_avx512()
    default_nb, default_kc = _BLOCKING[x.dtype == torch.bfloat16]
    return ops().semi_forward_cpu(x, values, offsets, source, nb or default_nb, kc or default_kc, allow_avx512)


def plan_columns(indices, cols, nb=None, kc=None):
    """(panel offsets, value positions, segments) of the ragged stream of the row-wise W (rows,
    ``cols``) that ``indices`` encode, read as Wᵀ's rows, for the forward blocking ``nb``, ``kc``."""
    default_nb, default_kc = _BLOCKING[False]
    return ops().semi_plan_columns_cpu(indices, cols, nb or default_nb, kc or default_kc)


def _cached(kind, indices, transpose_map, build):
    key = (kind, id(indices), id(transpose_map))
    hit = _plans.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], (indices, transpose_map))) \
            and hit[1] == indices._version:
        return hit[2]
    result = build()
    refs = tuple(weakref.ref(t, lambda _, k=key: _plans.pop(k, None)) if t is not None else (lambda: None)
                 for t in (indices, transpose_map))
    _plans[key] = (refs, indices._version, result)
    return result


def _cached_plan(indices, transpose_map, half, dtype):
    pairs = dtype == torch.bfloat16
    return _cached("pairs" if pairs else "rows", indices, transpose_map,
                   lambda: plan(indices, transpose_map, half, pairs=pairs))


def semi_forward(x, values, indices, bias=None):
    if _widened(x.dtype):
        return semi_forward(x.float(), values.float(), indices, None if bias is None else bias.float()).to(x.dtype)
    y = forward(x, values, *_cached_plan(indices, None, x.shape[1] // 2, x.dtype))
    return y if bias is None else y.add_(bias)


def semi_grad_input(dy, values, indices, indices_t=None, transpose_map=None):
    if _widened(dy.dtype):
        return semi_grad_input(dy.float(), values.float(), indices, indices_t, transpose_map).to(dy.dtype)
    if indices_t is not None:   # transposable: the forward on Wᵀ, values read out of W's
        return forward(dy, values, *_cached_plan(indices_t, transpose_map, dy.shape[1] // 2, dy.dtype))
    cols = 2 * values.shape[1]
    if dy.dtype == torch.bfloat16:  # no ragged pair kernel: the dense product (oneDNN's bf16 GEMM)
        return dy @ ops().semi_decompress_sum_cpu([values], [indices], cols, _allow_avx512())
    # Row-wise-only 2:4: the forward on Wᵀ, whose rows keep varying counts (plan_columns).
    nb, kc = _BLOCKING[False]
    return ops().semi_grad_input_rowwise_cpu(
        dy, values, indices, *_cached("columns", indices, None, lambda: plan_columns(indices, cols)), nb, kc,
        _allow_avx512())


def semi_grad_weight(dy, x, indices):
    if _widened(x.dtype):
        return ops().semi_grad_weight_cpu(dy.float(), x.float(), indices).to(x.dtype)
    return ops().semi_grad_weight_cpu(dy, x, indices)


def semi_prune_compress(dense, transposable):
    if dense.dtype != torch.float16:   # fp32 and bf16 (scored on its exact fp32 values)
        return ops().semi_prune_compress_cpu(dense, transposable)
    # fp16: the fp32 kernel on the weight widened (exactly, so the same magnitudes, ties and
    # decisions as the reference on the half weight), its kept values narrowed back (exactly).
    values, indices, values_t, indices_t = ops().semi_prune_compress_cpu(dense.float(), transposable)
    return values.to(dense.dtype), indices, None if values_t is None else values_t.to(dense.dtype), indices_t


def transposable_pattern_table():
    """The 90 transposable 4x4 patterns in the order the C++ prune scores them, (90, 16) bool."""
    return load_extension("semi").transposable_pattern_table()


register_kernel("semi_forward", "cpu", semi_forward, _products_unavailable)
register_kernel("semi_grad_input", "cpu", semi_grad_input, _products_unavailable)
register_kernel("semi_grad_weight", "cpu", semi_grad_weight, _products_unavailable)
register_kernel("semi_prune_compress", "cpu", semi_prune_compress, _products_unavailable)
register_floor("semi_forward", "dense",
               lambda x, values, indices, bias=None: (tokens_bucket(x.shape[0]), values.shape, bias is not None))
register_floor("semi_grad_input", "dense",
               lambda dy, values, indices, indices_t=None, transpose_map=None:
               (tokens_bucket(dy.shape[0]), values.shape, indices_t is not None))
register_floor("semi_grad_weight", "dense",
               lambda dy, x, indices: (tokens_bucket(dy.shape[0]), dy.shape[1], x.shape[1]))
