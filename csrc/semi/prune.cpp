// 2:4 prune + compress on CPU (fp32 and bf16), the dynamic mode's per-step kernel: the dispatcher op
// sparsekern::semi_prune_compress_cpu (fake in sparsekern/kernels/semi/cpu.py).
//
// One pass over the dense weight: choose the kept entries of each group of 4
// (row-wise) or 4x4 tile (transposable), and write W's compression and, for
// transposable masks, Wᵀ's, in the format of sparsekern.formats.semi.
// The choice is exactly sparsekern.formats.semi_prune.prune_2to4's: row-wise keeps the two
// largest |w| (ties to the lower index); transposable scores the 90 patterns of
// transposable_patterns() in their order and keeps the first best one. At 4096²
// (transposable, W and Wᵀ) the plain torch version costs 1.6 dense forwards
// (2048 tokens), this one about 0.1 (docs/semi.md).
#include "semi/prune.h"

#include "common/huge_page_output.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

// Compiled for AVX2 like semi.cpp (the backend runs only where the CPU has it): the
// pattern loop over a batch of tiles vectorises 8 wide.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparsekern {
namespace semi {

namespace {

// The 6 ways to keep 2 of 4, in itertools.product((0, 1), repeat=4) order: (0,0,1,1), (0,1,0,1), ...
constexpr int kPairs[6][2] = {{2, 3}, {1, 3}, {1, 2}, {0, 3}, {0, 2}, {0, 1}};

struct Pattern {
  int row_pair[4];     // kPairs index kept by each tile row
  int col_rows[4][2];  // the two tile rows that keep each tile column, ascending
};

// The 90 transposable patterns in sparsekern.formats.semi_prune.transposable_patterns() order:
// rows as itertools.product(pairs, repeat=4) (row 0 slowest), two ones per column.
const std::vector<Pattern>& patterns() {
  static const std::vector<Pattern> table = [] {
    std::vector<Pattern> out;
    for (int i = 0; i < 6 * 6 * 6 * 6; ++i) {
      const int p[4] = {i / 216, i / 36 % 6, i / 6 % 6, i % 6};
      Pattern pat{};
      int count[4] = {0, 0, 0, 0};
      for (int r = 0; r < 4; ++r) {
        pat.row_pair[r] = p[r];
        for (int q = 0; q < 2; ++q) {
          const int c = kPairs[p[r]][q];
          if (count[c] < 2) pat.col_rows[c][count[c]] = r;
          ++count[c];
        }
      }
      if (count[0] == 2 && count[1] == 2 && count[2] == 2 && count[3] == 2) out.push_back(pat);
    }
    return out;
  }();
  return table;
}

// Tiles scored together: the pattern loop runs over a batch (vectorised by the compiler).
constexpr int64_t kBatch = 64;

// Best pattern of each tile (tr, g0 .. g0 + count) of the (rows 4 tr .. 4 tr + 3) strip.
// T: float or bf16, scored on its exact float value (the same choices as on the widened weight).
template <typename T>
void best_patterns(const T* w, int64_t K, int64_t tr, int64_t g0, int64_t count, int32_t* best) {
  float pair_sum[4][6][kBatch];
  for (int r = 0; r < 4; ++r)  // the lanes past count of the last 8 (scored, unused) hold zeros
    for (int p = 0; p < 6; ++p) std::fill(pair_sum[r][p] + count, pair_sum[r][p] + (count + 7) / 8 * 8, 0.f);
  for (int64_t t = 0; t < count; ++t) {
    for (int r = 0; r < 4; ++r) {
      const T* a = w + (4 * tr + r) * K + 4 * (g0 + t);
      float m[4];
      for (int c = 0; c < 4; ++c) m[c] = std::fabs(float(a[c]));
      for (int p = 0; p < 6; ++p) pair_sum[r][p][t] = m[kPairs[p][0]] + m[kPairs[p][1]];
    }
  }
  // Eight tiles at a time against all patterns, their best score and pattern in registers (the
  // pattern-outer loop kept both in memory: the whole transposable prune took 58-60 ms at
  // 4096 x 4096 fp32 on a Zen 4 instead of 34).
  const auto& table = patterns();
  const int32_t n_patterns = int32_t(table.size());
  for (int64_t t0 = 0; t0 < count; t0 += 8) {
    __m256 score = _mm256_set1_ps(-1.f);
    __m256i choice = _mm256_setzero_si256();
    for (int32_t i = 0; i < n_patterns; ++i) {
      const int* rp = table[i].row_pair;
      const __m256 s = _mm256_add_ps(
          _mm256_add_ps(_mm256_loadu_ps(pair_sum[0][rp[0]] + t0), _mm256_loadu_ps(pair_sum[1][rp[1]] + t0)),
          _mm256_add_ps(_mm256_loadu_ps(pair_sum[2][rp[2]] + t0), _mm256_loadu_ps(pair_sum[3][rp[3]] + t0)));
      const __m256 better = _mm256_cmp_ps(s, score, _CMP_GT_OQ);  // strict: the first best wins, as argmax
      score = _mm256_blendv_ps(score, s, better);
      choice = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(choice), _mm256_castsi256_ps(_mm256_set1_epi32(i)), better));
    }
    alignas(32) int32_t chosen[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(chosen), choice);
    for (int64_t t = t0; t < std::min(count, t0 + 8); ++t) best[t] = chosen[t - t0];
  }
}

