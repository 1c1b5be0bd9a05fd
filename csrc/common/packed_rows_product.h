// The grouped product (common/grouped_product.h) on 24-row tiles of a packed A: the fp32 and
// fp64 block-sparse forward and dX on the AVX-512 geometry.
//
// In place, a tile reads 12 rows of a row-major A (more would share an L1 set) with one
// broadcast per row and K step, and B's packed strips stream from L3 once per 12 rows; on a
// Xeon, whose L3 feeds a core ~24 GB/s, that stream bounds the products. Here each thread
// copies the 24 rows of its current m-tile into a k-major panel (element (i, k) at k * 24 + i:
// contiguous broadcasts, no set aliasing) once, and runs every group of its items against it in
// 24 x kNR<C> tiles (one zmm accumulator a row, 24 of the 32): B is read once per 24 rows. On
// the Xeon, 2048 x 4096 x 4096, forward and dX: 25-35 % faster at block 16, 7-12 % at block 32
// (density 0.05-0.5). Rows past M are zeros in the panel and never stored.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/grouped_product.h"
#include "common/microkernel.h"
#include "common/parallel.h"
#include "common/transpose.h"

namespace sparsekern {
namespace common {

constexpr int kPackedRows = kMaxNarrowRows;

// Whether the products of M rows take packed_rows_product: the AVX-512 geometry (its SIMD or
// portable loops) and at least four row tiles (below, the padded rows and the copies weigh
// against the products; the in-place tiles take any row count).
inline bool packed_rows(int64_t M) { return wide_tiles() && M >= 4 * kPackedRows; }

// panel[k * 24 + i] = a[i * lda + k] for the 24 rows of a tile and k < K, zero from row `rows`
// on: element by element for fp64, and for the columns past the last 16 of fp32.
template <typename C>
void copy_panel_portable(const C* a, int64_t lda, int64_t rows, int64_t K, C* panel) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {  // 16 columns at a time: the rows' lines stay in L1 across them
    const int64_t kn = std::min<int64_t>(16, K - k0);
    for (int i = 0; i < kPackedRows; ++i) {
      for (int64_t u = 0; u < kn; ++u) panel[(k0 + u) * kPackedRows + i] = i < rows ? a[i * lda + k0 + u] : C(0);
    }
  }
}

#ifdef SPARSEKERN_X86
// The fp32 panel 16 columns at a time on AVX-512F: rows 0-15 and rows 16-23 (with 8 zero rows)
// as two 16 x 16 transposes in registers; element by element, the copy took a fifth of the
// 16-column forward's time at density 0.1.
SPARSEKERN_AVX512 inline void copy_panel_avx512(const float* a, int64_t lda, int64_t rows, int64_t K,
                                                float* panel) {
  const int64_t whole = K / 16 * 16;
  for (int64_t k0 = 0; k0 < whole; k0 += 16) {
    __m512i lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      lo[i] = i < rows ? _mm512_loadu_si512(a + i * lda + k0) : _mm512_setzero_si512();
      hi[i] = i < 8 && 16 + i < rows ? _mm512_loadu_si512(a + (16 + i) * lda + k0) : _mm512_setzero_si512();
    }
    transpose_16x16_epi32(lo);
    transpose_16x16_epi32(hi);
    for (int u = 0; u < 16; ++u) {
      float* dst = panel + (k0 + u) * kPackedRows;
      _mm512_storeu_si512(dst, lo[u]);
      _mm512_mask_storeu_epi32(dst + 16, 0xFF, hi[u]);  // its low 8 words: rows 16-23
    }
  }
  if (whole < K) copy_panel_portable<float>(a + whole, lda, rows, K - whole, panel + whole * kPackedRows);
}
#endif

template <typename C>
void copy_panel(const C* a, int64_t lda, int64_t rows, int64_t K, C* panel) {
#ifdef SPARSEKERN_X86
  if constexpr (std::is_same<C, float>::value) {
    if (!portable_loops()) return copy_panel_avx512(a, lda, rows, K, panel);
  }
#endif
  copy_panel_portable<C>(a, lda, rows, K, panel);
}

