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
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/amx.h"
#include "common/microkernel.h"

namespace sparsekern {
namespace conv {

using common::bf16;

constexpr int64_t kDotPixels = 32;  // dW's K step: 16 pixel pairs

// The strip width of the dot products for blocks of `block` channels (a multiple of 16).
inline int dot_strip(int64_t block) { return block % 32 == 0 ? 32 : 16; }

// Element of B(k, n) in a VNNI-packed strip of NR columns.
template <int NR>
int64_t vnni_index(int64_t k, int64_t n) { return (k >> 1) * 2 * NR + 2 * n + (k & 1); }

// common::dot_rows<R, NR / 16, KP>: c (R x NR fp32, row stride ldc) [+]= sum over `steps` K steps of
// 2 KP: A (rows lda apart, step j at a + a_off[j]) times B (step j at b + j * b_step, pair rows ldb apart).
using DotRows = void (*)(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                         int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate);

#ifdef SPARSEKERN_AMX_BUILD
template <int NR, int KP, int... R>
DotRows dot_rows_of(int rows, std::integer_sequence<int, R...>) {
  DotRows table[] = {&common::dot_rows<R + 1, NR / 16, KP>...};
  return table[rows - 1];
}

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

// The dot-product tile step for `rows` rows (1 <= rows <= common::kMaxTileRows), NR columns, K
// steps of 2 KP.
template <int NR, int KP>
DotRows dot_rows_kernel(int rows) {
#ifdef SPARSEKERN_AMX_BUILD
  if (rows >= 1 && rows <= common::kMaxTileRows) {
    return dot_rows_of<NR, KP>(rows, std::make_integer_sequence<int, common::kMaxTileRows>{});
  }
#endif
  throw std::logic_error("no bf16 dot-product tile of this many rows on this build");
}

// The tile steps for `tiles` (first, rows): the dot products (K steps of 2 KP) with kPairs, else
// the microkernels of C (A's rows kRowsA-major).
template <typename C, int NR, bool kPairs, bool kRowsA, int KP>
auto tile_kernels(const std::vector<std::pair<int64_t, int>>& tiles) {
  std::vector<std::conditional_t<kPairs, DotRows, common::Microkernel<C>>> kernels;
  for (const auto& tile : tiles) {
    if constexpr (kPairs) {
      kernels.push_back(dot_rows_kernel<NR, KP>(tile.second));
    } else {
      kernels.push_back(common::microkernel_rows<C, NR, kRowsA>(tile.second));
    }
  }
  return kernels;
}

// f(std::integral_constant<int, NR>) for the strips of a product over `width` columns: the dot
// products' (dot_strip) with kPairs, else the widest strip of C the path has.
template <typename C, bool kPairs, typename F>
void with_strips(int64_t width, const F& f) {
  if constexpr (kPairs) {
    if (dot_strip(width) == 32) {
      f(std::integral_constant<int, 32>{});
    } else {
      f(std::integral_constant<int, 16>{});
    }
  } else {
    common::with_strip_width<C>(f, width);
  }
}

}  // namespace conv
}  // namespace sparsekern
