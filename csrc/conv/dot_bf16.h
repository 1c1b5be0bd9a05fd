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

// permutex2var indices (b's elements after a's) doing what unpack{lo,hi}_epi32 and
// unpack{lo,hi}_epi64 do in each 128-bit lane (32-bit elements), and what shuffle_i32x4 with
// 0x44, 0xEE, 0x88, 0xDD does with the lanes (64-bit elements): GCC 12's intrinsics for those
// instructions warn of an uninitialised pass-through operand.
alignas(64) constexpr int32_t kUnpack[4][16] = {
    {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29},
    {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}};
alignas(64) constexpr int64_t kLanes[4][8] = {
    {0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}, {0, 1, 4, 5, 8, 9, 12, 13}, {2, 3, 6, 7, 10, 11, 14, 15}};

// dst[c * ld + k] = src[k * src_ld + c] for 16 channels c and 32 pixels k: a block of dY
// (pixels x channels, a pixel's channels adjacent) as channel rows with the pixels adjacent, as
// the dot products read dW's A. Each pixel pair's channels are interleaved into 32-bit pairs
// (pack_pixel_pair), then the 16 x 16 pairs are transposed in registers: 32-bit interleaves,
// 64-bit interleaves, and a 4 x 4 transpose of 128-bit lanes.
SPARSEKERN_DOT_BF16 inline void transpose_16x32(bf16* dst, int64_t ld, const bf16* src, int64_t src_ld) {
  alignas(64) bf16 pairs[16 * 32];
  for (int p = 0; p < 16; ++p) pack_pixel_pair<16>(pairs + 32 * p, src + 2 * p * src_ld, src + (2 * p + 1) * src_ld);
  __m512i r[16], t[16], unpack[4], lanes[4];
  for (int k = 0; k < 4; ++k) unpack[k] = _mm512_load_si512(kUnpack[k]), lanes[k] = _mm512_load_si512(kLanes[k]);
  for (int p = 0; p < 16; ++p) r[p] = _mm512_load_si512(pairs + 32 * p);  // row p: pair p of 16 channels
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_permutex2var_epi32(r[i], unpack[0], r[i + 1]);
    t[i + 1] = _mm512_permutex2var_epi32(r[i], unpack[1], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + e], lane L: rows i .. i + 3 at column 4 L + e
    r[i] = _mm512_permutex2var_epi32(t[i], unpack[2], t[i + 2]);
    r[i + 1] = _mm512_permutex2var_epi32(t[i], unpack[3], t[i + 2]);
    r[i + 2] = _mm512_permutex2var_epi32(t[i + 1], unpack[2], t[i + 3]);
    r[i + 3] = _mm512_permutex2var_epi32(t[i + 1], unpack[3], t[i + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // column 4 L + e: lane L of r[e], r[4 + e], r[8 + e], r[12 + e]
    const __m512i x0 = _mm512_permutex2var_epi64(r[e], lanes[0], r[4 + e]);  // lanes a0 a1 b0 b1
    const __m512i x1 = _mm512_permutex2var_epi64(r[e], lanes[1], r[4 + e]);  // a2 a3 b2 b3
    const __m512i x2 = _mm512_permutex2var_epi64(r[8 + e], lanes[0], r[12 + e]);
    const __m512i x3 = _mm512_permutex2var_epi64(r[8 + e], lanes[1], r[12 + e]);
    _mm512_storeu_si512(dst + e * ld, _mm512_permutex2var_epi64(x0, lanes[2], x2));  // a0 a2 b0 b2
    _mm512_storeu_si512(dst + (4 + e) * ld, _mm512_permutex2var_epi64(x0, lanes[3], x2));  // a1 a3 b1 b3
    _mm512_storeu_si512(dst + (8 + e) * ld, _mm512_permutex2var_epi64(x1, lanes[2], x3));
    _mm512_storeu_si512(dst + (12 + e) * ld, _mm512_permutex2var_epi64(x1, lanes[3], x3));
  }
}

// Rows [0, rows) of dst (ld apart): row i holds channel i of pixels [0, klen) of src (pixels
// src_ld apart), zero from pixel len and from channel valid on. Whole 16-channel, 32-pixel
// blocks by transpose_16x32, the rest an element at a time.
SPARSEKERN_DOT_BF16 inline void pack_channel_rows(bf16* dst, int64_t ld, const bf16* src, int64_t src_ld, int64_t len,
                                                  int64_t klen, int64_t valid, int64_t rows) {
  const int64_t whole = len / 32 * 32;
  int64_t c0 = 0;
  for (; c0 + 16 <= valid; c0 += 16) {
    for (int64_t m = 0; m < whole; m += 32) transpose_16x32(dst + c0 * ld + m, ld, src + m * src_ld + c0, src_ld);
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t m = i < c0 ? whole : 0; m < klen; ++m) dst[i * ld + m] = m < len && i < valid ? src[m * src_ld + i] : bf16(0);
  }
}
#endif

}  // namespace conv
}  // namespace sparsekern