// Row-wise: the kept positions of a group as a 4-bit code (ranks 0 and 1; ties to the lower index).
template <typename T>
inline int top2_code(const T* a) {
  const float m0 = std::fabs(float(a[0])), m1 = std::fabs(float(a[1]));
  const float m2 = std::fabs(float(a[2])), m3 = std::fabs(float(a[3]));
  const int r0 = (m1 > m0) + (m2 > m0) + (m3 > m0), r1 = (m0 >= m1) + (m2 > m1) + (m3 > m1);
  const int r2 = (m0 >= m2) + (m1 >= m2) + (m3 > m2), r3 = (m0 >= m3) + (m1 >= m3) + (m2 >= m3);
  return (r0 < 2) | (r1 < 2) << 1 | (r2 < 2) << 2 | (r3 < 2) << 3;
}

// 4-bit code with two bits set -> its positions, ascending.
constexpr int kLow[16] = {0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 2, 0, 0, 0};
constexpr int kHigh[16] = {0, 0, 0, 1, 0, 2, 2, 0, 0, 3, 3, 0, 3, 0, 0, 0};

// Two kept entries (group `group` of a compressed row): values, and their nibble in the
// packed indices (low nibble for even groups, assigned; high for odd ones, or-ed in:
// callers visit a row's groups in increasing order, so no zero-fill is needed).
template <typename T>
inline void put_group(T* values, uint8_t* indices, int64_t group, T v_lo, int lo, T v_hi, int hi) {
  values[2 * group] = v_lo;
  values[2 * group + 1] = v_hi;
  const uint8_t nibble = uint8_t(lo | hi << 2);
  if (group & 1) {
    indices[group >> 1] |= uint8_t(nibble << 4);
  } else {
    indices[group >> 1] = nibble;
  }
}

using Compressed = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

