// Weight gradient: dvalues[p] = dY[:, rows of block p]ᵀ @ X[:, cols of block p] (SDDMM).
//
// The reduction runs over the tokens M. Read in place, every token step of a
// microkernel would land on a new page of dY and X (rows are 4N / 4K bytes
// apart) and defeat the prefetchers, so tokens are walked in chunks and each
// chunk is packed once, GotoBLAS style: dYᵀ into row tiles of the block rows
// ([chunk][mr], mr <= MR), X into zero-padded NR-column strips of the block
// columns ([chunk][NR]). A tile of a block is then one microkernel call over
// two contiguous streams, accumulating into the output across chunks. Stored
// blocks all cost the same, so an even split over blocks is balanced whatever
// the row structure. The bias gradient (dY's column sums) is summed chunk by chunk
// right after the packing read those rows (in L2), each thread over its own block
// rows.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/column_sums.h"
#include "common/grouped_product.h"
#include "common/microkernel.h"
#include "common/parallel.h"

namespace sparsekern {
namespace bsr {

// Tokens per packed chunk: a thread's packed dYᵀ and X of one chunk stay in L2 while its blocks
// read them (1.5 MiB at 4096 x 4096, block 32). On a Xeon (2 MiB L2), 2048 x 4096 x 4096, dW ran
// 9-25 % faster than in chunks of 256 (whose packs fell to L3) at density 0.05-0.5, blocks 16
// and 32, and on the AVX2 path; 32 and 128 were slower or alike.
constexpr int64_t kTokenChunk = 64;
constexpr int64_t kRowsPerPass = 16;  // tokens per packing pass (rows being read stay in L2)

// dy (M, N) and x (M, K) in the compute type; dvalues (nnz, br, bc) and dbias (N, or null: no
// bias gradient) in the storage type.
template <typename S, typename C, int NR>
void sampled_product(const C* dy, const C* x, int64_t M, int64_t N, int64_t K, int64_t br, int64_t bc,
                     const int64_t* rows, const int64_t* cols, int64_t nnz, S* dvalues, S* dbias) {
  const int64_t CB = K / bc, nsub = (bc + NR - 1) / NR, block = br * bc;
  if (dbias && (nnz == 0 || M == 0)) common::column_sums(dy, M, N, dbias);
  if (nnz == 0) return;
  at::Tensor acc_buf;
  C* acc = reinterpret_cast<C*>(dvalues);
  if (!std::is_same<S, C>::value) {  // half types accumulate in fp32
    acc_buf = at::empty({nnz * block}, common::scalar_type_of<C>());
    acc = acc_buf.data_ptr<C>();
  }
  if (M == 0) std::fill(acc, acc + nnz * block, C(0));

  const auto tiles = common::row_tiles(br, common::packed_tile_rows<C, NR>());
  std::vector<common::Microkernel<C>> kernels;
  for (const auto& tile : tiles) kernels.push_back(common::packed_tile_kernel<C, NR>(tile.second));
  const int64_t chunk = std::min(kTokenChunk, M), zero = 0;
  // One parallel region for the whole call: each thread takes a contiguous range
  // of stored blocks and packs, chunk by chunk, only the block rows and columns
  // those blocks touch into its own buffers. Threads never wait for each other
  // (on a loaded machine every extra region costs a scheduling delay), at the
  // price of packing a block column twice when both threads' blocks use it.
  const int64_t parts = std::min(nnz, common::threads_for(nnz * block * M));
  // The bias gradient: part p sums the block rows [own[p], own[p + 1]): its own rows, a row
  // it shares with the part before left to that one, and the first and last parts also the
  // rows before and after every stored block.
  using A = common::SumType<C>;
  std::vector<A> bias_total(dbias ? N : 0);
  std::vector<int64_t> own(parts + 1, N / br);
  own[0] = 0;
  for (int64_t p = 1; p < parts; ++p) own[p] = std::max(own[p - 1], rows[nnz * p / parts - 1] + 1);
  auto run_part = [&](int64_t part) {
    const int64_t b0 = nnz * part / parts, b1 = nnz * (part + 1) / parts;
    if (b0 >= b1 || M == 0) return;
    const int64_t bias_c0 = own[part] * br, bias_n = (own[part + 1] - own[part]) * br;
    std::vector<A> bias_chunk(dbias ? bias_n : 0);
    int64_t r_lo = rows[b0], r_hi = rows[b0];
    std::vector<int64_t> slot(CB, -1), used;  // packed position of each block column used here
    for (int64_t b = b0; b < b1; ++b) {
      r_lo = std::min(r_lo, rows[b]), r_hi = std::max(r_hi, rows[b]);
      if (slot[cols[b]] < 0) slot[cols[b]] = int64_t(used.size()), used.push_back(cols[b]);
    }
    // Block row r's tile (o, mr) at ((r - r_lo) * br + o) * chunk, [chunk][mr];
    // used column u's sub-tile s at dy_size + (u * nsub + s) * chunk * NR, [chunk][NR].
    const int64_t dy_size = (r_hi - r_lo + 1) * br * chunk;
    at::Tensor buf = at::empty({dy_size + int64_t(used.size()) * nsub * NR * chunk}, common::scalar_type_of<C>());
    C* pdy = buf.data_ptr<C>();
    C* px = pdy + dy_size;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t len = std::min(chunk, M - m0);
      // Passes of kRowsPerPass tokens keep the rows being read in L1/L2.
      for (int64_t t0 = 0; t0 < len; t0 += kRowsPerPass) {
        const int64_t t1 = std::min(len, t0 + kRowsPerPass);
        for (int64_t r = r_lo; r <= r_hi; ++r) {
          for (const auto& tile : tiles) {
            C* dst = pdy + ((r - r_lo) * br + tile.first) * chunk;
            const C* src = dy + m0 * N + r * br + tile.first;
            common::copy_row_tile(dst, src, N, t0, t1, tile.second);
          }
        }
        for (size_t u = 0; u < used.size(); ++u) {
          for (int64_t s = 0; s < nsub; ++s) {
            C* dst = px + (int64_t(u) * nsub + s) * chunk * NR;
            const C* src = x + m0 * K + used[u] * bc + s * NR;
            const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
#ifdef SPARSEKERN_X86
            if constexpr (std::is_same<C, float>::value) {
              if (ncols == NR && common::simd_copies()) {
                common::copy_strip_rows_avx512<NR>(dst, src, K, t0, t1);
                continue;
              }
            }
#endif
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
      if (dbias && bias_n > 0) {
        common::sum_rows(dy + m0 * N + bias_c0, N, len, bias_n, bias_chunk.data(), bias_total.data() + bias_c0);
      }
      const bool add = m0 > 0;
      for (int64_t b = b0; b < b1; ++b) {
        C* ob = acc + b * block;
        for (int64_t s = 0; s < nsub; ++s) {
          const int64_t ncols = std::min<int64_t>(NR, bc - s * NR);
          const C* bs = px + (slot[cols[b]] * nsub + s) * chunk * NR;
          for (size_t t = 0; t < tiles.size(); ++t) {
            const int64_t o = tiles[t].first;
            const int mr = tiles[t].second;
            const C* as = pdy + ((rows[b] - r_lo) * br + o) * chunk;
            C* out = ob + o * bc + s * NR;
            if (ncols == NR) {
              kernels[t](as, mr, &zero, 1, len, bs, NR, out, bc, add ? common::Store::kAdd : common::Store::kWrite,
                         nullptr);
            } else {
              alignas(64) C tmp[common::kMaxNarrowRows * NR];
              kernels[t](as, mr, &zero, 1, len, bs, NR, tmp, NR, common::Store::kWrite, nullptr);
              for (int i = 0; i < mr; ++i) {
                for (int64_t n = 0; n < ncols; ++n) out[i * bc + n] = (add ? out[i * bc + n] : C(0)) + tmp[i * NR + n];
              }
            }
          }
        }
      }
    }
  };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) run_part(p);
  });
  if (dbias && M > 0) {
    for (int64_t c = 0; c < N; ++c) dbias[c] = S(bias_total[c]);
  }
  if (!std::is_same<S, C>::value) {
    common::parallel_for_work(nnz * block, nnz * block, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dvalues[i] = S(acc[i]);
    });
  }
}

}  // namespace bsr
}  // namespace sparsekern
