// bf16 block-sparse products on tile steps (common/amx.h): bf16 in and out, fp32
// accumulation, one rounding on output. Blocks whose sides are multiples of 32 run 32 x 32
// steps on the Engine: AMX tiles (AmxEngine) or AVX512-BF16 dot products on CPUs without AMX
// (DotEngine); packing and loop nests are the same for both. Other blocks of a multiple of 16
// run 32 x 16 steps of K 16 on AMX (AmxStripEngine) and dW 16 x 16 tiles (AmxEngine16); on
// the dot-product path their forward and dX run common::grouped_product on dot products, their
// dW bf16_sampled_product with 16 x 16 tiles on DotEngine16.
//
// bf16_grouped_product: forward and dX, the same loop nest as grouped_product (fp32):
//   A (X or dY) is read in place, 32 rows a tile (a zero-padded copy of the last
//   rows when M is not a multiple of 32); the values are packed per call into VNNI
//   32 x 32 tiles in group order, so one output column group's B is one contiguous
//   stream. Items (m-block, group) run m-block-major: a group's packed B (a block
//   row at d = 0.1 is a few KiB) stays in L1 across the m-tiles, the m-block's rows
//   of A in L2 across the groups.
// bf16_sampled_product: dW on the stored blocks, dYᵀ X with K = tokens. dYᵀ is packed
//   tile-major (tokens padded to 32 with zeros; summed per column on the way where the bias
//   gradient is wanted) and X into VNNI row pairs, each block
//   column's 32 columns contiguous (both with AVX-512 shuffles: a scalar transpose cost
//   more than the products); strips of TW = 32 or 16 columns. Blocks run in super-blocks of 8 x 8 block rows x columns, so
//   the dYᵀ rows and X strips they share stay in L2; tokens run in chunks (all 2048 at
//   4096 columns), whose fp32 sums accumulate in a tile buffer.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/amx.h"
#include "common/column_sums.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "common/pair_words.h"
#include "common/parallel.h"

