// bf16 conv products on AVX512-BF16 dot products (VDPBF16PS): the tile steps of gather_conv and
// sampled_conv with bf16 operands and fp32 accumulators, for CPUs without AMX (the avx512 path).
//
// A tile is up to 12 output pixels x 32 output channels: 2 zmm accumulators a pixel. Per K pair
// (two channels of a block, adjacent in the NHWC operand, so one 32-bit broadcast per pixel),
// two B vectors of the VNNI-packed strip (pair row k / 2: the pair words of columns 0-15, then
// 16-31) meet every pixel's broadcast: 2R dot products for R + 2 loads, as in the block-sparse
// products' dot engine (common/amx.h). The accumulators stay in registers across all (block,
// tap) segments of a group; the tile is written once, the bias added in fp32 and the sum
// rounded to bf16 once (round to nearest even, as c10::BFloat16). The weight gradient's K is
// the output pixels: its operands are packed in pixel pairs (dYᵀ row tiles and the shifted
// input's strips), and its tile step accumulates into fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "common/amx.h"
#include "common/microkernel.h"

namespace sparsekern {
namespace conv {

using common::bf16;

constexpr int kDotNR = 32;  // output channels of a packed strip

// Element of B(k, n) in a VNNI-packed strip of kDotNR columns.
inline int64_t vnni_index(int64_t k, int64_t n) { return (k >> 1) * 2 * kDotNR + 2 * n + (k & 1); }

// out (rows x 32 bf16, row stride ldo) = bf16(sum over segments + bias), or, with out null,
// tmp (rows x 32 fp32) = the sum. Segment j reads A at a + segs[j] (pixel stride lda, w
// channels, w even) against the next w / 2 pair rows of b.
using DotKernel = void (*)(const bf16* a, int64_t lda, const int64_t* segs, int64_t nseg, int64_t w, const bf16* b,
                           const bf16* bias, bf16* out, int64_t ldo, float* tmp);

#ifdef SPARSEKERN_AMX_BUILD
template <int R>
SPARSEKERN_DOT_BF16 void dot_conv_tile(const bf16* a, int64_t lda, const int64_t* segs, int64_t nseg, int64_t w,
                                       const bf16* b, const bf16* bias, bf16* out, int64_t ldo, float* tmp) {
  __m512 acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t pairs = w / 2;
  for (int64_t j = 0; j < nseg; ++j) {
    const bf16* aj = a + segs[j];
    for (int64_t k2 = 0; k2 < pairs; ++k2, b += 2 * kDotNR) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kDotNR);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, aj + r * lda + 2 * k2, sizeof pair);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
  }
  if (out == nullptr) {
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(tmp + r * kDotNR, acc[r][0]);
      _mm512_storeu_ps(tmp + r * kDotNR + 16, acc[r][1]);
    }
    return;
  }
  alignas(64) float widened[kDotNR] = {};
  if (bias) {
    for (int n = 0; n < kDotNR; ++n) widened[n] = float(bias[n]);
  }
  const __m512 b0 = _mm512_load_ps(widened), b1 = _mm512_load_ps(widened + 16);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], b0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 16),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], b1)));
  }
}

template <int... R>
DotKernel dot_conv_kernel_of(int rows, std::integer_sequence<int, R...>) {
  DotKernel table[] = {&dot_conv_tile<R + 1>...};
  return table[rows - 1];
}
#endif

// The weight gradient's tile step: out (R x 32 fp32, row stride ldo) [+]= the sum over `pairs`
// pixel pairs of A (R rows, packed [pair][row][2]) times B (packed [pair][column][2]).
using DotGradKernel = void (*)(const bf16* a, const bf16* b, int64_t pairs, float* out, int64_t ldo, bool add);

#ifdef SPARSEKERN_AMX_BUILD
template <int R>
SPARSEKERN_DOT_BF16 void dot_grad_tile(const bf16* a, const bf16* b, int64_t pairs, float* out, int64_t ldo,
                                       bool add) {
  __m512 acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    acc[r][0] = add ? _mm512_loadu_ps(out + r * ldo) : _mm512_setzero_ps();
    acc[r][1] = add ? _mm512_loadu_ps(out + r * ldo + 16) : _mm512_setzero_ps();
  }
  for (int64_t k2 = 0; k2 < pairs; ++k2, a += 2 * R, b += 2 * kDotNR) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kDotNR);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + 2 * r, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out + r * ldo, acc[r][0]);
    _mm512_storeu_ps(out + r * ldo + 16, acc[r][1]);
  }
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

template <int... R>
DotGradKernel dot_grad_kernel_of(int rows, std::integer_sequence<int, R...>) {
  DotGradKernel table[] = {&dot_grad_tile<R + 1>...};
  return table[rows - 1];
}
#endif

// The tile step for `rows` pixels (1 <= rows <= common::kMaxTileRows).
inline DotKernel dot_conv_kernel(int rows) {
#ifdef SPARSEKERN_AMX_BUILD
  if (rows >= 1 && rows <= common::kMaxTileRows) {
    return dot_conv_kernel_of(rows, std::make_integer_sequence<int, common::kMaxTileRows>{});
  }
#endif
  throw std::logic_error("no bf16 dot-product conv tile of this many rows on this build");
}

inline DotGradKernel dot_grad_kernel(int rows) {
#ifdef SPARSEKERN_AMX_BUILD
  if (rows >= 1 && rows <= common::kMaxTileRows) {
    return dot_grad_kernel_of(rows, std::make_integer_sequence<int, common::kMaxTileRows>{});
  }
#endif
  throw std::logic_error("no bf16 dot-product weight-gradient tile of this many rows on this build");
}

}  // namespace conv
}  // namespace sparsekern
