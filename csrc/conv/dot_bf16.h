// bf16 conv products on AVX512-BF16 dot products, for CPUs without AMX (the avx512 path): the
// block-sparse products' dot engine (common::dot_rows: up to 12 rows x 32 fp32 columns in
// registers, per K pair two B vectors against one 32-bit broadcast per row) on the conv
// drivers' operands. Forward and dX read A (pixels x a block's channels) in place from the
// bf16 NHWC operand, its channel pairs adjacent; the blocks are packed in VNNI pairs (B(k, n) at
// pair row k / 2, element 2n + k % 2). dW's K is the output pixels: dYᵀ is packed row-major
// (a channel's pixels adjacent, so pairs) and the shifted input in pixel pairs.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <utility>

#include "common/amx.h"
#include "common/microkernel.h"

namespace sparsekern {
namespace conv {

using common::bf16;

constexpr int kDotNR = 32;  // output columns of a packed strip (common::dot_rows' tile width)
constexpr int64_t kDotK = 32;  // K of one dot_rows step: 16 pair rows of 2 * kDotNR elements

// Element of B(k, n) in a VNNI-packed strip of kDotNR columns.
inline int64_t vnni_index(int64_t k, int64_t n) { return (k >> 1) * 2 * kDotNR + 2 * n + (k & 1); }

// common::dot_rows<R>: c (R x 32 fp32, row stride ldc) [+]= sum over `steps` K steps of
// A (rows lda apart, step j at a + a_off[j]) times B (step j at b + j * b_step, pair rows ldb apart).
using DotRows = void (*)(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                         int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate);

#ifdef SPARSEKERN_AMX_BUILD
template <int... R>
DotRows dot_rows_of(int rows, std::integer_sequence<int, R...>) {
  DotRows table[] = {&common::dot_rows<R + 1>...};
  return table[rows - 1];
}

// dst[2n + j] = (j ? p1 : p0)[n] for n < 32: two pixels' 32 channels as pairs (p1 null: zeros).
SPARSEKERN_DOT_BF16 inline void pack_pixel_pair(bf16* dst, const bf16* p0, const bf16* p1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const __m512i a = _mm512_loadu_si512(p0), b = p1 ? _mm512_loadu_si512(p1) : _mm512_setzero_si512();
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
  _mm512_storeu_si512(dst + kDotNR, _mm512_permutex2var_epi16(a, hi, b));
}
#endif

// The dot-product tile step for `rows` rows (1 <= rows <= common::kMaxTileRows).
inline DotRows dot_rows_kernel(int rows) {
#ifdef SPARSEKERN_AMX_BUILD
  if (rows >= 1 && rows <= common::kMaxTileRows) {
    return dot_rows_of(rows, std::make_integer_sequence<int, common::kMaxTileRows>{});
  }
#endif
  throw std::logic_error("no bf16 dot-product tile of this many rows on this build");
}

}  // namespace conv
}  // namespace sparsekern
