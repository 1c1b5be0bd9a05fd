// The token reductions of a low-rank layer's backward: out = aᵀ b, a (T, M) and
// b (T, N) row-major with N = r narrow, summed over the T tokens (dK = dYᵀ A,
// dL = Xᵀ G). Optionally also the column sums of a (the bias gradient Σ_t dY[t]),
// from the same read of a.
//
// GotoBLAS loop nest with aᵀ as the broadcast operand:
//   b is packed once into NR-column strips (zero-padded), token-major;
//   each thread owns a range of MB-column blocks of a (disjoint output rows);
//   per token block of KC rows it copies the KC x MB region of a into a buffer
//     whose row stride is an odd number of cache lines, prefetching rows ahead
//     (a's rows are M apart: a power-of-two stride maps every row of a column
//     strip to the same few cache sets, and is too long for the hardware
//     prefetcher), and accumulates the column sums on the way;
//   every NR strip then runs against every MR-column tile of the region, the
//     MR values of a token broadcast from one buffer row; the output tile
//     accumulates across token blocks.
// Single-thread on Zen3 at 2048 tokens x 4096 x 64: ~12.5 ms against MKL's
// 16 ms for torch.mm(a.t(), b) (docs/low_rank.md), with the column sums for free.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/grouped_product.h"
#include "common/microkernel.h"
#include "common/parallel.h"
#include "common/huge_page_output.h"

namespace sparsekern {
namespace lowrank {

constexpr int64_t kKC = 256;  // tokens per block: one NR strip of b (16 KB) stays in L1
constexpr int64_t kMB = 192;  // columns of a per block (a multiple of every MR: 6, 12): the region (192 KB) stays in L2
constexpr int64_t kAhead = 8;  // rows of a prefetched ahead of the packing

// out (M, N) = aᵀ b; colsum (M, or null) = aᵀ 1. Half types are widened by the caller: the
// output accumulates across token blocks, so it stays in C until the end.
template <typename C, int NR>
void token_reduction(const C* a, const C* b, int64_t T, int64_t M, int64_t N, C* out, C* colsum) {
  const int MR = common::tile_rows();  // 12 on AVX-512: 24 accumulators, as the other products
  const int64_t nsub = (N + NR - 1) / NR;
  if (M == 0) return;
  if (T == 0 || N == 0) {
    std::fill(out, out + M * N, C(0));
    if (colsum) std::fill(colsum, colsum + M, C(0));
    if (T == 0 || !colsum) return;
  }

  // b packed as strip s, token t at (s * T + t) * NR.
  at::Tensor b_buf = common::empty_output({std::max<int64_t>(1, nsub * T * NR)}, at::TensorOptions(common::scalar_type_of<C>()));
  C* bp = b_buf.data_ptr<C>();
  common::parallel_for_work(T, T * N / 16, [&](int64_t t0, int64_t t1) {
    for (int64_t s = 0; s < nsub; ++s) {
      for (int64_t t = t0; t < t1; ++t) {
        C* dst = bp + (s * T + t) * NR;
        for (int64_t n = 0; n < NR; ++n) dst[n] = s * NR + n < N ? b[t * N + s * NR + n] : C(0);
      }
    }
  });

  // Row stride of the packed region: an odd number of cache lines, so that its rows
  // spread over the cache sets (a's own stride M is often a power of two).
  constexpr int64_t kLine = 64 / int64_t(sizeof(C));
  const int64_t ld = ((kMB + MR + kLine - 1) / kLine | 1) * kLine;
  const int64_t mblocks = (M + kMB - 1) / kMB;
  const int64_t threads = common::threads_for(T * M * std::max<int64_t>(N, 1));
  const common::Microkernel<C> kernel = common::microkernel_rows<C, NR, false>(MR);
  const common::Microkernel<C> last = common::microkernel_rows<C, NR, false>(int(M - (M - 1) / MR * MR));
  at::parallel_for(0, mblocks, (mblocks + threads - 1) / threads, [&](int64_t blk0, int64_t blk1) {
    std::vector<C> sums(kMB), region(kKC * ld);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t m0 = blk * kMB, mb = std::min(kMB, M - m0), tiles = (mb + MR - 1) / MR;
      std::fill(sums.begin(), sums.end(), C(0));
      for (int64_t t0 = 0; t0 < T; t0 += kKC) {
        const int64_t kc = std::min(kKC, T - t0);
        for (int64_t t = 0; t < kc; ++t) {  // pack (and sum) the region: one pass over its rows
          const C* row = a + (t0 + t) * M + m0;
          if (t0 + t + kAhead < T) {  // rows are M apart: too far for the hardware prefetcher
            const char* ahead = reinterpret_cast<const char*>(row + kAhead * M);
            for (int64_t off = 0; off < mb * int64_t(sizeof(C)); off += 64) __builtin_prefetch(ahead + off, 0, 3);
          }
          if (colsum) {
            C* __restrict acc = sums.data();
            for (int64_t m = 0; m < mb; ++m) acc[m] += row[m];
          }
          C* dst = region.data() + t * ld;
          std::copy(row, row + mb, dst);
          std::fill(dst + mb, dst + tiles * MR, C(0));
        }
        const int64_t zero = 0;
        const bool add = t0 > 0;
        for (int64_t s = 0; s < nsub; ++s) {
          const int64_t n0 = s * NR, ncols = std::min<int64_t>(NR, N - n0);
          const C* bs = bp + (s * T + t0) * NR;
          for (int64_t q = 0; q < tiles; ++q) {
            const int64_t r0 = m0 + q * MR, rows = std::min<int64_t>(MR, M - r0);
            C* o = out + r0 * N + n0;
            const C* tile = region.data() + q * MR;
            if (rows == MR && ncols == NR) {
              kernel(tile, ld, &zero, 1, kc, bs, NR, o, N, add ? common::Store::kAdd : common::Store::kWrite, nullptr);
            } else {
              alignas(64) C tmp[common::kMaxTileRows * NR];
              (rows == MR ? kernel : last)(tile, ld, &zero, 1, kc, bs, NR, tmp, NR, common::Store::kWrite, nullptr);
              for (int64_t i = 0; i < rows; ++i) {
                for (int64_t n = 0; n < ncols; ++n) {
                  o[i * N + n] = add ? o[i * N + n] + tmp[i * NR + n] : tmp[i * NR + n];
                }
              }
            }
          }
        }
      }
      if (colsum) {
        for (int64_t m = 0; m < mb; ++m) colsum[m0 + m] = sums[m];
      }
    }
  });
}

}  // namespace lowrank
}  // namespace sparsekern