namespace sparsekern {
namespace bsr {

#ifdef SPARSEKERN_AMX_BUILD
using common::bf16;
using common::kAmxTile;

constexpr int64_t kAmxABlockBytes = 1 << 20;   // rows of A kept in L2 across the groups (best of 256 KiB-4 MiB)
// dW: packed X of one token chunk (2048 tokens at 4096 columns). With blocks in super-block
// order (below) one chunk of all tokens is fastest on AMX: at 2048 x 4096 x 4096, density 0.5,
// 66 ms in 512-token chunks in block order, 55 ms with super-blocks, 46 ms with both; chunks
// of 128 and 64 tokens were 7 % and 17 % slower on the dot engine, which 16 MB leaves as it was.
constexpr int64_t kAmxTokenChunkBytes = 16 << 20;
constexpr int64_t kSuperBlock = 8;  // block rows and columns of a super-block (4-16 measured alike)
constexpr int64_t kAmxItemOverhead = 2;          // cost of storing an output tile, in K steps
// The forward's and dX's outputs from this size on are written with non-temporal stores
// (store_tile_bf16; half-line tiles, AmxStripEngine's, are stored plainly whatever it says). On
// AMX (a Xeon) from 4 MiB: at 2048 tokens, 512 -> 2048 features, density 0.1, the forward ran
// 2.18x dense bf16 instead of 1.29x, and a GPT's bf16 step (its 6-8 MiB outputs streamed) 253
// ms against 261, alternating; its fp32 step ran 278 against 273 ms with the fp32 products'
// threshold lowered alike, and streaming the bf16 2 MiB outputs too gained nothing more. The
// dot engine keeps the fp32 products' 16 MiB, unmeasured below it.
template <typename Engine>
constexpr int64_t kStreamBf16Bytes =
    std::is_same<Engine, common::DotEngine>::value ? common::kStreamOutputBytes : int64_t(4) << 20;

// Uninitialised scratch from the output allocator (huge pages, reused across calls): packed
// operands are megabytes, which a zero-filled std::vector would page-fault and clear every call.
inline at::Tensor scratch(int64_t numel, at::ScalarType dtype) {
  return common::empty_output({numel}, at::TensorOptions(dtype));
}

// Strip c (columns TW c..TW c + TW - 1) of src (M, K) as `pairs` rows of TW pair words.
template <int TW>
SPARSEKERN_AMX inline void strip_token_pairs(const bf16* src, int64_t M, int64_t K, int64_t pairs, int64_t c,
                                             int32_t* out) {
  static_assert(TW == 16 || TW == 32, "strips of 16 or 32 columns");
  for (int64_t r = 0; r < pairs; ++r) {
    int32_t* row = out + (c * pairs + r) * TW;
    for (int v = 0; v < TW / 16; ++v) {
      _mm512_storeu_si512(row + 16 * v, common::pair_words(src + c * TW + 16 * v, K, r, M));
    }
  }
}

// dst (VNNI KS x NW) = B[k][n] = transpose ? v[n * ldv + k] : v[k * ldv + n], k < KS, n < NW:
// KS / 2 rows of NW pair words.
template <int KS, int NW>
SPARSEKERN_AMX inline void pack_vnni_tile(const bf16* v, int64_t ldv, bool transpose, bf16* dst) {
  static_assert((KS == 32 || KS == 16) && (NW == 32 || NW == 16), "tiles of 32 or 16");
  int32_t* out = reinterpret_cast<int32_t*>(dst);
  if (transpose) {  // the pair word (k, n) is word k / 2 of row n of v: rows of words, transposed
    __m512i r[16];
    for (int h = 0; h < NW / 16; ++h) {
      for (int i = 0; i < 16; ++i) {
        const bf16* row = v + (16 * h + i) * ldv;
        r[i] = KS == 32 ? _mm512_loadu_si512(row) : common::load_16(row);
      }
      common::transpose_16x16_epi32(r);
      for (int k = 0; k < KS / 2; ++k) _mm512_storeu_si512(out + k * NW + 16 * h, r[k]);
    }
  } else {  // rows 2r and 2r + 1 of v interleaved: a strip of KS tokens
    strip_token_pairs<NW>(v, KS, ldv, KS / 2, 0, out);
  }
}

// out (M, G * g) = per group i: sum_p A[:, seg[p]*w : +w] @ B_p (+ bias), as grouped_product, in
// output tiles of 32 rows x the Engine's kWidth columns and K steps of its kDepth.
template <typename Engine>
void bf16_grouped_product(const bf16* a, int64_t M, int64_t Ka, const bf16* values, int64_t br, int64_t bc,
                                bool transpose, const int64_t* offsets, int64_t G, const int64_t* blk,
                                const int64_t* seg, bf16* out, const bf16* bias) {
  constexpr int NW = Engine::kWidth, KS = Engine::kDepth;
  constexpr int64_t kVnni = KS * NW;  // elements of one packed B operand
  const int64_t w = transpose ? bc : br, g = transpose ? br : bc, N = G * g;
  const int64_t nsub = g / NW, ksteps = w / KS, nnz = offsets[G];
  const int64_t mtiles = (M + kAmxTile - 1) / kAmxTile;
  if (M == 0 || N == 0) return;

  // Packed B: group i, sub-tile s, member q, K step u at ((first_i * nsub + s * count_i + q) * ksteps + u).
  at::Tensor packed_buf = scratch(std::max<int64_t>(1, nnz * nsub * ksteps) * kVnni, at::kBFloat16);
  bf16* packed = packed_buf.data_ptr<bf16>();
  common::parallel_for_work(G, nnz * br * bc / 16, [&](int64_t g0, int64_t g1) {
    for (int64_t i = g0; i < g1; ++i) {
      const int64_t first = offsets[i], count = offsets[i + 1] - first;
      for (int64_t q = 0; q < count; ++q) {
        const bf16* v = values + (blk ? blk[first + q] : first + q) * br * bc;
        for (int64_t s = 0; s < nsub; ++s) {
          for (int64_t u = 0; u < ksteps; ++u) {
            const bf16* corner = transpose ? v + s * NW * bc + u * KS : v + u * KS * bc + s * NW;
            pack_vnni_tile<KS, NW>(corner, bc, transpose, packed + ((first * nsub + s * count + q) * ksteps + u) * kVnni);
          }
        }
      }
    }
  });
  std::vector<int64_t> a_off(std::max<int64_t>(1, nnz * ksteps));  // column of A of member p's K step u
  for (int64_t p = 0; p < nnz; ++p) {
    for (int64_t u = 0; u < ksteps; ++u) a_off[p * ksteps + u] = seg[p] * w + u * KS;
  }
  // The last rows, zero-padded to a full tile: the tile loads read 32 rows.
  const int64_t tail_rows = M % kAmxTile;
  std::vector<bf16> tail(tail_rows ? kAmxTile * Ka : 0, bf16(0.0f));
  if (tail_rows) std::memcpy(tail.data(), a + (M - tail_rows) * Ka, tail_rows * Ka * sizeof(bf16));

  const int64_t mblock = std::max<int64_t>(1, kAmxABlockBytes / (kAmxTile * Ka * int64_t(sizeof(bf16))));
  struct Item { int64_t group, t0, t1; };
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};
  for (int64_t t0 = 0; t0 < mtiles; t0 += mblock) {
    const int64_t t1 = std::min(mtiles, t0 + mblock);
    for (int64_t i = 0; i < G; ++i) {
      items.push_back({i, t0, t1});
      const int64_t count = offsets[i + 1] - offsets[i];
      prefix.push_back(prefix.back() + (count * ksteps + kAmxItemOverhead) * nsub * (t1 - t0) * kAmxTile * kVnni);
    }
  }
  // A large output is written with non-temporal stores (kStreamBf16Bytes): on a Xeon
  // the bf16 forward at 2048 x 4096 x 4096 right after a dense GEMM took 5.1-5.4 ms instead of
  // 6.6-7.0 at density 0.05, 7.6-7.8 instead of 9.3-9.5 at 0.1.
  const bool stream = M * N * int64_t(sizeof(bf16)) >= kStreamBf16Bytes<Engine>;
  common::parallel_ranges_by_cost(prefix, [&](int64_t begin, int64_t end) {
    Engine engine;
    alignas(64) float acc[kAmxTile * NW];
    for (int64_t idx = begin; idx < end; ++idx) {
      const Item& it = items[idx];
      const int64_t first = offsets[it.group], count = offsets[it.group + 1] - first;
      for (int64_t s = 0; s < nsub; ++s) {
        const int64_t c0 = it.group * g + s * NW;
        const bf16* bs = packed + (first * nsub + s * count) * ksteps * kVnni;
        for (int64_t t = it.t0; t < it.t1; ++t) {
          const int64_t r0 = t * kAmxTile, rows = std::min<int64_t>(kAmxTile, M - r0);
          const bf16* arows = rows == kAmxTile ? a + r0 * Ka : tail.data();
          if (count == 0) {
            std::fill(acc, acc + kAmxTile * NW, 0.0f);
          } else {
            engine.tile(arows, Ka, a_off.data() + first * ksteps, bs, int64_t(2 * NW), kVnni, count * ksteps, acc,
                        int64_t(NW), false);
          }
          common::store_tile_bf16<NW / 16>(acc, rows, bias ? bias + c0 : nullptr, out + r0 * N + c0, N, stream);
        }
      }
    }
    if (stream) common::stream_fence();  // the output is read after the region, by any thread
  });
}

// dst = src (M, N)ᵀ, zero beyond M, tile-major: row n's tokens 32 u .. 32 u + 31 at
// ((n / TW * Mp / 32 + u) * TW + n % TW) * 32, so that one K step of a TW-row tile is one
// contiguous TW x 32 tile (the tile loads then read one stream, not TW rows 4 KiB apart: dW at
// density 0.05 3 % faster in a layer step on a Xeon). sums (N floats, or null): each column of
// src summed, on the packing's loads.
template <int TW>
void pack_token_pairs_transposed(const bf16* src, int64_t M, int64_t N, int64_t Mp, bf16* dst, float* sums) {
  const common::PairColumnsLayout layout{16, 16 * TW, TW == 32 ? 256 : 16 * (Mp / 2)};
  common::parallel_for_work((N + 31) / 32, N * M, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {  // 32 columns: whole lines of src's rows (16 in a last one)
      int32_t* out = reinterpret_cast<int32_t*>(dst) + c * 32 * (Mp / 2);
      float* column_sums = sums ? sums + 32 * c : nullptr;
      if (32 * c + 32 <= N) {
        common::transpose_pair_columns<2>(src + c * 32, N, M, Mp / 2, layout, out, column_sums);
      } else {
        common::transpose_pair_columns(src + c * 32, N, M, Mp / 2, layout, out, column_sums);
      }
    }
  });
}

