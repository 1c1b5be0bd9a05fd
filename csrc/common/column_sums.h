// Column sums of a row-major matrix: the bias gradients (dY summed over tokens or pixels).
// Where a product packs dY anyway the sum rides on that pass (sum_rows on each chunk in L2, or
// the bf16 packing's own loads: pair_words.h); column_sums is the pass of its own for the rest.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/parallel.h"

namespace sparsekern {
namespace common {

// fp32 sums for fp32 and half types, fp64 for fp64.
template <typename C>
using SumType = std::conditional_t<std::is_same<C, double>::value, double, float>;

// The share of len rows of src (n columns, rows ld elements apart): summed per column in A,
// first over the rows into `chunk` and then into `total` (no long running sum of small terms).
template <typename C, typename A>
void sum_rows(const C* __restrict src, int64_t ld, int64_t len, int64_t n, A* __restrict chunk,
              A* __restrict total) {
  std::fill(chunk, chunk + n, A(0));
  int64_t m = 0;
  for (; m + 4 <= len; m += 4, src += 4 * ld) {  // four rows a pass: a quarter of the loads and stores of chunk
    for (int64_t c = 0; c < n; ++c) chunk[c] += (A(src[c]) + A(src[ld + c])) + (A(src[2 * ld + c]) + A(src[3 * ld + c]));
  }
  for (; m < len; ++m, src += ld) {
    for (int64_t c = 0; c < n; ++c) chunk[c] += A(src[c]);
  }
  for (int64_t c = 0; c < n; ++c) total[c] += chunk[c];
}

// out[c] = sum over rows m < M of src[m * N + c], in SumType<C>, rounded once to S: threads take
// ranges of kColumns columns (a row's share is then a few contiguous lines) and sum kRows rows
// at a time.
template <typename C, typename S>
void column_sums(const C* src, int64_t M, int64_t N, S* out) {
  using A = SumType<C>;
  constexpr int64_t kColumns = 512, kRows = 64;
  parallel_for_work((N + kColumns - 1) / kColumns, M * N, [&](int64_t j0, int64_t j1) {
    std::vector<A> chunk(kColumns), total(kColumns);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c0 = j * kColumns, n = std::min(kColumns, N - c0);
      std::fill(total.begin(), total.end(), A(0));
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        sum_rows(src + m0 * N + c0, N, std::min(kRows, M - m0), n, chunk.data(), total.data());
      }
      for (int64_t c = 0; c < n; ++c) out[c0 + c] = S(total[c]);
    }
  });
}

}  // namespace common
}  // namespace sparsekern
