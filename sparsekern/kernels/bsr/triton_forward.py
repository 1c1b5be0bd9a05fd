"""Triton kernels for the products with a sparse *stationary* operand (DSD):
forward ``y = x Wᵀ`` (walk W by block rows) and ``dx = dy W`` (walk W by block
columns through the transpose metadata, never forming Wᵀ).

Both are one kernel: an output block column ``j`` of width OUT_B is the sum, over
the stored blocks of one "segment" (a block row of W for the forward, a block
column for dX), of a (tokens, IN_B) slice of the dense operand times that block.
The two uses differ only in which index arrays list the segments and in which
stride of a stored block is "out" and which is "in".

Tile orientation: the kernel computes the transposed tile ``W_block · aᵀ``
(BO output features x BT tokens) and stores it transposed, so tokens are the MMA
N dimension (wgmma m64nBTk16 with BT = 128 or 256) however narrow the block is.

Persistence and balance: a *unit* is (token tile, output sub-tile, work item), a
work item being a segment or, for segments far longer than the mean, a piece of
one (host-built, cached per layout); it costs max(1, blocks) x K-chunks steps.
The units of one (token tile, sub-tile) form a row; rows, token tiles slowest,
come in rounds, and each round is cut into one near-equal slice per program
(host-built table, cached per layout and program count), rotated by one program
each round so that a program's slices over consecutive rounds are consecutive
and its total stays near the mean. All programs work in the same round at a time
(the dense operand's rows in flight stay few, shared in L2). Each program runs
all its steps in one flat loop, so the load pipeline runs across unit boundaries
instead of restarting for every short segment. The block index of the next step
is loaded one step ahead (a loop-carried scalar), so the tile loads that feed
the dot are plain pointer loads the software pipeliner multi-buffers to the
full num_stages.

Split segments write fp32 partial sums per piece; ``_merge_kernel`` adds the
pieces of each split output block in a fixed order (deterministic, no atomics),
adds the bias and writes the output. Other output blocks get the bias in the
main kernel's epilogue.

This module imports triton: it is loaded on the first kernel call (triton_backend).
The kernels use only core builtins of triton.language (tl.full, not tl.zeros/tl.cdiv):
the @jit functions of triton's standard library are fixed to interpreter or compiled
mode when triton is imported, which breaks one mode or the other in a process that
uses both (tests: interpreter on CPU, then compiled kernels on a GPU).
"""
import bisect
import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .triton_backend import dot_precision, interpreting, parallel_slots, upcast

# A segment is split when longer than twice max(mean segment, MIN_SEGMENT) blocks.
MIN_SEGMENT = 8


