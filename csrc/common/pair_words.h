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

// Where transpose_pair_columns puts pair word p of column 16 h + i: at out + h * group + i * row
// + (p / 16) * run + p % 16 (words). Row-major rows ldo words apart: {ldo, 16, 16 ldo}.
struct PairColumnsLayout {
  int64_t row, run, group;
  static PairColumnsLayout rows(int64_t ldo) { return {ldo, 16, 16 * ldo}; }
};

// The two bf16 of each pair word widened to fp32 and added: a bf16 is the upper half of its fp32.
// (maskz: the unmasked shift's GCC 12 intrinsic warns of an uninitialised pass-through operand)
SPARSEKERN_DOT_BF16 inline __m512 pair_sums(__m512i words) {
  const __m512 low = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, words, 16));
  const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
  return _mm512_add_ps(low, high);
}

// Columns 0 .. 16 groups - 1 of src (rows ld elements apart, zeros from row M on) as that many
// rows of `pairs` pair words (a multiple of 16), placed by `layout`: column i's rows 2p and
// 2p + 1 in word p. Two groups take whole 64-byte lines of bf16 rows: the second group's loads
// then hit L1, where one group at a time read every line twice from memory or L2 (the
// block-sparse dW at 2048 x 4096 x 4096, density 0.05, on a Xeon: 7.6-8.7 ms against 8.6-9.5).
// sums (16 groups floats, or null): each column's sum over the rows added to it, on the loads
// the packing makes anyway (a bias gradient), in fp32 over runs of 32 rows.
template <int kGroups = 1>
SPARSEKERN_DOT_BF16 inline void transpose_pair_columns(const bf16* src, int64_t ld, int64_t M, int64_t pairs,
                                                       PairColumnsLayout layout, int32_t* out,
                                                       float* sums = nullptr) {
  __m512i r[16];
  __m512 total[kGroups];
  for (int h = 0; h < kGroups; ++h) total[h] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    for (int h = 0; h < kGroups; ++h) {
      __m512 run = _mm512_setzero_ps();
      for (int i = 0; i < 16; ++i) {
        r[i] = pair_words(src + 16 * h, ld, p0 + i, M);
        if (sums) run = _mm512_add_ps(run, pair_sums(r[i]));
      }
      if (sums) total[h] = _mm512_add_ps(total[h], run);
      transpose_16x16_epi32(r);
      int32_t* dst = out + h * layout.group + (p0 / 16) * layout.run;
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * layout.row, r[i]);
    }
  }
  for (int h = 0; sums && h < kGroups; ++h) {
    _mm512_storeu_ps(sums + 16 * h, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * h), total[h]));
  }
}
#endif

}  // namespace common
}  // namespace sparsekern
