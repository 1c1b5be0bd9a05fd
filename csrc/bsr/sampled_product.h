// Weight gradient: dvalues[p] = dY[:, rows of block p]ᵀ @ X[:, cols of block p] (SDDMM).
//
// The reduction runs over the tokens M. dYᵀ is packed once into row tiles of
// each block row ([M][mr], mr <= MR), X once into NR-column strips of each
// block column ([M][NR]); a tile of a block is then one microkernel call with a
// single K-segment. Tokens are walked in chunks so the strips of a chunk (for
// every block row and column) stay in L3, each chunk accumulating into the
// output. Stored blocks all cost the same, so an even split over blocks is
// balanced whatever the row structure.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "bsr/grouped_product.h"
#include "bsr/microkernel.h"

namespace sparsekern {
namespace bsr {

constexpr int64_t kTokenChunk = 256;

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

template <typename S, typename C>
void sampled_product(const S* dy, const S* x, int64_t M, int64_t N, int64_t K, int64_t br, int64_t bc,
                     const int64_t* rows, const int64_t* cols, int64_t nnz, S* dvalues) {
  constexpr int NR = kNR<C>;
  const int64_t RB = N / br, CB = K / bc, nsub = (bc + NR - 1) / NR, block = br * bc;
  if (nnz == 0) return;
  at::Tensor acc_buf;
  C* acc = reinterpret_cast<C*>(dvalues);
  if (!std::is_same<S, C>::value) {  // half types accumulate in fp32
    acc_buf = at::empty({nnz * block}, scalar_type_of<C>());
    acc = acc_buf.data_ptr<C>();
  }
  if (M == 0) {
    std::fill(acc, acc + nnz * block, C(0));
  } else {
    const auto tiles = row_tiles(br);
    // dYᵀ: block row r, tile (o, mr) at (r * br + o) * M, laid out [M][mr].
    at::Tensor dy_buf = at::empty({N * M}, scalar_type_of<C>());
    C* pdy = dy_buf.data_ptr<C>();
    at::parallel_for(0, RB, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (const auto& tile : tiles) {
          C* dst = pdy + (r * br + tile.first) * M;
          const S* src = dy + r * br + tile.first;
          for (int64_t m = 0; m < M; ++m) {
            for (int i = 0; i < tile.second; ++i) dst[m * tile.second + i] = C(src[m * N + i]);
          }
        }
      }
    });
    // X: block column c, sub-tile s at (c * nsub + s) * M * NR, laid out [M][NR], zero-padded.
    at::Tensor x_buf = at::empty({CB * nsub * M * NR}, scalar_type_of<C>());
    C* px = x_buf.data_ptr<C>();
    at::parallel_for(0, CB, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t s = 0; s < nsub; ++s) {
          C* dst = px + (c * nsub + s) * M * NR;
          const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
          for (int64_t m = 0; m < M; ++m) {
            const S* src = x + m * K + c * bc + s * NR;
            for (int64_t n = 0; n < NR; ++n) dst[m * NR + n] = n < ncols ? C(src[n]) : C(0);
          }
        }
      }
    });

    std::vector<Microkernel<C>> kernels;
    for (const auto& tile : tiles) kernels.push_back(microkernel_rows<C>(tile.second));
    const int64_t zero = 0;
    at::parallel_for(0, nnz, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t m0 = 0; m0 < M; m0 += kTokenChunk) {
        const int64_t len = std::min(kTokenChunk, M - m0);
        const bool add = m0 > 0;
        for (int64_t b = b0; b < b1; ++b) {
          C* ob = acc + b * block;
          for (int64_t s = 0; s < nsub; ++s) {
            const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
            const C* bs = px + ((cols[b] * nsub + s) * M + m0) * NR;
            for (size_t t = 0; t < tiles.size(); ++t) {
              const int64_t o = tiles[t].first;
              const int mr = tiles[t].second;
              const C* as = pdy + (rows[b] * br + o) * M + m0 * mr;
              C* out = ob + o * bc + s * NR;
              if (ncols == NR) {
                kernels[t](as, &zero, 1, len, bs, out, bc, add);
              } else {
                alignas(64) C tmp[kMR * NR];
                kernels[t](as, &zero, 1, len, bs, tmp, NR, false);
                for (int i = 0; i < mr; ++i) {
                  for (int64_t n = 0; n < ncols; ++n) {
                    out[i * bc + n] = (add ? out[i * bc + n] : C(0)) + tmp[i * NR + n];
                  }
                }
              }
            }
          }
        }
      }
    });
  }
  if (!std::is_same<S, C>::value) {
    at::parallel_for(0, nnz * block, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dvalues[i] = S(acc[i]);
    });
  }
}

}  // namespace bsr
}  // namespace sparsekern
