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
#include "common/pair_words.h"

namespace sparsekern {
namespace conv {

using common::bf16;

constexpr int64_t kDotPixels = 32;  // dW's K step: 16 pixel pairs

using common::tile_kernels;
using common::vnni_index;
using common::with_strips;

#ifdef SPARSEKERN_AMX_BUILD
// dst[2n + j] = (j ? p1 : p0)[n] for n < NR: two pixels' NR channels as pairs.
template <int NR>
SPARSEKERN_DOT_BF16 inline void pack_pixel_pair(bf16* dst, const bf16* p0, const bf16* p1) {
  static_assert(NR == 16 || NR == 32, "strips of 16 or 32 columns");
  const __m512i a = NR == 32 ? _mm512_loadu_si512(p0) : common::load_16(p0);
  const __m512i b = NR == 32 ? _mm512_loadu_si512(p1) : common::load_16(p1);
  for (int h = 0; h < NR / 16; ++h) _mm512_storeu_si512(dst + 32 * h, common::interleave_pairs(a, b, h));
}

// One pixel's NR channels into the j-th halves of their pairs (j = 0: the even pixel's, 1: the
// odd one's), the partner halves left as they are: masked stores instead of NR scalar ones for
// the runs' odd ends (taps reading 7 of an 8-pixel row leave one in every other run).
template <int NR>
SPARSEKERN_DOT_BF16 inline void pack_pixel_half(bf16* dst, const bf16* p, int j) {
  const __m512i zero = _mm512_setzero_si512(), a = NR == 32 ? _mm512_loadu_si512(p) : common::load_16(p);
  const __mmask32 halves = j ? 0xAAAAAAAAu : 0x55555555u;
  for (int h = 0; h < NR / 16; ++h) {
    const __m512i pairs = j ? common::interleave_pairs(zero, a, h) : common::interleave_pairs(a, zero, h);
    _mm512_mask_storeu_epi16(dst + 32 * h, halves, pairs);
  }
}

// Rows [0, rows) of dst (ld apart, ld and klen multiples of 32): row i holds channel i of
// pixels [0, klen) of src (pixels src_ld apart), zero from pixel len and from channel valid
// on. Whole groups of 16 channels as transposed pair words (common/pair_words.h: element by
// element this packing took a tenth of a bf16 dW), a last partial group element by element.
SPARSEKERN_DOT_BF16 inline void pack_channel_rows(bf16* dst, int64_t ld, const bf16* src, int64_t src_ld, int64_t len,
                                                  int64_t klen, int64_t valid, int64_t rows) {
  int64_t c0 = 0;
  for (; c0 + 16 <= valid; c0 += 16) {
    common::transpose_pair_columns(src + c0, src_ld, len, klen / 2, common::PairColumnsLayout::rows(ld / 2),
                                   reinterpret_cast<int32_t*>(dst + c0 * ld));
  }
  for (int64_t i = c0; i < rows; ++i) {
    for (int64_t m = 0; m < klen; ++m) dst[i * ld + m] = m < len && i < valid ? src[m * src_ld + i] : bf16(0);
  }
}
#endif

}  // namespace conv
}  // namespace sparsekern
