// bf16 operands whose K runs down the rows of a row-major source (tokens of dY and X in the
// block-sparse dW, output pixels of dY in the conv dW), turned into what the bf16 tile steps
// read: pair words (the 32-bit word of rows 2r and 2r + 1 of one column), and those words
// transposed so that each column becomes a row of consecutive pairs. AVX-512 shuffles: an
// element at a time, these packings cost as much as the products (block-sparse dW) or a tenth
// of them (conv dW).
#pragma once

#include <cstdint>

#include "common/amx.h"

namespace sparsekern {
namespace common {

#ifdef SPARSEKERN_AMX_BUILD
// Pair words of two rows' bf16 elements 16 h .. 16 h + 15 (h = 0, 1): word n = (a[16 h + n],
// b[16 h + n]), the VNNI layout with a's element in the low half.
SPARSEKERN_DOT_BF16 inline __m512i interleave_pairs(__m512i a, __m512i b, int h) {
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(a, _mm512_add_epi16(first, _mm512_set1_epi16(int16_t(16 * h))), b);
}

// 16 bf16 from p in the low half (the upper half is left for interleave_pairs to ignore), or
// zeros where p is null.
SPARSEKERN_DOT_BF16 inline __m512i load_16(const bf16* p) {
  return p ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) : _mm512_setzero_si512();
}

// Pair words of rows 2r and 2r + 1 (ld elements apart) for 16 consecutive columns of src,
// zeros from row M on.
SPARSEKERN_DOT_BF16 inline __m512i pair_words(const bf16* src, int64_t ld, int64_t r, int64_t M) {
  return interleave_pairs(load_16(2 * r < M ? src + 2 * r * ld : nullptr),
                          load_16(2 * r + 1 < M ? src + (2 * r + 1) * ld : nullptr), 0);
}

// permutex2var indices (b's elements after a's): what unpack{lo,hi}_epi32 and
// unpack{lo,hi}_epi64 do in each 128-bit lane (32-bit elements), and what shuffle_i32x4 with
// 0x44, 0xEE, 0x88, 0xDD does with the lanes (64-bit elements). GCC 12's intrinsics for those
// instructions warn of an uninitialised pass-through operand.
alignas(64) constexpr int32_t kUnpackWords[4][16] = {
    {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29},
    {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}};
alignas(64) constexpr int64_t kShuffleLanes[4][8] = {
    {0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}, {0, 1, 4, 5, 8, 9, 12, 13}, {2, 3, 6, 7, 10, 11, 14, 15}};

// In-register transpose of 16 rows of 16 32-bit words: 32-bit interleaves, 64-bit
// interleaves, then a 4 x 4 transpose of 128-bit lanes.
SPARSEKERN_DOT_BF16 inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i unpack[4], lanes[4], t[16];
  for (int k = 0; k < 4; ++k) {
    unpack[k] = _mm512_load_si512(kUnpackWords[k]);
    lanes[k] = _mm512_load_si512(kShuffleLanes[k]);
  }
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_permutex2var_epi32(r[i], unpack[0], r[i + 1]);
    t[i + 1] = _mm512_permutex2var_epi32(r[i], unpack[1], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + e], lane L: rows g .. g + 3 at column 4 L + e
    r[g] = _mm512_permutex2var_epi32(t[g], unpack[2], t[g + 2]);
    r[g + 1] = _mm512_permutex2var_epi32(t[g], unpack[3], t[g + 2]);
    r[g + 2] = _mm512_permutex2var_epi32(t[g + 1], unpack[2], t[g + 3]);
    r[g + 3] = _mm512_permutex2var_epi32(t[g + 1], unpack[3], t[g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // column 4 L + e: lane L of r[e], r[4 + e], r[8 + e], r[12 + e]
    const __m512i x0 = _mm512_permutex2var_epi64(r[e], lanes[0], r[4 + e]);  // lanes a0 a1 b0 b1
    const __m512i x1 = _mm512_permutex2var_epi64(r[e], lanes[1], r[4 + e]);  // a2 a3 b2 b3
    const __m512i x2 = _mm512_permutex2var_epi64(r[8 + e], lanes[0], r[12 + e]);
    const __m512i x3 = _mm512_permutex2var_epi64(r[8 + e], lanes[1], r[12 + e]);
    t[e] = _mm512_permutex2var_epi64(x0, lanes[2], x2);       // a0 a2 b0 b2
    t[4 + e] = _mm512_permutex2var_epi64(x0, lanes[3], x2);   // a1 a3 b1 b3
    t[8 + e] = _mm512_permutex2var_epi64(x1, lanes[2], x3);
    t[12 + e] = _mm512_permutex2var_epi64(x1, lanes[3], x3);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Columns 0 .. 15 of src (rows ld elements apart, zeros from row M on) as 16 rows of `pairs`
// pair words (a multiple of 16), row i at out + i * ldo words: column i's rows 2p and 2p + 1 in
// word p.
SPARSEKERN_DOT_BF16 inline void transpose_pair_columns(const bf16* src, int64_t ld, int64_t M, int64_t pairs,
                                                       int64_t ldo, int32_t* out) {
  __m512i r[16];
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    for (int i = 0; i < 16; ++i) r[i] = pair_words(src, ld, p0 + i, M);
    transpose_16x16_epi32(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ldo + p0, r[i]);
  }
}
#endif

}  // namespace common
}  // namespace sparsekern
