// Forward (Y = X Wᵀ) and input gradient (dX = dY W): one driver for both.
//
// Both are "dense times block-sparse": output column group i (a block row of W
// for the forward, a block column for dX) is the sum, over the stored blocks p
// of that group, of A[:, seg(p) * w : +w] @ B_p with B_p a (w, g) block (Vᵀ for
// the forward, V for dX). Loop nest, GotoBLAS style:
//   A (X or dY, in the compute type) is read in place, MR rows at a time;
//   B (the values) is packed once into NR-column strips per group, members
//     back to back, so one group's strip is one contiguous K-stream;
//   panels of groups whose packed B fits a share of L3, inside them blocks of
//     m-tiles whose rows of A fit in L2, inside them each group of the panel:
//     every NR strip of it against every m-tile of the block. The strip is
//     reused across the m-tiles, the A rows across the groups.
// (panel, m-block, group) items are split over the threads by cost, so a block
// row holding many blocks is shared rather than landing on one thread.
// kPairs: bf16 on AVX512-BF16 dot products (common/dot_rows.h) for blocks whose sides are
// multiples of NR = 16: B packed in VNNI pairs, each member's K segment w / NR dot steps of NR,
// the tile summed in fp32 and rounded once (with the bias) on output.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/dot_rows.h"
#include "common/microkernel.h"
#include "common/parallel.h"
#include "common/huge_page_output.h"
#include "common/transpose.h"

