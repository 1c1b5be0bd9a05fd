// bf16 operands whose K runs down the rows of a row-major source (tokens of dY and X in the
// block-sparse dW, output pixels of dY in the conv dW), turned into what the bf16 tile steps
// read: pair words (the 32-bit word of rows 2r and 2r + 1 of one column), and those words
// transposed so that each column becomes a row of consecutive pairs. AVX-512 shuffles: an
// element at a time, these packings cost as much as the products (block-sparse dW) or a tenth
// of them (conv dW).
#pragma once

#include <cstdint>

#include "common/amx.h"
#include "common/transpose.h"

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

// Columns 0 .. 16 groups - 1 of src (rows ld elements apart, zeros from row M on) as that many
// rows of `pairs` pair words (a multiple of 16), row i at out + i * ldo words: column i's rows
// 2p and 2p + 1 in word p. Two groups take whole 64-byte lines of bf16 rows: the second group's
// loads then hit L1, where one group at a time read every line twice from memory or L2 (the
// block-sparse dW at 2048 x 4096 x 4096, density 0.05, on a Xeon: 7.6-8.7 ms against 8.6-9.5).
template <int kGroups = 1>
SPARSEKERN_DOT_BF16 inline void transpose_pair_columns(const bf16* src, int64_t ld, int64_t M, int64_t pairs,
                                                       int64_t ldo, int32_t* out) {
  __m512i r[16];
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    for (int h = 0; h < kGroups; ++h) {
      for (int i = 0; i < 16; ++i) r[i] = pair_words(src + 16 * h, ld, p0 + i, M);
      transpose_16x16_epi32(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (16 * h + i) * ldo + p0, r[i]);
    }
  }
}
#endif

}  // namespace common
}  // namespace sparsekern
