"""Triton kernels of :mod:`sparsekern.kernels.semi.triton_prune` (imported on first use only,
so ``import sparsekern`` never loads triton and tests can set TRITON_INTERPRET=1 first)."""
import triton
import triton.language as tl


@triton.jit
def _pick(a0, a1, a2, a3):
    """Positions (p0 < p1) and values of the two largest |a| of four (ties: lower index)."""
    m0, m1, m2, m3 = tl.abs(a0), tl.abs(a1), tl.abs(a2), tl.abs(a3)
    # Rank of each: how many beat it (larger, or equal and earlier); kept if fewer than 2.
    r0 = (m1 > m0).to(tl.int32) + (m2 > m0).to(tl.int32) + (m3 > m0).to(tl.int32)
    r1 = (m0 >= m1).to(tl.int32) + (m2 > m1).to(tl.int32) + (m3 > m1).to(tl.int32)
    r2 = (m0 >= m2).to(tl.int32) + (m1 >= m2).to(tl.int32) + (m3 > m2).to(tl.int32)
    r3 = (m0 >= m3).to(tl.int32) + (m1 >= m3).to(tl.int32) + (m2 >= m3).to(tl.int32)
    return _positions(r0 < 2, r1 < 2, r2 < 2, r3 < 2, a0, a1, a2, a3)


@triton.jit
def _positions(k0, k1, k2, k3, a0, a1, a2, a3):
    """From exactly two kept flags: (nibble p0 | p1 << 2, value at p0, value at p1)."""
    p0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    p1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    v0 = tl.where(k0, a0, tl.where(k1, a1, a2))
    v1 = tl.where(k3, a3, tl.where(k2, a2, a1))
    return p0 | (p1 << 2), v0, v1