// dense (N, K) of T -> values (N, K/2), indices uint8 (N, ceil(K/8)) and, if transposable,
// values_t (K, N/2), indices_t (K, ceil(N/8)): Wᵀ's compression (else None).
template <typename T>
Compressed prune_compress_as(const at::Tensor& dense, bool transposable) {
  const int64_t N = dense.size(0), K = dense.size(1);
  const T* w = dense.data_ptr<T>();
  at::Tensor values = common::empty_output({N, K / 2}, dense.options());
  at::Tensor indices = at::empty({N, (K + 7) / 8}, dense.options().dtype(at::kByte));
  T* V = values.data_ptr<T>();
  uint8_t* I = indices.data_ptr<uint8_t>();
  const int64_t ib = indices.size(1), G = K / 4;
  if (!transposable) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t g = 0; g < G; ++g) {
          const T* a = w + n * K + 4 * g;
          const int code = top2_code(a), lo = kLow[code], hi = kHigh[code];
          put_group(V + n * (K / 2), I + n * ib, g, a[lo], lo, a[hi], hi);
        }
      }
    });
    return {values, indices, std::nullopt, std::nullopt};
  }
  at::Tensor values_t = common::empty_output({K, N / 2}, dense.options());
  at::Tensor indices_t = at::empty({K, (N + 7) / 8}, dense.options().dtype(at::kByte));
  T* VT = values_t.data_ptr<T>();
  uint8_t* IT = indices_t.data_ptr<uint8_t>();
  const int64_t ibt = indices_t.size(1), TR = N / 4;
  const auto& table = patterns();
  // Wᵀ's rows take two entries per tile row and four per byte: a thread owns whole bytes
  // (an even number of tile rows) and, mostly, whole cache lines (128 tile rows).
  at::parallel_for(0, (TR + 127) / 128, 1, [&](int64_t c0, int64_t c1) {
    int32_t best[kBatch];
    for (int64_t tr = c0 * 128; tr < std::min(TR, c1 * 128); ++tr) {
      for (int64_t g0 = 0; g0 < G; g0 += kBatch) {
        const int64_t count = std::min(kBatch, G - g0);
        best_patterns(w, K, tr, g0, count, best);
        for (int64_t t = 0; t < count; ++t) {
          const int64_t g = g0 + t;
          const Pattern& pat = table[best[t]];
          for (int r = 0; r < 4; ++r) {
            const int64_t n = 4 * tr + r;
            const int lo = kPairs[pat.row_pair[r]][0], hi = kPairs[pat.row_pair[r]][1];
            put_group(V + n * (K / 2), I + n * ib, g, w[n * K + 4 * g + lo], lo, w[n * K + 4 * g + hi], hi);
          }
          for (int c = 0; c < 4; ++c) {
            const int64_t k = 4 * g + c;
            const int lo = pat.col_rows[c][0], hi = pat.col_rows[c][1];
            put_group(VT + k * (N / 2), IT + k * ibt, tr, w[(4 * tr + lo) * K + k], lo, w[(4 * tr + hi) * K + k], hi);
          }
        }
      }
    }
  });
  return {values, indices, values_t, indices_t};
}

Compressed prune_compress(const at::Tensor& dense, bool transposable) {
  TORCH_CHECK(dense.device().is_cpu() && dense.dim() == 2 && dense.is_contiguous() &&
                  (dense.scalar_type() == at::kFloat || dense.scalar_type() == at::kBFloat16),
              "semi prune_compress: dense must be a contiguous 2-D float32 or bfloat16 CPU tensor, got ",
              dense.scalar_type(), " of shape ", dense.sizes());
  TORCH_CHECK(dense.size(1) % 4 == 0 && (!transposable || dense.size(0) % 4 == 0), "semi prune_compress: shape ",
              dense.sizes(), transposable ? " needs both dims multiples of 4" : " needs the last dim a multiple of 4");
  return dense.scalar_type() == at::kFloat ? prune_compress_as<float>(dense, transposable)
                                           : prune_compress_as<at::BFloat16>(dense, transposable);
}

}  // namespace

at::Tensor transposable_pattern_table() {
  const auto& table = patterns();
  at::Tensor out = at::zeros({int64_t(table.size()), 16}, at::kBool);
  bool* p = out.data_ptr<bool>();
  for (size_t i = 0; i < table.size(); ++i) {
    for (int r = 0; r < 4; ++r) {
      p[i * 16 + r * 4 + kPairs[table[i].row_pair[r]][0]] = true;
      p[i * 16 + r * 4 + kPairs[table[i].row_pair[r]][1]] = true;
    }
  }
  return out;
}

}  // namespace semi
}  // namespace sparsekern

#pragma GCC pop_options

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.semi.cpu");
  m.def("semi_prune_compress_cpu(Tensor dense, bool transposable) -> (Tensor, Tensor, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("semi_prune_compress_cpu", &sparsekern::semi::prune_compress);
}