namespace sparsekern {
namespace common {

constexpr int64_t kABlockBytes = 384 << 10;  // rows of A kept hot in L2 (1 MiB per core: this + the next + B)
constexpr int64_t kBPanelBytes = 4 << 20;    // packed B strips kept hot in L3 (at least; b_panel_bytes)
constexpr int64_t kItemOverhead = 32;        // cost of writing an output tile, in K-steps
constexpr int64_t kMaxItems = 1 << 18;

// The type the microkernels compute in for storage type S: double for double, float otherwise
// (half types are widened to float).
template <typename S>
using Compute = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

template <typename C>
at::ScalarType scalar_type_of() {
  if (std::is_same<C, double>::value) return at::kDouble;
  return std::is_same<C, c10::BFloat16>::value ? at::kBFloat16 : at::kFloat;
}

// Packed B of one panel of groups, which every m-tile sweeps while it stays in L3; each further
// panel reads A's rows again. kBPanelBytes, or an eighth of a larger L3: on a Xeon reporting
// 480 MiB the whole B of a 4096 x 4096 layer is one panel, and the fp32 forward and dX ran 5-14 %
// faster at density 0.1 and 0.5 than in 4 MiB panels (1-5 % at 0.25); a 32 MiB L3 (AMD EPYC)
// keeps 4 MiB.
inline int64_t b_panel_bytes() {
  static const int64_t bytes = std::max<int64_t>(kBPanelBytes, l3_bytes() / 8);
  return bytes;
}

// The end of the panel of groups that starts at group p0: groups whose packed B (member_bytes a
// stored block) fills b_panel_bytes(), at least one.
inline int64_t panel_end(const int64_t* offsets, int64_t G, int64_t p0, int64_t member_bytes) {
  const int64_t limit = b_panel_bytes();
  int64_t p1 = p0, bytes = 0;
  while (p1 < G && (p1 == p0 || bytes < limit)) {
    bytes += (offsets[p1 + 1] - offsets[p1]) * member_bytes;
    ++p1;
  }
  return p1;
}

#ifdef SPARSEKERN_X86
// One fp32 member's NR-column strips (NR a multiple of 16, every strip full: g % NR == 0, and
// w % 16 == 0 where transposed), sub-tile s at dst + s * sub_stride, on AVX-512F: the forward's
// B_p = vᵀ in 16 x 16 register transposes, dX's rows by copy_strip_rows_avx512. The scalar loop
// took 0.9 ms of a 17 ms forward at density 0.05 (2048 x 4096 x 4096, block 32).
template <int NR>
SPARSEKERN_AVX512 void pack_member_avx512(const float* v, int64_t bc, bool transpose, int64_t w, int64_t nsub,
                                          float* dst0, int64_t sub_stride) {
  for (int64_t s = 0; s < nsub; ++s) {
    float* dst = dst0 + s * sub_stride;
    if (!transpose) {  // B(k, n) = v[k * bc + s * NR + n]
      copy_strip_rows_avx512<NR>(dst, v + s * NR, bc, 0, w);
      continue;
    }
    for (int h = 0; h < NR / 16; ++h) {  // B(k, n) = v[(c0 + n) * bc + k]
      const int64_t c0 = s * NR + h * 16;
      for (int64_t k0 = 0; k0 < w; k0 += 16) {
        __m512i r[16];
        for (int n = 0; n < 16; ++n) r[n] = _mm512_loadu_si512(v + (c0 + n) * bc + k0);
        transpose_16x16_epi32(r);
        for (int u = 0; u < 16; ++u) _mm512_storeu_si512(dst + (k0 + u) * NR + h * 16, r[u]);
      }
    }
  }
}
#endif

// B of the grouped products packed into NR-column strips: group i, sub-tile s (columns s NR ..),
// member q at ((offsets[i] * nsub) + s * count_i + q) * w * NR, each strip k-major (VNNI pairs for
// kPairs), zero beyond the group's columns. transpose, offsets, blk: as grouped_product's.
// Scratch from the output allocator: at 4096 x 256 the packed factor is 4 MB, which would
// otherwise be faulted in afresh on every call.
template <typename S, typename C, int NR, bool kPairs = false>
at::Tensor pack_groups(const S* values, int64_t br, int64_t bc, bool transpose, const int64_t* offsets, int64_t G,
                       const int64_t* blk) {
  const int64_t w = transpose ? bc : br, g = transpose ? br : bc, nsub = (g + NR - 1) / NR, strip = w * NR;
  const int64_t nnz = offsets[G];
  at::Tensor b_buf = empty_output({std::max<int64_t>(1, nnz * nsub * strip)}, at::TensorOptions(scalar_type_of<C>()));
  C* bp = b_buf.data_ptr<C>();
  // Packing is ~1/M of the product's work: it gets its own parallel region only
  // when it is large (~2M elements), since each region costs a scheduling delay
  // on a loaded machine.
  parallel_for_work(G, nnz * br * bc / 16, [&](int64_t g0, int64_t g1) {
    for (int64_t i = g0; i < g1; ++i) {
      const int64_t first = offsets[i], count = offsets[i + 1] - first;
      for (int64_t q = 0; q < count; ++q) {
        const S* v = values + (blk ? blk[first + q] : first + q) * br * bc;
#ifdef SPARSEKERN_X86
        if constexpr (std::is_same<S, float>::value && std::is_same<C, float>::value && NR % 16 == 0 && !kPairs) {
          if (simd_copies() && g % NR == 0 && (!transpose || w % 16 == 0)) {
            pack_member_avx512<NR>(v, bc, transpose, w, nsub, bp + (first * nsub + q) * strip, count * strip);
            continue;
          }
        }
#endif
        for (int64_t s = 0; s < nsub; ++s) {
          C* dst = bp + (first * nsub + s * count + q) * strip;
          for (int64_t k = 0; k < w; ++k) {
            for (int64_t n = 0; n < NR; ++n) {
              const int64_t col = s * NR + n;
              dst[kPairs ? vnni_index<NR>(k, n) : k * NR + n] =
                  col >= g ? C(0) : C(transpose ? v[col * bc + k] : v[k * bc + col]);
            }
          }
        }
      }
    }
  });
  return b_buf;
}

// out (M, G * g) = [sum_p A[:, seg[p]*w : +w] @ B_p for each group] (+ bias[col]); see above.
// transpose: B_p = values[blk[p]]ᵀ (w = bc, g = br), else B_p = values[blk[p]] (w = br, g = bc).
// offsets (G + 1): members of group i are p in [offsets[i], offsets[i+1]); blk null = identity.
// bias (G * g, or null) is added to every row: it seeds the accumulators (no extra pass over out).
template <typename S, typename C, int NR, bool kPairs = false>
void grouped_product(const C* a, int64_t M, int64_t Ka, const S* values, int64_t br, int64_t bc,
                     bool transpose, const int64_t* offsets, int64_t G, const int64_t* blk,
                     const int64_t* seg, S* out, const S* bias = nullptr) {
  static_assert(!kPairs || (std::is_same<S, bf16>::value && std::is_same<C, bf16>::value && NR == 16),
                "the dot-product products run bf16 strips of 16 columns");
  const int MR = tile_rows(Ka * int64_t(sizeof(C)));  // A's rows are read in place, Ka apart
  constexpr bool kDirect = std::is_same<S, C>::value && !kPairs;  // full tiles are stored straight into `out`
  const int64_t w = transpose ? bc : br, g = transpose ? br : bc, N = G * g;
  const int64_t nsub = (g + NR - 1) / NR, mtiles = (M + MR - 1) / MR, nnz = offsets[G];
  const int64_t strip = w * NR;  // elements of one packed (block, sub-tile)
  if (M == 0 || N == 0) return;

  const at::Tensor b_buf = pack_groups<S, C, NR, kPairs>(values, br, bc, transpose, offsets, G, blk);
  const C* bp = b_buf.data_ptr<C>();

  const int64_t steps = kPairs ? w / NR : 1;  // kernel K steps a member's segment is cut into
  std::vector<int64_t> seg_off(std::max<int64_t>(1, nnz * steps));  // column of A where each step starts
  for (int64_t p = 0; p < nnz; ++p) {
    for (int64_t j = 0; j < steps; ++j) seg_off[p * steps + j] = seg[p] * w + j * NR;
  }

  // Work items (group, m-tile range) in panel / m-block / group order.
  int64_t mblock = std::max<int64_t>(1, kABlockBytes / std::max<int64_t>(1, Ka * MR * int64_t(sizeof(C))));
  // No item may hold more than 1/8 of a thread's share, or one heavy block row
  // (power-law rows) could not be split evenly across the threads.
  int64_t per_tile_total = 0, per_tile_max = 1;
  bool whole_rows = true;  // every group reads all of A's columns (a low-rank factor, a dense layout)
  for (int64_t i = 0; i < G; ++i) {
    whole_rows = whole_rows && (offsets[i + 1] - offsets[i]) * w == Ka;
    const int64_t c = ((offsets[i + 1] - offsets[i]) * w + kItemOverhead) * nsub;
    per_tile_total += c;
    per_tile_max = std::max(per_tile_max, c);
  }
  const int64_t threads = threads_for(per_tile_total * mtiles * MR * NR);
  if (threads > 1) mblock = std::min(mblock, std::max<int64_t>(1, per_tile_total * mtiles / (8 * threads * per_tile_max)));
  mblock = std::max(mblock, (mtiles * G + kMaxItems - 1) / kMaxItems);
  struct Item { int64_t group, t0, t1, share, shares; };  // share of the next m-block to prefetch
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};
  for (int64_t p0 = 0, p1; p0 < G; p0 = p1) {
    p1 = panel_end(offsets, G, p0, nsub * strip * int64_t(sizeof(C)));
    for (int64_t t0 = 0; t0 < mtiles; t0 += mblock) {
      const int64_t t1 = std::min(mtiles, t0 + mblock);
      for (int64_t i = p0; i < p1; ++i) {
        items.push_back({i, t0, t1, i - p0, p1 - p0});
        const int64_t count = offsets[i + 1] - offsets[i];
        prefix.push_back(prefix.back() + (count * w + kItemOverhead) * nsub * NR * (t1 - t0) * MR);
      }
    }
  }