// grouped_product's contract (S == C: fp32 or fp64), on 24 x kNR<C> tiles of packed A.
template <typename C>
void packed_rows_product(const C* a, int64_t M, int64_t Ka, const C* values, int64_t br, int64_t bc,
                         bool transpose, const int64_t* offsets, int64_t G, const int64_t* blk,
                         const int64_t* seg, C* out, const C* bias = nullptr) {
  constexpr int TR = kPackedRows, NR = kNR<C>;
  const int64_t w = transpose ? bc : br, g = transpose ? br : bc, N = G * g;
  const int64_t nsub = (g + NR - 1) / NR, mtiles = (M + TR - 1) / TR, nnz = offsets[G], strip = w * NR;
  if (M == 0 || N == 0) return;
  const at::Tensor b_buf = pack_groups<C, C, NR>(values, br, bc, transpose, offsets, G, blk);
  const C* bp = b_buf.data_ptr<C>();
  std::vector<int64_t> seg_off(std::max<int64_t>(1, nnz));  // where each member's K segment starts in a panel
  for (int64_t p = 0; p < nnz; ++p) seg_off[p] = seg[p] * w * TR;

  // Items (group, m-tile) in panel / m-tile / group order, as grouped_product's with m-blocks of
  // one tile: a thread's consecutive items share their m-tile, whose panel it copies once.
  struct Item { int64_t group, tile; };
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};
  for (int64_t p0 = 0, p1; p0 < G; p0 = p1) {
    p1 = panel_end(offsets, G, p0, nsub * strip * int64_t(sizeof(C)));
    for (int64_t t = 0; t < mtiles; ++t) {
      for (int64_t i = p0; i < p1; ++i) {
        items.push_back({i, t});
        prefix.push_back(prefix.back() + ((offsets[i + 1] - offsets[i]) * w + kItemOverhead) * nsub * NR * TR);
      }
    }
  }
  const Microkernel<C> kernel = narrow_packed_kernel<C>(TR);
  const Store direct = streamed_output<C>(M * N) ? Store::kStream : Store::kWrite;
  parallel_ranges_by_cost(prefix, [&](int64_t begin, int64_t end) {
    std::vector<C> panel(TR * Ka);
    int64_t copied = -1;  // the m-tile in `panel`
    for (int64_t idx = begin; idx < end; ++idx) {
      const Item& it = items[idx];
      const int64_t r0 = it.tile * TR, rows = std::min<int64_t>(TR, M - r0);
      if (it.tile != copied) {
        copied = it.tile;
        copy_panel<C>(a + r0 * Ka, Ka, rows, Ka, panel.data());
      }
      const int64_t first = offsets[it.group], count = offsets[it.group + 1] - first;
      for (int64_t s = 0; s < nsub; ++s) {
        const int64_t c0 = it.group * g + s * NR, ncols = std::min<int64_t>(NR, g - s * NR);
        const C* bs = bp + (first * nsub + s * count) * strip;
        C* o = out + r0 * N + c0;
        if (count == 0) {  // empty block row/column: its output is zero (or the bias)
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t n = 0; n < ncols; ++n) o[i * N + n] = bias ? bias[c0 + n] : C(0);
          }
        } else if (rows == TR && ncols == NR) {
          kernel(panel.data(), TR, seg_off.data() + first, count, w, bs, NR, o, N, direct, bias ? bias + c0 : nullptr);
        } else {
          alignas(64) C tmp[TR * NR];
          kernel(panel.data(), TR, seg_off.data() + first, count, w, bs, NR, tmp, NR, Store::kWrite, nullptr);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t n = 0; n < ncols; ++n) o[i * N + n] = tmp[i * NR + n] + (bias ? bias[c0 + n] : C(0));
          }
        }
      }
    }
    if (direct == Store::kStream) stream_fence();  // the output is read after the region, by any thread
  });
}

}  // namespace common
}  // namespace sparsekern
