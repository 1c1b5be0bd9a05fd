// bf16 conv products on AVX512-BF16 dot products, for CPUs without AMX (the avx512 path): the
// block-sparse products' dot engine (common::dot_rows: up to 12 rows x 16 or 32 fp32 columns in
// registers, per K pair one B vector per 16 columns against one 32-bit broadcast per row) on
// the conv drivers' operands. Forward and dX read A (pixels x a block's channels) in place from
// the bf16 NHWC operand, its channel pairs adjacent; the blocks are packed in VNNI pairs (B(k, n)
// at pair row k / 2, element 2n + k % 2) in strips of NR = 32 columns, or 16 for blocks of 16,
// 48, ... channels. dW's K is the output pixels: dYᵀ is packed row-major (a channel's pixels
// adjacent, so pairs) and the shifted input in pixel pairs.
#pragma once

#include <cstdint>

#include "common/amx.h"
#include "common/dot_rows.h"

namespace sparsekern {
namespace conv {

using common::bf16;

constexpr int64_t kDotPixels = 32;  // dW's K step: 16 pixel pairs

using common::tile_kernels;
using common::vnni_index;
using common::with_strips;

#ifdef SPARSEKERN_AMX_BUILD
// dst[2n + j] = (j ? p1 : p0)[n] for n < NR: two pixels' NR channels as pairs (p1 null: zeros).
template <int NR>
SPARSEKERN_DOT_BF16 inline void pack_pixel_pair(bf16* dst, const bf16* p0, const bf16* p1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  if constexpr (NR == 32) {
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const __m512i a = _mm512_loadu_si512(p0), b = p1 ? _mm512_loadu_si512(p1) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(dst + NR, _mm512_permutex2var_epi16(a, hi, b));
  } else {
    static_assert(NR == 16, "strips of 16 or 32 columns");
    const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0)));
    const __m512i b = p1 ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1)))
                         : _mm512_setzero_si512();
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
  }
}
#endif

}  // namespace conv
}  // namespace sparsekern
