// Weight gradient: dvalues[p] = dY[:, rows of block p]ᵀ @ X[:, cols of block p] (SDDMM).
//
// The reduction runs over the tokens M. Read in place, every token step of a
// microkernel would land on a new page of dY and X (rows are 4N / 4K bytes
// apart) and defeat the prefetchers, so tokens are walked in chunks and each
// chunk is packed once, GotoBLAS style: dYᵀ into row tiles of every block row
// ([chunk][mr], mr <= MR), X into zero-padded NR-column strips of every block
// column ([chunk][NR]), double-buffered so packing chunk c+1 and computing chunk c
// share one parallel region. A tile of a block is then one microkernel call over
// two contiguous streams, accumulating into the output across chunks. Stored
// blocks all cost the same, so an even split over blocks is balanced whatever
// the row structure.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "bsr/grouped_product.h"
#include "bsr/microkernel.h"
#include "bsr/parallel.h"

namespace sparsekern {
namespace bsr {

constexpr int64_t kTokenChunk = 256;  // tokens per packed chunk: its strips of dY and X stay in L3
constexpr int64_t kRowsPerPass = 16;  // tokens per packing pass (rows being read stay in L2)

// Row tiles (offset, rows) covering a block of br rows: tiles of MR, the last
// 7 or 8 rows as two tiles of about 4 so no tile is left with 1-2 rows.
inline std::vector<std::pair<int64_t, int>> row_tiles(int64_t br) {
  std::vector<std::pair<int64_t, int>> tiles;
  for (int64_t o = 0; o < br;) {
    const int64_t rem = br - o;
    const int t = (rem == 7 || rem == 8) ? int(rem - rem / 2) : int(std::min<int64_t>(kMR, rem));
    tiles.emplace_back(o, t);
    o += t;
  }
  return tiles;
}

// dst[m * MR + i] = src[m * ld + i] for tokens m in [t0, t1): one row tile of dYᵀ.
template <int MR, typename C>
inline void copy_tile(C* dst, const C* src, int64_t ld, int64_t t0, int64_t t1) {
  for (int64_t m = t0; m < t1; ++m) {
    for (int i = 0; i < MR; ++i) dst[m * MR + i] = src[m * ld + i];
  }
}

// dy (M, N) and x (M, K) in the compute type; dvalues (nnz, br, bc) in the storage type.
template <typename S, typename C>
void sampled_product(const C* dy, const C* x, int64_t M, int64_t N, int64_t K, int64_t br, int64_t bc,
                     const int64_t* rows, const int64_t* cols, int64_t nnz, S* dvalues) {
  constexpr int NR = kNR<C>;
  const int64_t CB = K / bc, nsub = (bc + NR - 1) / NR, block = br * bc;
  if (nnz == 0) return;
  at::Tensor acc_buf;
  C* acc = reinterpret_cast<C*>(dvalues);
  if (!std::is_same<S, C>::value) {  // half types accumulate in fp32
    acc_buf = at::empty({nnz * block}, scalar_type_of<C>());
    acc = acc_buf.data_ptr<C>();
  }
  if (M == 0) std::fill(acc, acc + nnz * block, C(0));

  const auto tiles = row_tiles(br);
  std::vector<Microkernel<C>> kernels;
  for (const auto& tile : tiles) kernels.push_back(microkernel_rows<C, false>(tile.second));
  const int64_t chunk = std::min(kTokenChunk, M), RB = N / br, zero = 0;
  const int64_t nchunks = M == 0 ? 0 : (M + chunk - 1) / chunk;
  // Two buffers (chunk c in buffer c % 2), each: block row r's tile (o, mr) at
  // (r * br + o) * chunk, [chunk][mr]; then block column c's sub-tile s at
  // dy_size + (c * nsub + s) * chunk * NR, [chunk][NR].
  const int64_t dy_size = N * chunk, buf_size = dy_size + CB * nsub * NR * chunk;
  at::Tensor buf = at::empty({std::max<int64_t>(1, 2 * buf_size)}, scalar_type_of<C>());

  // Items [i0, i1) of chunk c's packing: [0, RB) block rows of dY, [RB, RB + CB) block columns of X.
  // Passes of kRowsPerPass tokens keep the rows being read in L1/L2.
  auto pack = [&](int64_t c, int64_t i0, int64_t i1) {
    const int64_t m0 = c * chunk, len = std::min(chunk, M - m0);
    C* pdy = buf.data_ptr<C>() + (c % 2) * buf_size;
    C* px = pdy + dy_size;
    for (int64_t t0 = 0; t0 < len; t0 += kRowsPerPass) {
      const int64_t t1 = std::min(len, t0 + kRowsPerPass);
      for (int64_t item = i0; item < i1; ++item) {
        if (item < RB) {
          for (const auto& tile : tiles) {
            C* dst = pdy + (item * br + tile.first) * chunk;
            const C* src = dy + m0 * N + item * br + tile.first;
            switch (tile.second) {  // constant widths let the copies vectorise
              case kMR: copy_tile<kMR>(dst, src, N, t0, t1); break;
              case 4: copy_tile<4>(dst, src, N, t0, t1); break;
              default:
                for (int64_t m = t0; m < t1; ++m) {
                  for (int i = 0; i < tile.second; ++i) dst[m * tile.second + i] = src[m * N + i];
                }
            }
          }
        } else {
          const int64_t col = item - RB;
          for (int64_t s = 0; s < nsub; ++s) {
            C* dst = px + (col * nsub + s) * chunk * NR;
            const C* src = x + m0 * K + col * bc + s * NR;
            const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
            for (int64_t m = t0; m < t1; ++m) {
              if (ncols == NR) {
                std::copy(src + m * K, src + m * K + NR, dst + m * NR);
              } else {
                for (int64_t n = 0; n < NR; ++n) dst[m * NR + n] = n < ncols ? src[m * K + n] : C(0);
              }
            }
          }
        }
      }
    }
  };
  // Stored blocks [b0, b1) accumulate chunk c.
  auto compute = [&](int64_t c, int64_t b0, int64_t b1) {
    const int64_t m0 = c * chunk, len = std::min(chunk, M - m0);
    const bool add = c > 0;
    const C* pdy = buf.data_ptr<C>() + (c % 2) * buf_size;
    const C* px = pdy + dy_size;
    for (int64_t b = b0; b < b1; ++b) {
      C* ob = acc + b * block;
      for (int64_t s = 0; s < nsub; ++s) {
        const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
        const C* bs = px + (cols[b] * nsub + s) * chunk * NR;
        for (size_t t = 0; t < tiles.size(); ++t) {
          const int64_t o = tiles[t].first;
          const int mr = tiles[t].second;
          const C* as = pdy + (rows[b] * br + o) * chunk;
          C* out = ob + o * bc + s * NR;
          if (ncols == NR) {
            kernels[t](as, mr, &zero, 1, len, bs, NR, out, bc, add);
          } else {
            alignas(64) C tmp[kMR * NR];
            kernels[t](as, mr, &zero, 1, len, bs, NR, tmp, NR, false);
            for (int i = 0; i < mr; ++i) {
              for (int64_t n = 0; n < ncols; ++n) out[i * bc + n] = (add ? out[i * bc + n] : C(0)) + tmp[i * NR + n];
            }
          }
        }
      }
    }
  };
  // Region c packs chunk c and computes chunk c - 1: one barrier per chunk, and
  // the memory-bound packing overlaps the other thread's FMAs.
  const int64_t parts = threads_for(std::max(nnz * block, N + K) * chunk);
  for (int64_t c = 0; c <= nchunks; ++c) {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        if (c < nchunks) pack(c, (RB + CB) * p / parts, (RB + CB) * (p + 1) / parts);
        if (c > 0) compute(c - 1, nnz * p / parts, nnz * (p + 1) / parts);
      }
    });
  }
  if (!std::is_same<S, C>::value) {
    parallel_for_work(nnz * block, nnz * block, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dvalues[i] = S(acc[i]);
    });
  }
}

}  // namespace bsr
}  // namespace sparsekern
