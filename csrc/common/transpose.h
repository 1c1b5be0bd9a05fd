// In-register transposes on AVX-512F: the bf16 pair words of the dW packings (common/pair_words.h)
// and the fp32 panels of the packed-rows products (common/packed_rows_product.h).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace sparsekern {
namespace common {

#if defined(__x86_64__) || defined(_M_X64)
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
// AVX-512F alone, so that callers compiled for either the fp32 or the bf16 instruction sets inline it.
__attribute__((target("avx512f"), always_inline)) inline void transpose_16x16_epi32(__m512i r[16]) {
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
#endif

}  // namespace common
}  // namespace sparsekern