// dst = src (M, K) as VNNI strips of TW columns: strip c, token pair r at (c * Mp / 2 + r) * 2 TW; zero beyond M.
template <int TW>
void pack_token_pairs(const bf16* src, int64_t M, int64_t K, int64_t Mp, bf16* dst) {
  common::parallel_for_work(K / TW, K * M, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) strip_token_pairs<TW>(src, M, K, Mp / 2, c, reinterpret_cast<int32_t*>(dst));
  });
}

// dvalues[p] (br x bc) = (dYᵀ X)[row_idx[p] * br : +br, col_idx[p] * bc : +bc] for every stored block p,
// in TW x TW tiles (br and bc multiples of TW); K steps of 32 tokens. dbias (N, or null): the
// columns of dY summed (the bias gradient), on the packing of dYᵀ.
template <typename Engine>
void bf16_sampled_product(const bf16* dy, const bf16* x, int64_t M, int64_t N, int64_t K, int64_t br,
                                int64_t bc, const int64_t* row_idx, const int64_t* col_idx, int64_t nnz,
                                bf16* dvalues, bf16* dbias) {
  constexpr int TW = Engine::kWidth;
  if (nnz == 0) {
    if (dbias) common::column_sums(dy, M, N, dbias);
    return;
  }
  const int64_t Mp = std::max<int64_t>(kAmxTile, (M + kAmxTile - 1) / kAmxTile * kAmxTile);
  // dYᵀ tile-major (pack_token_pairs_transposed); X: per TW-column strip c, (Mp / 2) rows of TW
  // VNNI pairs, i.e. at c * Mp * TW + (m / 2) * 2 TW + n * 2 + m % 2. Both zero beyond M.
  const at::Tensor dyt_buf = scratch(N * Mp, at::kBFloat16), xv_buf = scratch(K * Mp, at::kBFloat16);
  const bf16 *dyt = dyt_buf.data_ptr<bf16>(), *xv = xv_buf.data_ptr<bf16>();
  std::vector<float> sums(dbias ? N : 0, 0.0f);
  pack_token_pairs_transposed<TW>(dy, M, N, Mp, dyt_buf.data_ptr<bf16>(), dbias ? sums.data() : nullptr);
  for (int64_t n = 0; dbias && n < N; ++n) dbias[n] = bf16(sums[n]);
  pack_token_pairs<TW>(x, M, K, Mp, xv_buf.data_ptr<bf16>());

  // Output tiles: (block, TW-row sub i, TW-column sub j), blocks in super-block order: the
  // blocks of kSuperBlock block rows x columns together, row-major inside, so the dYᵀ rows
  // and X strips of one chunk that they read stay in L2 across a super-block.
  std::vector<int64_t> order(nnz);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t ra = row_idx[a] / kSuperBlock, rb = row_idx[b] / kSuperBlock;
    return ra != rb ? ra < rb : col_idx[a] / kSuperBlock < col_idx[b] / kSuperBlock;
  });
  constexpr int64_t kTile = TW * TW;
  const int64_t rsub = br / TW, csub = bc / TW, tiles_per_block = rsub * csub;
  const int64_t ntiles = nnz * tiles_per_block;
  const at::Tensor acc_buf = scratch(ntiles * kTile, at::kFloat);
  float* acc = acc_buf.data_ptr<float>();
  const int64_t chunk = std::max<int64_t>(
      kAmxTile, kAmxTokenChunkBytes / (K * int64_t(sizeof(bf16))) / kAmxTile * kAmxTile);
  const int64_t steps_max = chunk / kAmxTile;
  std::vector<int64_t> a_off(steps_max);
  for (int64_t j = 0; j < steps_max; ++j) a_off[j] = j * kAmxTile * TW;  // a K step: one TW x 32 tile
  std::vector<int64_t> prefix(ntiles + 1);  // multiply-adds: a count of tiles alone kept it on one thread
  for (int64_t t = 0; t <= ntiles; ++t) prefix[t] = t * kTile * Mp;
  common::parallel_ranges_by_cost(prefix, [&](int64_t t0, int64_t t1) {
    Engine engine;
    for (int64_t m0 = 0; m0 < Mp; m0 += chunk) {
      const int64_t steps = std::min(chunk, Mp - m0) / kAmxTile;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = order[t / tiles_per_block], i = t % tiles_per_block / csub, j = t % csub;
        const int64_t row = row_idx[p] * br + i * TW, col = col_idx[p] * bc / TW + j;
        engine.tile(dyt + row * Mp + m0 * TW, int64_t(32), a_off.data(), xv + col * Mp * TW + (m0 / 2) * 2 * TW, int64_t(2 * TW),
                    int64_t(16 * 2 * TW), steps, acc + t * kTile, int64_t(TW), m0 > 0);
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = order[t / tiles_per_block], i = t % tiles_per_block / csub, j = t % csub;
      common::store_tile_bf16<TW / 16>(acc + t * kTile, TW, nullptr, dvalues + p * br * bc + i * TW * bc + j * TW, bc);
    }
  });
}
#endif

}  // namespace bsr
}  // namespace sparsekern