@triton.jit
def prune_rows(w_ptr, values_ptr, indices_ptr, rows, cols, index_cols, BLOCK: tl.constexpr):
    """Row-wise 2:4. Program (row, block of BLOCK group pairs): one index byte per pair."""
    row = tl.program_id(0).to(tl.int64)  # row * cols passes 2**31 on large weights
    pair = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nibbles = tl.full([BLOCK], 0, tl.int32)  # core builtin: tl.zeros is std-lib, fixed to one mode at import
    for half in tl.static_range(2):
        group = 2 * pair + half
        valid = group < cols // 4
        base = w_ptr + row * cols + 4 * group
        a0 = tl.load(base + 0, mask=valid, other=0.0)
        a1 = tl.load(base + 1, mask=valid, other=0.0)
        a2 = tl.load(base + 2, mask=valid, other=0.0)
        a3 = tl.load(base + 3, mask=valid, other=0.0)
        nibble, v0, v1 = _pick(a0, a1, a2, a3)
        out = values_ptr + row * (cols // 2) + 2 * group
        tl.store(out, v0, mask=valid)
        tl.store(out + 1, v1, mask=valid)
        nibbles |= tl.where(valid, nibble, 0) << (4 * half)
    tl.store(indices_ptr + row * index_cols + pair, nibbles.to(tl.uint8), mask=pair < index_cols)


@triton.jit
def _tile_bits(w_ptr, patterns, bias, bits_ptr, tile_row, tile_col, cols, valid, lane):
    """16-bit mask of the best of the 90 patterns for tiles (tile_row, tile_col[lanes])."""
    offs = (4 * tile_row + lane[None, :] // 4) * cols + 4 * tile_col[:, None] + lane[None, :] % 4
    tile = tl.load(w_ptr + offs, mask=valid[:, None] & (lane[None, :] >= 0), other=0.0).to(tl.float32)
    scores = tl.dot(tl.abs(tile), patterns, input_precision="ieee") + bias[None, :]
    lanes = tl.arange(0, 128)[None, :] + tl.full(scores.shape, 0, tl.int32)
    _, best = tl.reduce((scores, lanes), 1, _first_max)
    return tl.load(bits_ptr + best)


@triton.jit
def _first_max(score_a, lane_a, score_b, lane_b):
    """Combine step of an argmax with torch's tie rule (first maximum). Written out instead of
    tl.argmax, a std-lib function that triton fixes to compiled or interpreted mode at import."""
    take_a = (score_a > score_b) | ((score_a == score_b) & (lane_a < lane_b))
    return tl.where(take_a, score_a, score_b), tl.where(take_a, lane_a, lane_b)


@triton.jit
def _group(w_ptr, first, step, bits, bit0, bit_step):
    """Compress one group of four (elements first + p * step, kept if bit bit0 + p * bit_step)."""
    k0 = ((bits >> bit0) & 1) != 0
    k1 = ((bits >> (bit0 + bit_step)) & 1) != 0
    k2 = ((bits >> (bit0 + 2 * bit_step)) & 1) != 0
    k3 = ((bits >> (bit0 + 3 * bit_step)) & 1) != 0
    valid = bits != 0
    a0 = tl.load(w_ptr + first, mask=valid, other=0.0)
    a1 = tl.load(w_ptr + first + step, mask=valid, other=0.0)
    a2 = tl.load(w_ptr + first + 2 * step, mask=valid, other=0.0)
    a3 = tl.load(w_ptr + first + 3 * step, mask=valid, other=0.0)
    return _positions(k0, k1, k2, k3, a0, a1, a2, a3)


@triton.jit
def _emit(w_ptr, first_lo, first_hi, step, bits_lo, bits_hi, bit0, bit_step, valid_lo, valid_hi,
          out_values, group_lo, out_index):
    """Two neighbouring groups of one output row: four values and one index byte."""
    nib_lo, v0, v1 = _group(w_ptr, first_lo, step, tl.where(valid_lo, bits_lo, 0), bit0, bit_step)
    nib_hi, v2, v3 = _group(w_ptr, first_hi, step, tl.where(valid_hi, bits_hi, 0), bit0, bit_step)
    tl.store(out_values + 2 * group_lo, v0, mask=valid_lo)
    tl.store(out_values + 2 * group_lo + 1, v1, mask=valid_lo)
    tl.store(out_values + 2 * group_lo + 2, v2, mask=valid_hi)
    tl.store(out_values + 2 * group_lo + 3, v3, mask=valid_hi)
    byte = tl.where(valid_lo, nib_lo, 0) | (tl.where(valid_hi, nib_hi, 0) << 4)
    tl.store(out_index, byte.to(tl.uint8), mask=valid_lo)


@triton.jit
def prune_tiles(w_ptr, patterns_ptr, bias_ptr, bits_ptr, values_ptr, indices_ptr, values_t_ptr,
                indices_t_ptr, rows, cols, index_cols, index_rows, BLOCK: tl.constexpr):
    """Transposable 2:4. Program (tile-row pair q, BLOCK tile-column pairs): 2 x 2 tiles per lane."""
    # int64 tile coordinates: the offsets row * cols and col * rows pass 2**31 on large weights.
    q = tl.program_id(0).to(tl.int64)
    tpair = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, 16)
    npat = tl.arange(0, 128)
    patterns = tl.load(patterns_ptr + lane[:, None] * 128 + npat[None, :])      # (16, 128) 0/1
    bias = tl.load(bias_ptr + npat)                                             # 0, or -inf on padding
    col_lo, col_hi = 2 * tpair, 2 * tpair + 1
    row_lo, row_hi = 2 * q, 2 * q + 1
    ok_cl, ok_ch = col_lo < cols // 4, col_hi < cols // 4
    # As vectors (a scalar & vector mask trips the interpreter).
    ok_rl, ok_rh = (row_lo + 0 * tpair) < rows // 4, (row_hi + 0 * tpair) < rows // 4
    b00 = _tile_bits(w_ptr, patterns, bias, bits_ptr, row_lo, col_lo, cols, ok_rl & ok_cl, lane)
    b01 = _tile_bits(w_ptr, patterns, bias, bits_ptr, row_lo, col_hi, cols, ok_rl & ok_ch, lane)
    b10 = _tile_bits(w_ptr, patterns, bias, bits_ptr, row_hi, col_lo, cols, ok_rh & ok_cl, lane)
    b11 = _tile_bits(w_ptr, patterns, bias, bits_ptr, row_hi, col_hi, cols, ok_rh & ok_ch, lane)
    for i in tl.static_range(8):   # W rows: groups (col_lo, col_hi) of tile row 2q + i // 4
        row = 8 * q + i
        if i < 4:
            lo, hi, ok = b00, b01, ok_rl
        else:
            lo, hi, ok = b10, b11, ok_rh
        first = row * cols + 4 * col_lo
        _emit(w_ptr, first, first + 4, 1, lo, hi, 4 * (i % 4), 1, ok & ok_cl, ok & ok_ch,
              values_ptr + row * (cols // 2), col_lo, indices_ptr + row * index_cols + tpair)
    for j in tl.static_range(8):   # Wᵀ rows (W columns): groups (row_lo, row_hi) of tile column
        if j < 4:
            col, lo, hi, ok = 4 * col_lo + j, b00, b10, ok_cl
        else:
            col, lo, hi, ok = 4 * col_hi + j - 4, b01, b11, ok_ch
        first = 4 * row_lo * cols + col
        _emit(w_ptr, first, first + 4 * cols, cols, lo, hi, j % 4, 4, ok & ok_rl, ok & ok_rh,
              values_t_ptr + col * (rows // 2), row_lo, indices_t_ptr + col * index_rows + q)