  const std::vector<std::pair<int64_t, int>> tile_heights{{0, MR}, {0, int(M - (mtiles - 1) * MR)}};
  const auto kernels = tile_kernels<C, NR, kPairs, true, NR / 2>(tile_heights);
  const Store direct = streamed_output<S>(M * N) ? Store::kStream : Store::kWrite;
  auto run_item = [&](const Item& it) {
    // The groups of a panel read A's rows in scattered segments, so a first touch
    // from DRAM would stall the microkernel: each item instead prefetches its
    // share of the next m-block's rows (one contiguous range of A) into L2.
    // Rows read whole are streamed by the hardware prefetchers, and there the burst
    // of prefetches only competes with them: on a Xeon the low-rank x V product
    // ran 21 % faster without it.
    const int64_t next_end = std::min(M, (2 * it.t1 - it.t0) * MR);
    if (!whole_rows && it.t1 * MR < next_end) {
      const char* region = reinterpret_cast<const char*>(a + it.t1 * MR * Ka);
      const int64_t bytes = (next_end - it.t1 * MR) * Ka * int64_t(sizeof(C));
      const int64_t lo = bytes * it.share / it.shares, hi = bytes * (it.share + 1) / it.shares;
      for (int64_t off = lo & ~int64_t(63); off < hi; off += 64) __builtin_prefetch(region + off, 0, 2);
    }
    const int64_t first = offsets[it.group], count = offsets[it.group + 1] - first;
    for (int64_t s = 0; s < nsub; ++s) {
      const int64_t c0 = it.group * g + s * NR, ncols = std::min<int64_t>(NR, g - s * NR);
      const C* bs = bp + (first * nsub + s * count) * strip;
      for (int64_t t = it.t0; t < it.t1; ++t) {
        const int64_t r0 = t * MR, rows = std::min<int64_t>(MR, M - r0);
        S* o = out + r0 * N + c0;
        if (count == 0) {  // empty block row/column: its output is zero (or the bias)
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t n = 0; n < ncols; ++n) o[i * N + n] = bias ? bias[c0 + n] : S(0);
          }
          continue;
        }
        const C* arows = a + r0 * Ka;
        const auto kern = kernels[rows == MR ? 0 : 1];
        if constexpr (kPairs) {
#ifdef SPARSEKERN_AMX_BUILD
          alignas(64) float tmp[kMaxTileRows * NR];
          kern(arows, Ka, seg_off.data() + first * steps, bs, 2 * NR, NR * NR, count * steps, tmp, NR, false);
          if (ncols == NR) {
            store_tile_bf16<NR / 16>(tmp, rows, bias ? bias + c0 : nullptr, o, N, direct == Store::kStream);
            continue;
          }
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t n = 0; n < ncols; ++n) o[i * N + n] = S(tmp[i * NR + n] + (bias ? float(bias[c0 + n]) : 0.f));
          }
#endif
        } else if (kDirect && ncols == NR) {
          kern(arows, Ka, seg_off.data() + first, count, w, bs, NR, reinterpret_cast<C*>(o), N, direct,  // S == C
               reinterpret_cast<const C*>(bias ? bias + c0 : nullptr));
        } else {
          alignas(64) C tmp[kMaxTileRows * NR];
          kern(arows, Ka, seg_off.data() + first, count, w, bs, NR, tmp, NR, Store::kWrite, nullptr);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t n = 0; n < ncols; ++n) {
              o[i * N + n] = bias ? S(tmp[i * NR + n] + C(bias[c0 + n])) : S(tmp[i * NR + n]);
            }
          }
        }
      }
    }
  };
  parallel_ranges_by_cost(prefix, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) run_item(items[idx]);
    if (direct == Store::kStream) stream_fence();  // the output is read after the region, by any thread
  });
}

}  // namespace common
}  // namespace sparsekern