def _dsd_kernel(a_ptr, v_ptr, out_ptr, part_ptr, bias_ptr, items_ptr, prefix_ptr, slices_ptr, ids_ptr, gather_ptr,
                n_items, per_row, rows_per_round, n_programs, M, stride_am, stride_ak, stride_om, M_BUCKET, D_BUCKET,
                OUT_B: tl.constexpr, IN_B: tl.constexpr, V_STRIDE_OUT: tl.constexpr, V_STRIDE_IN: tl.constexpr,
                IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BT: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr):
    N_SUB: tl.constexpr = (OUT_B + BO - 1) // BO
    KC: tl.constexpr = (IN_B + BK - 1) // BK
    # Rows (token tile x output sub-tile) of units come in rounds of rows_per_round.
    # In full round k this program takes slice (pid + k) mod P of the host-built table
    # (slices_ptr: first row, first item, first block-step of slices 0..P of a round);
    # the last, partial round is cut into P near-equal ranges here.
    pid = tl.program_id(0)
    n_rows = ((M + BT - 1) // BT) * N_SUB
    n_full = n_rows // rows_per_round
    last_base = n_full * rows_per_round
    s_row, s_item, s_pos = slices_ptr, slices_ptr + n_programs + 1, slices_ptr + 2 * (n_programs + 1)
    # int64 through a tensor: integer arguments equal to 1 arrive as constexprs (no .to).
    one = tl.full([], 1, tl.int64)
    round_steps = one * rows_per_round * per_row
    # Full rounds: P consecutive slices (mod P) per P rounds sum to one round.
    extra = n_full % n_programs
    full_steps = (n_full // n_programs) * round_steps - tl.load(s_pos + pid)
    if pid + extra <= n_programs:
        full_steps += tl.load(s_pos + pid + extra)
    else:
        full_steps += round_steps + tl.load(s_pos + pid + extra - n_programs)
    # Last round: units whose first block-step lies in [lo, hi) of its rows.
    total = one * (n_rows - last_base) * per_row
    lo = pid * total // n_programs
    hi = (pid + 1) * total // n_programs
    # First item starting at or after the in-row offsets (prefix: n_items + 1 ascending starts).
    a_lo, a_hi = 0, n_items
    b_lo, b_hi = 0, n_items
    while a_lo < a_hi:
        mid = (a_lo + a_hi) // 2
        if tl.load(prefix_ptr + mid) >= lo % per_row:
            a_hi = mid
        else:
            a_lo = mid + 1
    while b_lo < b_hi:
        mid = (b_lo + b_hi) // 2
        if tl.load(prefix_ptr + mid) >= hi % per_row:
            b_hi = mid
        else:
            b_lo = mid + 1
    last_steps = (hi - hi % per_row + tl.load(prefix_ptr + b_lo)) - (lo - lo % per_row + tl.load(prefix_ptr + a_lo))
    n_steps = ((full_steps + last_steps) * KC).to(tl.int32)
    # The last round's range as (row, item) from and to, item n_items read as the next row's 0.
    l_row = last_base + (lo // per_row).to(tl.int32) + a_lo // n_items
    l_item = a_lo % n_items
    l_end_row = last_base + (hi // per_row).to(tl.int32) + b_lo // n_items
    l_end_item = b_lo % n_items

    # Loop-carried state of the loads: round k, unit (row, item i) up to the range end
    # (end_row, end_i), position p in the segment arrays and its end q, K-chunk kc, and
    # the stored block / gathered block column. The epilogue walks the same units with
    # its own copies (e_*): offsets derived from the loads' state would be tensors
    # carried through every pipeline stage.
    k = 0
    if n_full > 0:
        row, i = tl.load(s_row + pid), tl.load(s_item + pid)
        end_row, end_i = tl.load(s_row + pid + 1), tl.load(s_item + pid + 1)
    else:
        row, i, end_row, end_i = l_row, l_item, l_end_row, l_end_item
    e_k, e_row, e_i, e_end_row, e_end_i = k, row, i, end_row, end_i
    start = tl.load(items_ptr + n_items + i)
    end = tl.load(items_ptr + 2 * n_items + i)
    p = start
    q = tl.maximum(end, start + 1)  # an empty segment takes one (masked) step: its output is zeros
    kc = 0
    # K extent of the current step: 0 masks the step of an empty segment off.
    k_lim = tl.where(p < end, IN_B, 0)
    block = p.to(tl.int64) if IDENTITY else tl.load(ids_ptr + p, mask=p < end, other=0).to(tl.int64)
    col = tl.load(gather_ptr + p, mask=p < end, other=0).to(tl.int64)
    offs_k = tl.arange(0, BK)
    acc = tl.full((BO, BT), 0.0, tl.float32)
    for _ in range(0, n_steps):
        offs_o = (row % N_SUB) * BO + tl.arange(0, BO)
        offs_t = (row // N_SUB) * BT + tl.arange(0, BT)
        mask_o, mask_t = offs_o < OUT_B, offs_t < M
        kk = kc * BK + offs_k
        mask_k = kk < k_lim
        v = tl.load(v_ptr + block * (OUT_B * IN_B) + offs_o[:, None] * V_STRIDE_OUT + kk[None, :] * V_STRIDE_IN,
                    mask=mask_o[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptr + offs_t.to(tl.int64)[None, :] * stride_am + (col * IN_B + kk)[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_t[None, :], other=0.0)
        if UPCAST:
            v, a = v.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(v, a, acc, input_precision=PRECISION)

        kc += 1
        if kc == KC:
            kc = 0
            p += 1
        # Unit done: the epilogue, then the next unit. Two ifs: the epilogue needs the
        # dot (last pipeline stage), the next unit's loads feed the next tile loads (first).
        done = p == q
        if done:
            out_block = tl.load(items_ptr + e_i)
            slot = tl.load(items_ptr + 3 * n_items + e_i)
            e_o = (e_row % N_SUB) * BO + tl.arange(0, BO)
            e_t = (e_row // N_SUB) * BT + tl.arange(0, BT)
            mask = (e_o < OUT_B)[:, None] & (e_t < M)[None, :]
            if slot < 0:
                result = acc
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + out_block * OUT_B + e_o, mask=e_o < OUT_B, other=0.0)
                    result = acc + bias.to(tl.float32)[:, None]
                out = out_ptr + e_t.to(tl.int64)[None, :] * stride_om + (out_block * OUT_B + e_o)[:, None]
                tl.store(out, result.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                part = part_ptr + (slot.to(tl.int64) * M + e_t[None, :]) * OUT_B + e_o[:, None]
                tl.store(part, acc, mask=mask)
            e_i += 1
            if e_i == n_items:
                e_i = 0
                e_row += 1
            if e_row == e_end_row:
                if e_i == e_end_i:  # the range of this round is done: the next round's
                    e_k += 1
                    if e_k < n_full:
                        s = (pid + e_k) % n_programs
                        e_row = e_k * rows_per_round + tl.load(s_row + s)
                        e_i = tl.load(s_item + s)
                        e_end_row = e_k * rows_per_round + tl.load(s_row + s + 1)
                        e_end_i = tl.load(s_item + s + 1)
                    else:
                        e_row, e_i, e_end_row, e_end_i = l_row, l_item, l_end_row, l_end_item
        acc = tl.where(done, 0.0, acc)
        if done:
            i += 1
            if i == n_items:
                i = 0
                row += 1
            if row == end_row:
                if i == end_i:
                    k += 1
                    if k < n_full:
                        s = (pid + k) % n_programs
                        row = k * rows_per_round + tl.load(s_row + s)
                        i = tl.load(s_item + s)
                        end_row = k * rows_per_round + tl.load(s_row + s + 1)
                        end_i = tl.load(s_item + s + 1)
                    else:
                        row, i, end_row, end_i = l_row, l_item, l_end_row, l_end_item
            start = tl.load(items_ptr + n_items + i)
            end = tl.load(items_ptr + 2 * n_items + i)
            p = start
            q = tl.maximum(end, start + 1)
        # The next step's block index, one step ahead of the loads that use it.
        k_lim = tl.where(p < end, IN_B, 0)
        block = p.to(tl.int64) if IDENTITY else tl.load(ids_ptr + p, mask=p < end, other=0).to(tl.int64)
        col = tl.load(gather_ptr + p, mask=p < end, other=0).to(tl.int64)


def _merge_kernel(part_ptr, out_ptr, bias_ptr, rows_ptr, slot_offsets_ptr, M, stride_om,
                  OUT_B: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr):
    """out[:, row block] = sum of the row's partial slots, in slot order (+ bias)."""
    N_SUB: tl.constexpr = (OUT_B + BO - 1) // BO
    pid_t, pid_r = tl.program_id(0), tl.program_id(1)
    out_block = tl.load(rows_ptr + pid_r // N_SUB)
    lo = tl.load(slot_offsets_ptr + pid_r // N_SUB)
    hi = tl.load(slot_offsets_ptr + pid_r // N_SUB + 1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_o = (pid_r % N_SUB) * BO + tl.arange(0, BO)
    mask = (offs_t < M)[:, None] & (offs_o < OUT_B)[None, :]
    acc = tl.full((BT, BO), 0.0, tl.float32)
    base = lo.to(tl.int64) * M
    for _ in range(lo, hi):
        acc += tl.load(part_ptr + (base + offs_t[:, None]) * OUT_B + offs_o[None, :], mask=mask, other=0.0)
        base += M
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_block * OUT_B + offs_o, mask=offs_o < OUT_B, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_t.to(tl.int64)[:, None] * stride_om + out_block * OUT_B + offs_o[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BT tokens, BO outputs, BK, num_warps, num_stages); BO/BK are clamped to the block,
# then configs_for drops those that overflow shared memory or give a warpgroup fewer
# than 128 tokens of MMA N.
_CONFIGS = [
    (128, 64, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 4, 5),
    (128, 64, 32, 4, 4),
    (128, 64, 32, 4, 6),
    (128, 64, 32, 4, 7),
    (256, 64, 64, 8, 3),
    (256, 64, 64, 8, 4),
    (256, 64, 32, 8, 6),
    (256, 64, 32, 8, 7),
    (128, 128, 64, 8, 4),
]
# Fixed tile under the interpreter: small, and narrower than the tested blocks so
# the sub-tile and K-chunk loops are exercised.
_INTERPRET_TILE = dict(BT=16, BO=16, BK=16)
_MERGE_TILE = dict(BT=64, BO=64)
# Shared memory of an sm_90 block (opt-in); the bound for the compile-time configs.
SM90_SHARED = 232448


def tile(limit, width):
    """Tile edge for a block edge ``width``: a power of two >= 16 (tl.dot's minimum), <= limit."""
    return min(limit, max(16, triton.next_power_of_2(width)))


def shared_bytes(bt, bo, bk, stages, elem_size, hopper=True):
    """Shared memory of a config, an upper bound: the operand tiles' buffers (as many
    as stages on sm_90, one fewer before) and the fp32 (BO, BT) tile that the epilogue
    may convert through shared memory."""
    buffers = stages if hopper else stages - 1
    return buffers * (bo * bk + bk * bt) * elem_size + bo * bt * 4


def warpgroup_n(bt, bo, warps):
    """Tokens (MMA N) per warpgroup: warpgroups split the outputs in rows of 64 first,
    then the tokens."""
    groups = max(1, warps // 4)
    along_outputs = max(1, min(groups, bo // 64))
    return bt // (groups // along_outputs)


def configs_for(out_b, in_b, elem_size, shared_limit, hopper=True):
    """The configs for a block of (OUT_B, IN_B): tiles clamped to it, then duplicates,
    configs whose warpgroups get N < 128 and configs over ``shared_limit`` bytes removed
    (the smallest stays if none fits, so a small device still gets a kernel)."""
    keys = []
    for bt, bo, bk, warps, stages in _CONFIGS:
        key = (bt, tile(bo, out_b), tile(bk, in_b), warps, stages)
        if key not in keys and warpgroup_n(*key[:2], warps) >= 128:
            keys.append(key)
    def shared(key):
        return shared_bytes(*key[:3], key[4], elem_size, hopper)
    fitting = [key for key in keys if shared(key) <= shared_limit] or [min(keys, key=shared)]
    return [triton.Config(dict(BT=bt, BO=bo, BK=bk), num_warps=warps, num_stages=stages)
            for bt, bo, bk, warps, stages in fitting]


@functools.cache
def _shared_memory(index):
    """(opt-in shared memory bytes per block, sm_90 or later) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.shared_memory_per_block_optin, props.major >= 9


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    a = args["a_ptr"]
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    return configs_for(args["OUT_B"], args["IN_B"], a.element_size(), *_shared_memory(index))


@functools.cache
def _kernel(interpret):
    """The jitted kernels (triton.jit reads TRITON_INTERPRET when it decorates, hence one
    pair per mode); the DSD kernel autotuned outside the interpreter (it would run every config)."""
    kernel, merge = triton.jit(_dsd_kernel), triton.jit(_merge_kernel)
    if interpret:
        return kernel, merge
    configs = [triton.Config(dict(BT=bt, BO=bo, BK=bk), num_warps=w, num_stages=s) for bt, bo, bk, w, s in _CONFIGS]
    tuned = triton.autotune(configs, key=["M_BUCKET", "D_BUCKET", "OUT_B", "IN_B", "V_STRIDE_OUT", "HAS_BIAS"],
                            prune_configs_by=dict(early_config_prune=_prune))(kernel)
    return tuned, merge


@dataclass(frozen=True)
class Schedule:
    """Work items of a DSD launch, built once per layout.

    ``items`` (4, W) int32 rows: output block, first and end position in the segment
    arrays, partial slot (-1: write the output directly). ``prefix`` (W + 1) int32: the
    first block-step of each item within a row of units (an item takes max(1, blocks)
    steps; ``host_prefix`` on the host), ``per_row`` its total. Split output blocks are
    ``split_rows``; the partial slots of split_rows[r] are slot_offsets[r]:slot_offsets[r + 1].
    ``density``: the autotune bucket, mean blocks per segment rounded up to a power of two.
    ``rounds`` caches :func:`round_slices` per program count."""
    items: torch.Tensor
    prefix: torch.Tensor
    split_rows: torch.Tensor
    slot_offsets: torch.Tensor
    host_prefix: list
    n_slots: int
    density: int
    rounds: dict = field(default_factory=dict)

    @property
    def per_row(self):
        return self.host_prefix[-1]

    def round_slices(self, programs):
        """(rows per round, slice table on the device) for ``programs`` programs, cached."""
        if programs not in self.rounds:
            rows, table = round_slices(self.host_prefix, programs)
            self.rounds[programs] = rows, table.to(self.items.device)
        return self.rounds[programs]


# A program's slice of a full round spans at least this many of the longest units.
ROUND_UNITS = 2


def round_slices(prefix, programs):
    """Rows of units per round and the (3, programs + 1) int32 table of slice starts.

    A round is ``rows`` consecutive rows of units (rows are alike: the same items for
    every token tile and output sub-tile). Slice s of a round is the units whose first
    block-step lies in [s W / P, (s + 1) W / P) of the round's W block-steps, given as
    (row, item, block-step) of its first unit; slice P is the round's end. Rounds are
    long enough that every slice holds a unit: W / P >= ROUND_UNITS x the longest unit.
    """
    per_row, n_items = prefix[-1], len(prefix) - 1
    longest = max(b - a for a, b in zip(prefix, prefix[1:]))
    rows = max(1, math.ceil(ROUND_UNITS * programs * longest / per_row))
    width = rows * per_row
    if width >= 2 ** 31:
        raise ValueError(f"a row of {per_row} block-steps is more than the int32 round table allows")
    table = []
    for s in range(programs + 1):
        row, offset = divmod(s * width // programs, per_row)
        item = bisect.bisect_left(prefix, offset)
        if item == n_items:
            row, item = row + 1, 0
        table.append((row, item, row * per_row + prefix[item]))
    return rows, torch.tensor(table, dtype=torch.int32).T.contiguous()


def plan(counts, min_segment=MIN_SEGMENT):
    """Work items ``(out_block, start, end, slot)`` for segments of ``counts`` blocks, longest first.

    Segments longer than twice the target length max(mean, min_segment) are cut in
    near-equal pieces, each with its own partial slot (a row's slots are consecutive).
    Empty segments stay (their output block must be written with zeros).
    """
    target = max(min_segment, math.ceil(sum(counts) / max(1, len(counts))))
    items, start = [], 0
    slot_rows = []
    for out_block, count in enumerate(counts):
        if count > 2 * target:
            pieces = math.ceil(count / target)
            bounds = [start + count * i // pieces for i in range(pieces + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                items.append((out_block, lo, hi, len(slot_rows)))
                slot_rows.append(out_block)
        else:
            items.append((out_block, start, start + count, -1))
        start += count
    items.sort(key=lambda item: item[1] - item[2])  # stable: longest first
    return items, slot_rows


_schedules = {}


def _check_indices(name, indices, bound):
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= bound):
        raise ValueError(f"{name} has entries outside [0, {bound}): the layout is corrupt")


def schedule(offsets, ids, gather, n_gather):
    """The cached :class:`Schedule` of a segment-offsets tensor: one host copy per layout,
    which also checks the layout's index arrays once (a kernel would read out of bounds)."""
    entry = _schedules.get(id(offsets))
    if entry is not None and entry[0]() is offsets:
        return entry[1]
    counts = torch.diff(offsets).tolist()
    nnz = gather.numel()
    if offsets.numel() == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != nnz or min(counts, default=0) < 0:
        raise ValueError(f"segment offsets must rise from 0 to the {nnz} stored blocks: the layout is corrupt")
    _check_indices("the gathered block index", gather, n_gather)
    if ids is not None:
        _check_indices("the stored-block index", ids, nnz)
    items, slot_rows = plan(counts)
    steps = [max(1, end - start) for _, start, end, _ in items]
    prefix = [0]
    for step in steps:
        prefix.append(prefix[-1] + step)
    if prefix[-1] >= 2 ** 31:
        raise ValueError(f"{nnz} stored blocks: more than the int32 positions of the work items allow")
    split_rows, per_row_slots = torch.unique(torch.tensor(slot_rows, dtype=torch.int64), return_counts=True)
    slot_offsets = torch.zeros(split_rows.numel() + 1, dtype=torch.int32)
    slot_offsets[1:] = torch.cumsum(per_row_slots, 0)
    device = offsets.device
    mean = sum(counts) / max(1, len(counts))
    result = Schedule(torch.tensor(items, dtype=torch.int32).reshape(-1, 4).T.contiguous().to(device),
                      torch.tensor(prefix, dtype=torch.int32).to(device), split_rows.to(device),
                      slot_offsets.to(device), prefix, len(slot_rows), triton.next_power_of_2(max(1, math.ceil(mean))))
    key = id(offsets)
    _schedules[key] = (weakref.ref(offsets, lambda _: _schedules.pop(key, None)), result)
    return result


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dsd(a, values, offsets, ids, gather, out_b, in_b, v_strides, bias=None):
    """Launch: ``out[:, j*OUT_B:(j+1)*OUT_B] = sum over segment j of a-slice @ block (+ bias)``."""
    m, n_out, n_in = a.shape[0], offsets.numel() - 1, a.shape[1] // in_b
    if values.device != a.device or offsets.device != a.device or (bias is not None and bias.device != a.device):
        raise ValueError(f"the dense operand is on {a.device}, the values on {values.device}, the layout on "
                         f"{offsets.device}" + ("" if bias is None else f", the bias on {bias.device}"))
    if values.dtype != a.dtype or (bias is not None and bias.dtype != a.dtype):
        raise ValueError(f"dtypes differ: dense {a.dtype}, values {values.dtype}"
                         + ("" if bias is None else f", bias {bias.dtype}"))
    if bias is not None and bias.shape != (n_out * out_b,):
        raise ValueError(f"bias must have shape ({n_out * out_b},), got {tuple(bias.shape)}")
    # The kernel indexes values and the metadata as dense arrays; the dense operand by its strides.
    values, gather = values.contiguous(), gather.contiguous()
    ids = None if ids is None else ids.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(m, n_out * out_b, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    plan_ = schedule(offsets, ids, gather, n_in)
    n_items = plan_.items.shape[1]
    part = torch.empty(plan_.n_slots, m, out_b, dtype=torch.float32, device=a.device) if plan_.n_slots else out
    # Two programs per SM: a second one runs where shared memory allows, else they form
    # two waves of equal slices.
    programs = 2 * parallel_slots(a.device)
    rows_per_round, slices = plan_.round_slices(programs)
    args = (a, values, out, part, out if bias is None else bias, plan_.items, plan_.prefix, slices,
            gather if ids is None else ids, gather, n_items, plan_.per_row, rows_per_round, programs, m, a.stride(0),
            a.stride(1), out.stride(0), triton.next_power_of_2(m), plan_.density)
    meta = dict(OUT_B=out_b, IN_B=in_b, V_STRIDE_OUT=v_strides[0], V_STRIDE_IN=v_strides[1], IDENTITY=ids is None,
                HAS_BIAS=bias is not None, PRECISION=dot_precision(a.dtype), UPCAST=upcast(a.dtype))
    kernel, merge = _kernel(interpreting())
    with _device_guard(a.device):
        if interpreting():
            kernel[(programs,)](*args, **meta, **_INTERPRET_TILE)
        else:
            kernel[(programs,)](*args, **meta)
        if plan_.n_slots:
            n_sub = triton.cdiv(out_b, _MERGE_TILE["BO"])
            grid = (triton.cdiv(m, _MERGE_TILE["BT"]), plan_.split_rows.numel() * n_sub)
            merge[grid](part, out, out if bias is None else bias, plan_.split_rows, plan_.slot_offsets, m,
                        out.stride(0), OUT_B=out_b, HAS_BIAS=bias is not None, **_MERGE_TILE)
    return out


def bsr_forward(x, values, layout, bias=None):
    """x (M, K), W (N, K) as (values (nnz, br, bc), layout) -> y = x @ W.T (+ bias), (M, N)."""
    br, bc = layout.block_size
    _check_operands(x, values, layout, layout.shape[1])
    return _dsd(x, values, layout.row_offsets, None, layout.col_indices, br, bc, (bc, 1), bias)


def bsr_grad_input(dy, values, layout):
    """dy (M, N), W (N, K) -> dx = dy @ W, (M, K), walking W's block columns."""
    br, bc = layout.block_size
    _check_operands(dy, values, layout, layout.shape[0])
    return _dsd(dy, values, layout.col_offsets, layout.t_block_ids, layout.t_row_indices, bc, br, (1, bc))


def _check_operands(a, values, layout, width):
    if a.dim() != 2 or a.shape[1] != width:
        raise ValueError(f"the dense operand must be (tokens, {width}), got {tuple(a.shape)}")
    if tuple(values.shape) != (layout.nnz_blocks, *layout.block_size):
        raise ValueError(f"values must be (nnz, br, bc) = {(layout.nnz_blocks, *layout.block_size)}, "
                         f"got {tuple(values.shape)}")
