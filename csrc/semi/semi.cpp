// 2:4 semi-structured linear products on CPU (fp32 on AVX2 + FMA or AVX-512F, bf16 on AVX512-BF16), module
// sparsekern._C_semi.
// Dispatcher ops (fakes in sparsekern/kernels/semi/cpu.py):
//
// sparsekern::semi_plan_cpu         per-structure weight stream layout (panel offsets, value positions)
// sparsekern::semi_forward_cpu      y = x Wᵀ with W given by its values and its plan
// sparsekern::semi_grad_weight_cpu  dvalues = (dyᵀ x) at W's kept positions
// and, in prune.cpp and dst_update.cpp, prune+compress and the 2:4 DST update kernels.
//
// W (N, K) arrives compressed: values (N, K/2) and packed 2-bit in-group positions
// (N, ceil(K/8)) uint8, four kept entries per byte, lowest bits first.
//
// The activations are packed once per call into *panels* P[b][k][0..MR): MR = 96
// consecutive tokens of column k, contiguous (a blocked transpose, zero-padded).
// Then every kept weight w[n, j] at column k is one broadcast and 12 FMAs of a
// 96-wide row of the panel: the 2-bit index only picks *which* panel row to load,
// so the microkernel is a dense register-blocked axpy over the kept half of K.
// Panels are cut into kc columns so the rows in use stay in L1, and the weight is
// repacked per call into the order the tasks read it, its indices decoded to panel
// offsets. The loop is bound by L1 load bandwidth (one 32-byte panel load per FMA),
// not by the FMAs: that is the price of the data-dependent rows. With AVX-512 (picked at
// run time) the same loop runs on zmm registers, two weight rows at a time.
//
//   forward  y = x Wᵀ      acc (96 tokens of row n) in 12 ymm, panel rows gathered by index
//   dX       dy W          the forward on Wᵀ's compression (transposable W), Wᵀ's values
//                          gathered from W's while packing; row-wise W: the same on a ragged
//                          plan of W's columns (plan_columns)
//   dW       (dyᵀ x)[kept] 8 kept entries of row n at a time: 8 ymm dot-product accumulators
//                          over 4 x 96 tokens, reduced with one hadd tree
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "common/amx.h"
#include "common/huge_page_output.h"
#include "semi/prune.h"
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

// bf16 (forward and transposable dX; on CPUs with AVX512-BF16): each group of four columns
// keeps one *pair* of entries, and VDPBF16PS multiplies a pair of bf16 by a pair, so the
// activations are packed as *pair panels* Q[b][g][c][0..MR): for each of the six position
// pairs c of group g, 96 tokens of (x[4g + i], x[4g + j]) as 32-bit lanes. A kept pair is then
// one 32-bit broadcast and 6 dot products against the pair row its positions select: half
// the instructions of the fp32 loop per multiply-add, fp32 accumulators, one rounding to bf16.
// dW in bf16 packs dy and x as pairs of consecutive tokens and sums dot products over them.
//
// Everything up to the op registration is compiled for AVX2 + FMA (lambdas included); the
// Python side calls in only after checking the CPU supports them, and importing runs none of it.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int64_t MR = 96;       // tokens per panel block = 12 ymm accumulators
constexpr int64_t NB_MAX = 128;  // forward: most weight rows per task

constexpr int64_t PAIRS = 6;     // bf16: position pairs (i < j) of a group of four
constexpr int kPairFirst[PAIRS] = {0, 0, 0, 1, 1, 2}, kPairSecond[PAIRS] = {1, 2, 3, 2, 3, 3};

constexpr int64_t KC_DW = 16;    // dW: 8 kept entries per row per step
constexpr int64_t MSUPER = 4;    // dW: panel blocks accumulated in registers before a reduction

// Whether n floats are all finite: x - x is 0 for a number and NaN for an inf or NaN.
inline bool all_finite(const float* a, int64_t n) {
  __m256 bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(a + k);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }
  bool tail = false;
  for (; k < n; ++k) tail |= !std::isfinite(a[k]);
  return !tail && _mm256_movemask_ps(bad) == 0;
}

// P[b][k][i] = src[b*MR + i][k] (0 past the last row). src (M, K) row-major. With `nonfinite`
// (M entries), also marks the rows holding an inf or NaN, on the chunk just read (still in L1).
torch::Tensor pack_panels(const torch::Tensor& src, uint8_t* nonfinite = nullptr) {
  const int64_t M = src.size(0), K = src.size(1), nbm = (M + MR - 1) / MR;
  auto out = sparsekern::common::empty_output({nbm, K, MR}, src.options());
  const float* s = src.data_ptr<float>();
  float* p = out.data_ptr<float>();
  at::parallel_for(0, nbm, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* pb = p + b * K * MR;
      const int64_t rows = std::min(MR, M - b * MR);
      for (int64_t k0 = 0; k0 < K; k0 += 64) {
        const int64_t k1 = std::min(K, k0 + 64);
        for (int64_t i = 0; i < MR; ++i) {
          if (i < rows) {
            const float* row = s + (b * MR + i) * K;
            for (int64_t k = k0; k < k1; ++k) pb[k * MR + i] = row[k];
            if (nonfinite && !all_finite(row + k0, k1 - k0)) nonfinite[b * MR + i] = 1;
          } else {
            for (int64_t k = k0; k < k1; ++k) pb[k * MR + i] = 0.f;
          }
        }
      }
    }
  });
  return out;
}

// Where kept entry j of weight row n sits in the weight stream of forward(): tasks of nb rows,
// each cut into kc/2-entry blocks stored row after row.
inline int64_t stream_index(int64_t n, int64_t j, int64_t N, int64_t half, int64_t nb, int64_t kc) {
  const int64_t n0 = n / nb * nb, rows = std::min(nb, N - n0), j0 = j / (kc / 2) * (kc / 2);
  return n0 * half + rows * j0 + (n - n0) * std::min(kc / 2, half - j0) + (j - j0);
}

// Output row y[m, :] for an activation row holding an inf or NaN, as the dense product with W's
// zeros gives it: x * 0 is NaN at every dropped position, which the sparse loop never visits.
// Every backend then returns the same IEEE result; finite rows never come here.
void nonfinite_row(const float* xm, int64_t K, const float* PV, const uint16_t* PO, int64_t N, int64_t nb,
                   int64_t kc, float* ym) {
  const int64_t half = K / 2;
  std::vector<int64_t> bad;
  for (int64_t k = 0; k < K; ++k)
    if (!std::isfinite(xm[k])) bad.push_back(k);
  for (int64_t n = 0; n < N; ++n) {
    const auto column = [&](int64_t j, int64_t i) {
      return 2 * (j / (kc / 2) * (kc / 2)) + PO[i] / MR;  // panel offset back to W's column
    };
    float acc = 0.f;
    for (int64_t j = 0; j < half; ++j) {
      const int64_t i = stream_index(n, j, N, half, nb, kc);
      acc += xm[column(j, i)] * PV[i];
    }
    for (int64_t k : bad) {
      const int64_t j = 2 * (k / 4), i0 = stream_index(n, j, N, half, nb, kc), i1 = stream_index(n, j + 1, N, half, nb, kc);
      if (column(j, i0) != k && column(j + 1, i1) != k) acc += xm[k] * 0.f;
    }
    ym[n] = acc;
  }
}

// Column of kept entry j of a row (4 * its group + its 2-bit position).
inline int64_t kept_column(const uint8_t* idx, int64_t j) {
  return 4 * (j >> 1) + ((idx[j >> 2] >> (2 * (j & 3))) & 3);
}

// The index nibble of a row's group g: the 2-bit positions of its kept entries 2g (bits 0-1) and
// 2g + 1 (bits 2-3).
inline int group_nibble(const uint8_t* idx, int64_t g) { return (idx[g >> 1] >> (4 * (g & 1))) & 15; }

// acc (12 ymm, 96 tokens of output row n) += sum over e < count of v[e] * panel[off[e] ...].
inline void fwd_row(float* acc_mem, const float* panel, const float* v, const uint16_t* off, int64_t count) {
  __m256 a0 = _mm256_loadu_ps(acc_mem + 0), a1 = _mm256_loadu_ps(acc_mem + 8);
  __m256 a2 = _mm256_loadu_ps(acc_mem + 16), a3 = _mm256_loadu_ps(acc_mem + 24);
  __m256 a4 = _mm256_loadu_ps(acc_mem + 32), a5 = _mm256_loadu_ps(acc_mem + 40);
  __m256 a6 = _mm256_loadu_ps(acc_mem + 48), a7 = _mm256_loadu_ps(acc_mem + 56);
  __m256 a8 = _mm256_loadu_ps(acc_mem + 64), a9 = _mm256_loadu_ps(acc_mem + 72);
  __m256 a10 = _mm256_loadu_ps(acc_mem + 80), a11 = _mm256_loadu_ps(acc_mem + 88);
  for (int64_t e = 0; e < count; ++e) {
    const __m256 w = _mm256_broadcast_ss(v + e);
    const float* x = panel + off[e];
    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 0), a0);
    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8), a1);
    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 16), a2);
    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 24), a3);
    a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 32), a4);
    a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 40), a5);
    a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 48), a6);
    a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 56), a7);
    a8 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 64), a8);
    a9 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 72), a9);
    a10 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 80), a10);
    a11 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 88), a11);
  }
  _mm256_storeu_ps(acc_mem + 0, a0); _mm256_storeu_ps(acc_mem + 8, a1);
  _mm256_storeu_ps(acc_mem + 16, a2); _mm256_storeu_ps(acc_mem + 24, a3);
  _mm256_storeu_ps(acc_mem + 32, a4); _mm256_storeu_ps(acc_mem + 40, a5);
  _mm256_storeu_ps(acc_mem + 48, a6); _mm256_storeu_ps(acc_mem + 56, a7);
  _mm256_storeu_ps(acc_mem + 64, a8); _mm256_storeu_ps(acc_mem + 72, a9);
  _mm256_storeu_ps(acc_mem + 80, a10); _mm256_storeu_ps(acc_mem + 88, a11);
}

// The same with 512-bit registers (6 zmm = 96 tokens): half the load and FMA instructions,
// which is what limits the loop on cores (e.g. AMD Zen 4) that issue both widths at one
// rate. Chosen at run time when the CPU has AVX-512F.

// a[0..6) (96 tokens) += sum over e in [e0, e1) of v[e] * panel[off[e] ...].
__attribute__((target("avx512f"), always_inline)) inline void zmm_row_steps(__m512* a, const float* panel,
                                                                            const float* v, const uint16_t* off,
                                                                            int64_t e0, int64_t e1) {
  for (int64_t e = e0; e < e1; ++e) {
    const __m512 w = _mm512_set1_ps(v[e]);
    const float* x = panel + off[e];
#pragma GCC unroll 6
    for (int t = 0; t < 6; ++t) a[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * t), a[t]);
  }
}

__attribute__((target("avx512f"))) void fwd_row_avx512(float* acc_mem, const float* panel, const float* v,
                                                      const uint16_t* off, int64_t count) {
  __m512 a[6];
#pragma GCC unroll 6
  for (int t = 0; t < 6; ++t) a[t] = _mm512_loadu_ps(acc_mem + 16 * t);
  zmm_row_steps(a, panel, v, off, 0, count);
#pragma GCC unroll 6
  for (int t = 0; t < 6; ++t) _mm512_storeu_ps(acc_mem + 16 * t, a[t]);
}

// Two weight rows at once (12 zmm accumulators): more independent loads in flight. The second
// row's count_b entries follow the first's count (a ragged plan's rows differ: the longer one
// finishes alone, its partner's accumulators idle).
__attribute__((target("avx512f"))) void fwd_row2_avx512(float* acc_mem, const float* panel, const float* v,
                                                       const uint16_t* off, int64_t count, int64_t count_b) {
  const float* vb = v + count;
  const uint16_t* ob = off + count;
  __m512 a[6], b[6];
#pragma GCC unroll 6
  for (int t = 0; t < 6; ++t) a[t] = _mm512_loadu_ps(acc_mem + 16 * t), b[t] = _mm512_loadu_ps(acc_mem + MR + 16 * t);
  const int64_t both = std::min(count, count_b);
  for (int64_t e = 0; e < both; ++e) {
    const __m512 w = _mm512_set1_ps(v[e]), u = _mm512_set1_ps(vb[e]);
    const float* x = panel + off[e];
    const float* y = panel + ob[e];
#pragma GCC unroll 6
    for (int t = 0; t < 6; ++t) {
      a[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * t), a[t]);
      b[t] = _mm512_fmadd_ps(u, _mm512_loadu_ps(y + 16 * t), b[t]);
    }
  }
  zmm_row_steps(a, panel, v, off, both, count);
  zmm_row_steps(b, panel, vb, ob, both, count_b);
#pragma GCC unroll 6
  for (int t = 0; t < 6; ++t) _mm512_storeu_ps(acc_mem + 16 * t, a[t]), _mm512_storeu_ps(acc_mem + MR + 16 * t, b[t]);
}

using RowKernel = void (*)(float*, const float*, const float*, const uint16_t*, int64_t);

bool wide_rows(bool allow_avx512) { return allow_avx512 && __builtin_cpu_supports("avx512f"); }

RowKernel row_kernel(bool allow_avx512) { return wide_rows(allow_avx512) ? fwd_row_avx512 : fwd_row; }

// The weight stream, in the order the forward reads it: chunk (n-block, kc-block) holds its
// rows' kept entries back to back. Chunk of rows [n0, n0+rows) and kept entries [j0, j0+cnt)
// starts at n0*half + rows*j0; entry (r, e) sits at + r*cnt + e.
//
// plan() builds, once per structure (the caller caches it), each stream slot's panel offset
// (column within its kc block x MR, decoded from the 2-bit index) and, when values are read
// through perm (entry (n, j) = values[perm[n, j]], which is how dX reads Wᵀ's values out of
// W's with no transposed copy), the flat position of each slot's value (else empty: values
// row-major). Per call, only the values are gathered into the stream (a sequential pass).
//
// With `pairs` (the bf16 kernels) a slot holds a group's kept pair: offsets (rows, half/2) give
// the pair row (group within the kc block x 6 + the pair of positions) x MR, in 32-bit lanes.
bool blocking_fits(int64_t nb, int64_t kc, bool pairs) {
  const int64_t panel_rows = pairs ? kc / 4 * PAIRS : kc;
  return kc % 4 == 0 && kc >= 4 && panel_rows * MR < 65536 && nb >= 1 && nb <= NB_MAX;
}

std::tuple<torch::Tensor, torch::Tensor> plan(torch::Tensor indices, c10::optional<torch::Tensor> perm,
                                              int64_t half, int64_t nb, int64_t kc, bool pairs) {
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == torch::kUInt8 &&
                  indices.size(1) == (2 * half + 7) / 8,
              "semi: indices must be contiguous uint8 (rows, ceil(cols/8))");
  TORCH_CHECK(blocking_fits(nb, kc, pairs) && half % 2 == 0, "semi: bad blocking");
  const int64_t N = indices.size(0), ib = indices.size(1);
  const int32_t* P = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == torch::kInt32 && perm->is_contiguous() && perm->numel() == N * half,
                "semi: perm must be contiguous int32 with rows * cols/2 entries");
    P = perm->data_ptr<int32_t>();
    // perm indexes W's values (as many as Wᵀ's): refuse it here rather than read outside them later.
    for (int64_t i = 0; i < N * half; ++i)
      TORCH_CHECK_VALUE(P[i] >= 0 && P[i] < N * half, "semi: transpose map entry ", i, " = ", P[i],
                        " is outside the ", N * half, " values (indices_t is not the transpose of indices?)");
  }
  auto offsets = torch::empty({N, pairs ? half / 2 : half}, torch::TensorOptions().dtype(torch::kInt16));
  std::atomic<int64_t> unordered{-1};  // a row whose group holds one position twice (no pair row)
  auto source = torch::empty({P ? N : 0, half}, torch::TensorOptions().dtype(torch::kInt32));
  const uint8_t* I = indices.data_ptr<uint8_t>();
  uint16_t* PO = reinterpret_cast<uint16_t*>(offsets.data_ptr<int16_t>());
  int32_t* PS = source.data_ptr<int32_t>();
  // A group's index nibble as the index of its pair of kept positions in kPairFirst / kPairSecond,
  // or -1 where they are not two positions in increasing order. j0 and cnt are even (half and
  // kc / 2 are), so a chunk's entries start at a group.
  static constexpr auto kNibblePair = [] {
    std::array<int8_t, 16> table{};
    table.fill(-1);
    for (int p = 0; p < PAIRS; ++p) table[kPairFirst[p] | kPairSecond[p] << 2] = int8_t(p);
    return table;
  }();
  at::parallel_for(0, (N + nb - 1) / nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t n0 = t0 * nb; n0 < std::min(N, t1 * nb); n0 += nb) {
      const int64_t rows = std::min(nb, N - n0);
      for (int64_t j0 = 0; j0 < half; j0 += kc / 2) {
        const int64_t cnt = std::min(kc / 2, half - j0), start = n0 * half + rows * j0;
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* idx = I + (n0 + r) * ib;
          if (P) std::copy_n(P + (n0 + r) * half + j0, cnt, PS + start + r * cnt);
          if (!pairs) {
            uint16_t* po = PO + start + r * cnt;
            for (int64_t e = 0; e < cnt; ++e) po[e] = uint16_t((kept_column(idx, j0 + e) - 2 * j0) * MR);
            continue;
          }
          uint16_t* po = PO + (start + r * cnt) / 2;
          bool bad = false;
          for (int64_t g = 0; g < cnt / 2; ++g) {
            const int pair = kNibblePair[group_nibble(idx, j0 / 2 + g)];
            bad |= pair < 0;
            po[g] = uint16_t((g * PAIRS + (pair < 0 ? 0 : pair)) * MR);
          }
          if (bad) unordered = n0 + r;
        }
      }
    }
  });
  TORCH_CHECK_VALUE(unordered.load() < 0, "semi: row ", unordered.load(), " of indices keeps a position of a group "
                    "twice or out of order (not a compression of an exact 2:4 mask)");
  return {offsets, source};
}

void check_inputs(const torch::Tensor& a, const torch::Tensor& values, const torch::Tensor& indices,
                  int64_t k) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == torch::kFloat32,
              "semi: activations must be contiguous 2-D float32");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.scalar_type() == torch::kFloat32,
              "semi: values must be contiguous 2-D float32");
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == torch::kUInt8,
              "semi: indices must be contiguous 2-D uint8");
  TORCH_CHECK(k % 4 == 0 && values.size(1) * 2 == k && indices.size(0) == values.size(0) &&
                  indices.size(1) == (k + 7) / 8,
              "semi: inconsistent shapes");
}

// PV[i] = V[S[i]] for i < count, never reading outside the `total` values whatever S holds:
// out-of-range entries read V[0] and the call fails (an unsigned compare, free next to the
// gather).
template <typename T>
void gather_stream(const T* V, const int32_t* S, int64_t count, int64_t total, T* PV) {
  std::atomic<bool> outside{false};
  at::parallel_for(0, count, 4096, [&](int64_t i0, int64_t i1) {
    bool bad = false;
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t s = uint32_t(S[i]);
      bad |= s >= uint32_t(total);
      PV[i] = V[s < uint32_t(total) ? s : 0];
    }
    if (bad) outside = true;
  });
  TORCH_CHECK_VALUE(!outside.load(), "semi: source holds entries outside the ", total, " values (make it with plan())");
}

// The weight stream (see plan()): values gathered through `source` where it is given, else
// copied row block by row block.
template <typename T>
void fill_stream(const T* V, const torch::Tensor& source, T* PV, int64_t N, int64_t half, int64_t nb, int64_t kc) {
  if (source.numel()) return gather_stream(V, source.data_ptr<int32_t>(), N * half, N * half, PV);
  at::parallel_for(0, (N + nb - 1) / nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t n0 = t0 * nb; n0 < std::min(N, t1 * nb); n0 += nb) {
      const int64_t rows = std::min(nb, N - n0);
      for (int64_t j0 = 0; j0 < half; j0 += kc / 2) {
        const int64_t cnt = std::min(kc / 2, half - j0), start = n0 * half + rows * j0;
        for (int64_t r = 0; r < rows; ++r) std::copy_n(V + (n0 + r) * half + j0, cnt, PV + start + r * cnt);
      }
    }
  });
}

// Whether every panel offset leaves a whole row of MR lanes inside the panel from its kc block's
// start to the panel's end: offsets not made by plan() are refused instead of read past it.
void check_offsets(const uint16_t* PO, int64_t N, int64_t half, int64_t nb, int64_t kc, bool pairs) {
  const int64_t per = pairs ? 2 : 1;  // kept entries per stream slot
  std::atomic<bool> fit{true};
  at::parallel_for(0, (N + nb - 1) / nb, 1, [&](int64_t t0, int64_t t1) {
    bool ok = true;
    for (int64_t n0 = t0 * nb; n0 < std::min(N, t1 * nb); n0 += nb) {
      const int64_t rows = std::min(nb, N - n0);
      for (int64_t j0 = 0; j0 < half; j0 += kc / 2) {
        const int64_t cnt = std::min(kc / 2, half - j0), start = n0 * half + rows * j0;
        const int64_t columns = 2 * (half - j0), panel_rows = pairs ? columns / 4 * PAIRS : columns;
        const uint16_t limit = uint16_t(std::min<int64_t>(65535, (panel_rows - 1) * MR));
        for (int64_t i = start / per; i < (start + rows * cnt) / per; ++i) ok &= PO[i] <= limit;
      }
    }
    if (!ok) fit = false;
  });
  TORCH_CHECK_VALUE(fit.load(), "semi: offsets point outside the activation panels (make them with plan())");
}

// The forward's tasks: (MR tokens of panel block b, nb weight rows) in m-block-major order, so
// the threads share one activation panel (in L2) and the weight streams through once per
// m-block. Each task sums its rows' MR tokens in fp32 over the panel column blocks (step(tile,
// b, n0, rows, block) adds one, rows MR floats apart in tile) and writes them into Y (M, N)
// transposed, as Out.
template <typename Out, typename Step>
void forward_tasks(int64_t M, int64_t N, int64_t blocks, int64_t nb, Out* Y, Step step) {
  const int64_t nbm = (M + MR - 1) / MR, nbn = (N + nb - 1) / nb;
  at::parallel_for(0, nbm * nbn, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[NB_MAX * MR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nbn, n0 = (t % nbn) * nb, rows = std::min(nb, N - n0);
      std::fill(tile, tile + rows * MR, 0.f);
      for (int64_t block = 0; block < blocks; ++block) step(tile, b, n0, rows, block);
      const int64_t tokens = std::min(MR, M - b * MR);
      for (int64_t i = 0; i < tokens; ++i) {
        Out* out = Y + (b * MR + i) * N + n0;
        for (int64_t r = 0; r < rows; ++r) out[r] = Out(tile[r * MR + i]);
      }
    }
  });
}

// y (M, N) = x (M, K) @ W.T, W (N, K) given by its values and its plan (see plan()).
// Blocking: kc panel columns (kc x 96 x 4 B in L1), nb weight rows per task (their partial
// outputs, nb x 96 floats, stay in L1 across the kc blocks); must match the plan's.
torch::Tensor forward(torch::Tensor x, torch::Tensor values, torch::Tensor offsets, torch::Tensor source,
                      int64_t nb, int64_t kc, bool allow_avx512) {
  const int64_t M = x.size(0), K = x.size(1), N = offsets.size(0), half = K / 2;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && K % 4 == 0,
              "semi: x must be contiguous float32 (M, K), K a multiple of 4");
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == torch::kFloat32 && values.numel() == N * half,
              "semi: values must be contiguous float32 with N * K/2 entries");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == half && offsets.scalar_type() == torch::kInt16 &&
                  source.scalar_type() == torch::kInt32 && (source.numel() == N * half || source.numel() == 0),
              "semi: offsets/source do not match x (make them with plan())");
  auto y = sparsekern::common::empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  TORCH_CHECK(blocking_fits(nb, kc, false), "semi: bad blocking");
  std::vector<uint8_t> nonfinite(M, 0);
  const auto panels = pack_panels(x, nonfinite.data());
  auto stream = sparsekern::common::empty_output({N, half}, x.options());
  const float* V = values.data_ptr<float>();
  float* PV = stream.data_ptr<float>();
  fill_stream(V, source, PV, N, half, nb, kc);
  const float* P = panels.data_ptr<float>();
  const uint16_t* PO = reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>());
  check_offsets(PO, N, half, nb, kc, false);
  float* Y = y.data_ptr<float>();
  const RowKernel kernel = row_kernel(allow_avx512);
  const bool pair_rows = wide_rows(allow_avx512);
  forward_tasks(M, N, (half + kc / 2 - 1) / (kc / 2), nb, Y, [&](float* tile, int64_t b, int64_t n0, int64_t rows,
                                                                  int64_t block) {
    const int64_t j0 = block * (kc / 2);
    const float* panel = P + (b * K + 2 * j0) * MR;
    const int64_t cnt = std::min(kc / 2, half - j0), start = n0 * half + rows * j0;
    int64_t r = 0;
    if (pair_rows)
      for (; r + 1 < rows; r += 2)
        fwd_row2_avx512(tile + r * MR, panel, PV + start + r * cnt, PO + start + r * cnt, cnt, cnt);
    for (; r < rows; ++r) kernel(tile + r * MR, panel, PV + start + r * cnt, PO + start + r * cnt, cnt);
  });
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      if (nonfinite[m]) nonfinite_row(X + m * K, K, PV, PO, N, nb, kc, Y + m * N);
  });
  return y;
}

// ---- Row-wise-only W: dX on a ragged plan ----
//
// dX = dy W is the forward on Wᵀ, whose rows (W's columns) a row-wise 2:4 W does not keep at two
// of every four: a column keeps from 0 to kc of each block of kc rows. plan_columns() lays Wᵀ's
// kept entries out as plan() does (tasks of nb rows, blocks of kc panel columns = W's rows), the
// rows of a pair back to back, so the forward's two-row kernel runs them; `segments` (blocks,
// K/2, 3) int64 gives each (block, row pair)'s first slot and its two rows' counts. Within a
// row, entries follow W's row order.

// The column plan's blocking: the forward's, with whole row pairs per task.
bool column_blocking_fits(int64_t nb, int64_t kc) { return blocking_fits(nb, kc, false) && nb % 2 == 0; }

// Column plan of the row-wise W (N, K) given by `indices`: (offsets (S,) int16, source (S,) int32
// into W's values, segments).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> plan_columns(torch::Tensor indices, int64_t K, int64_t nb,
                                                                     int64_t kc) {
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == torch::kUInt8 && K >= 0 &&
                  K % 4 == 0 && indices.size(1) == (K + 7) / 8,
              "semi: indices must be contiguous uint8 (rows, ceil(cols/8)), cols a multiple of 4; got ",
              indices.sizes(), " for cols = ", K);
  TORCH_CHECK(column_blocking_fits(nb, kc), "semi: bad blocking");
  const int64_t N = indices.size(0), ib = indices.size(1), half = K / 2, blocks = (N + kc - 1) / kc;
  TORCH_CHECK(N * half <= INT32_MAX, "semi: W (", N, ", ", K, ") keeps ", N * half,
              " values, more than the column plan's int32 positions address");
  const uint8_t* I = indices.data_ptr<uint8_t>();
  // Kept entries of each column in each block of rows, then each pair's segment in task order.
  std::vector<int32_t> count(K * blocks, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t jb = b0; jb < b1; ++jb) {
      int32_t* counts = count.data() + jb * K;
      for (int64_t n = jb * kc; n < std::min(N, (jb + 1) * kc); ++n) {
        const uint8_t* idx = I + n * ib;
        for (int64_t g = 0; g < K / 4; ++g) {
          const int nib = group_nibble(idx, g);
          ++counts[4 * g + (nib & 3)];
          ++counts[4 * g + (nib >> 2)];
        }
      }
    }
  });
  auto segments = torch::empty({blocks, half, 3}, torch::TensorOptions().dtype(torch::kInt64));
  int64_t* SG = segments.data_ptr<int64_t>();
  int64_t slots = 0;
  for (int64_t k0 = 0; k0 < K; k0 += nb)
    for (int64_t jb = 0; jb < blocks; ++jb)
      for (int64_t k = k0; k < std::min(K, k0 + nb); k += 2) {
        int64_t* seg = SG + (jb * half + k / 2) * 3;
        seg[0] = slots;
        seg[1] = count[jb * K + k];
        seg[2] = count[jb * K + k + 1];
        slots += seg[1] + seg[2];
      }
  auto offsets = torch::empty({slots}, torch::TensorOptions().dtype(torch::kInt16));
  auto source = torch::empty({slots}, torch::TensorOptions().dtype(torch::kInt32));
  uint16_t* PO = reinterpret_cast<uint16_t*>(offsets.data_ptr<int16_t>());
  int32_t* PS = source.data_ptr<int32_t>();
  // Task by task (nb columns) and block by block, so that the slots written, the segments of one
  // (task, block), lie together: walked row by row over all K columns instead, consecutive
  // entries land in K / nb regions megabytes apart. A task's columns are kept by the entries of
  // the groups of four that overlap it (all of them when nb is a multiple of 4).
  at::parallel_for(0, (K + nb - 1) / nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> next(nb);  // each column's next slot in the (task, block)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * nb, k1 = std::min(K, k0 + nb), g0 = k0 / 4, g1 = (k1 + 3) / 4;
      for (int64_t jb = 0; jb < blocks; ++jb) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t* seg = SG + (jb * half + k / 2) * 3;
          next[k - k0] = seg[0] + (k % 2) * seg[1];
        }
        for (int64_t n = jb * kc; n < std::min(N, (jb + 1) * kc); ++n) {
          const uint8_t* idx = I + n * ib;
          const uint16_t offset = uint16_t((n - jb * kc) * MR);
          for (int64_t g = g0; g < g1; ++g) {
            const int nib = group_nibble(idx, g);
            const int64_t ka = 4 * g + (nib & 3), kb = 4 * g + (nib >> 2);
            const int32_t value = int32_t(n * half + 2 * g);  // entry 2g's position in W's values
            if (ka >= k0 && ka < k1) {
              const int64_t slot = next[ka - k0]++;
              PO[slot] = offset;
              PS[slot] = value;
            }
            if (kb >= k0 && kb < k1) {
              const int64_t slot = next[kb - k0]++;
              PO[slot] = offset;
              PS[slot] = value + 1;
            }
          }
        }
      }
    }
  });
  return {offsets, source, segments};
}

// The output row dx[m, :] for a dy row holding an inf or NaN, as the dense product with W's zeros
// gives it (see nonfinite_row).
void nonfinite_column_row(const float* dym, const float* V, const uint8_t* I, int64_t ib, int64_t N, int64_t K,
                          float* out) {
  const int64_t half = K / 2;
  std::fill(out, out + K, 0.f);
  for (int64_t n = 0; n < N; ++n) {
    float w[4];
    for (int64_t g = 0; g < K / 4; ++g) {
      std::fill(w, w + 4, 0.f);
      w[kept_column(I + n * ib, 2 * g) % 4] += V[n * half + 2 * g];
      w[kept_column(I + n * ib, 2 * g + 1) % 4] += V[n * half + 2 * g + 1];
      for (int64_t q = 0; q < 4; ++q) out[4 * g + q] += dym[n] * w[q];
    }
  }
}

// dx (M, K) = dy (M, N) @ W for the row-wise W (N, K) given by values and indices, through its
// column plan (plan_columns() with the same blocking). Every segment and the offsets it covers are
// checked against the stream and the panels before the kernels read them.
torch::Tensor grad_input_rowwise(torch::Tensor dy, torch::Tensor values, torch::Tensor indices, torch::Tensor offsets,
                                 torch::Tensor source, torch::Tensor segments, int64_t nb, int64_t kc,
                                 bool allow_avx512) {
  TORCH_CHECK(dy.dim() == 2 && dy.is_contiguous() && dy.scalar_type() == torch::kFloat32,
              "semi: dy must be contiguous 2-D float32, got ", dy.sizes(), " ", dy.scalar_type());
  const int64_t M = dy.size(0), N = dy.size(1);
  check_inputs(dy, values, indices, 2 * values.size(1));
  const int64_t half = values.size(1), K = 2 * half;
  TORCH_CHECK(values.size(0) == N, "semi: dy has ", N, " columns but W has ", values.size(0), " rows");
  TORCH_CHECK(column_blocking_fits(nb, kc), "semi: bad blocking");
  const int64_t blocks = (N + kc - 1) / kc, slots = offsets.numel();
  TORCH_CHECK(offsets.dim() == 1 && offsets.is_contiguous() && offsets.scalar_type() == torch::kInt16 &&
                  source.dim() == 1 && source.is_contiguous() && source.scalar_type() == torch::kInt32 &&
                  source.numel() == slots && segments.is_contiguous() && segments.scalar_type() == torch::kInt64 &&
                  segments.sizes() == torch::IntArrayRef({blocks, half, 3}),
              "semi: offsets/source/segments do not match W (make them with plan_columns())");
  auto dx = sparsekern::common::empty_output({M, K}, dy.options());
  if (M == 0 || K == 0) return dx;
  if (N == 0) return dx.zero_();
  const int64_t* SG = segments.data_ptr<int64_t>();
  const uint16_t* PO = reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>());
  std::atomic<bool> fit{true};
  at::parallel_for(0, blocks * half, 64, [&](int64_t i0, int64_t i1) {
    bool ok = true;
    for (int64_t i = i0; i < i1; ++i) {  // segment i: block i / half, pair i % half
      const int64_t start = SG[3 * i], ca = SG[3 * i + 1], cb = SG[3 * i + 2];
      if (!(start >= 0 && ca >= 0 && cb >= 0 && ca <= kc && cb <= kc && start <= slots - ca - cb)) {
        ok = false;
        continue;
      }
      // a whole panel row before the panel's end
      const uint16_t limit = uint16_t(std::min<int64_t>(65535, (N - i / half * kc - 1) * MR));
      uint16_t highest = 0;  // (a max reduction vectorises; a running &= did not: 9.5 vs 2.2 ms)
      for (int64_t e = start; e < start + ca + cb; ++e) highest = std::max(highest, PO[e]);
      ok &= highest <= limit;
    }
    if (!ok) fit = false;
  });
  TORCH_CHECK_VALUE(fit.load(), "semi: segments or offsets point outside the stream or the panels "
                    "(make them with plan_columns())");
  std::vector<uint8_t> nonfinite(M, 0);
  const auto panels = pack_panels(dy, nonfinite.data());
  auto stream = sparsekern::common::empty_output({slots}, dy.options());
  const float* V = values.data_ptr<float>();
  float* PV = stream.data_ptr<float>();
  gather_stream(V, source.data_ptr<int32_t>(), slots, N * half, PV);
  const float* P = panels.data_ptr<float>();
  float* DX = dx.data_ptr<float>();
  const RowKernel kernel = row_kernel(allow_avx512);
  const bool pair_rows = wide_rows(allow_avx512);
  forward_tasks(M, K, blocks, nb, DX, [&](float* tile, int64_t b, int64_t k0, int64_t rows, int64_t jb) {
    const float* panel = P + (b * N + jb * kc) * MR;
    for (int64_t r = 0; r < rows; r += 2) {  // rows is even: K and nb are
      const int64_t* seg = SG + (jb * half + (k0 + r) / 2) * 3;
      const int64_t start = seg[0], ca = seg[1], cb = seg[2];
      if (pair_rows) {
        fwd_row2_avx512(tile + r * MR, panel, PV + start, PO + start, ca, cb);
      } else {
        kernel(tile + r * MR, panel, PV + start, PO + start, ca);
        kernel(tile + (r + 1) * MR, panel, PV + start + ca, PO + start + ca, cb);
      }
    }
  });
  const float* D = dy.data_ptr<float>();
  const uint8_t* I = indices.data_ptr<uint8_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      if (nonfinite[m]) nonfinite_column_row(D + m * N, V, I, indices.size(1), N, K, DX + m * K);
  });
  return dx;
}

// ---- bf16: pair panels and VDPBF16PS (see the top of the file) ----

inline bool bf16_nonfinite(uint16_t v) { return (v & 0x7f80) == 0x7f80; }

// Q[b][g][c][i] = x[b*MR + i][4g + first(c)] | x[...][4g + second(c)] << 16 (0 past the last
// row), for panel block b; marks in `nonfinite` (MR entries) the rows holding an inf or NaN.
// 16 tokens of a group at a time: two gathers of their 4-value groups (8 bytes each), then one
// two-source word permutation per pair row.
SPARSEKERN_DOT_BF16 void pack_pair_block(const uint16_t* x, int64_t K, int64_t rows, uint32_t* q, uint8_t* nonfinite) {
  const int64_t G = K / 4;
  alignas(64) uint16_t table[PAIRS][32];
  for (int c = 0; c < PAIRS; ++c)
    for (int t = 0; t < 16; ++t) {
      table[c][2 * t] = uint16_t(4 * t + kPairFirst[c]);
      table[c][2 * t + 1] = uint16_t(4 * t + kPairSecond[c]);
    }
  __m512i pick[PAIRS];
  for (int c = 0; c < PAIRS; ++c) pick[c] = _mm512_load_si512(table[c]);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), exponent = _mm512_set1_epi16(0x7f80);
  for (int64_t i0 = 0; i0 < MR; i0 += 16) {
    const __m512i lo_rows = _mm512_add_epi64(lane, _mm512_set1_epi64(i0));
    const __m512i hi_rows = _mm512_add_epi64(lo_rows, _mm512_set1_epi64(8));
    const __mmask8 lo = _mm512_cmplt_epi64_mask(lo_rows, _mm512_set1_epi64(rows));
    const __mmask8 hi = _mm512_cmplt_epi64_mask(hi_rows, _mm512_set1_epi64(rows));
    alignas(64) int64_t at[16];  // each row's start, in groups of 8 bytes
    for (int t = 0; t < 16; ++t) at[t] = (i0 + t) * G;
    const __m512i lo_at = _mm512_load_si512(at), hi_at = _mm512_load_si512(at + 8);
    uint32_t bad = 0;
    for (int64_t g = 0; g < G; ++g) {
      const void* base = x + 4 * g;
      const __m512i a = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), lo, lo_at, base, 8);
      const __m512i b = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), hi, hi_at, base, 8);
      bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(a, exponent), exponent) ? 1u : 0u;
      bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exponent), exponent) ? 2u : 0u;
      uint32_t* out = q + g * PAIRS * MR + i0;
      for (int c = 0; c < PAIRS; ++c) _mm512_storeu_si512(out + c * MR, _mm512_permutex2var_epi16(a, pick[c], b));
    }
    if (bad)  // rare: find the rows
      for (int64_t i = i0; i < std::min(rows, i0 + 16); ++i)
        for (int64_t k = 0; k < K; ++k)
          if (bf16_nonfinite(x[i * K + k])) { nonfinite[i] = 1; break; }
  }
}

torch::Tensor pack_pair_panels(const torch::Tensor& src, uint8_t* nonfinite) {
  const int64_t M = src.size(0), K = src.size(1), nbm = (M + MR - 1) / MR;
  auto out = sparsekern::common::empty_output({nbm, K / 4, PAIRS, MR}, src.options().dtype(torch::kInt32));
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  uint32_t* p = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, nbm, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pack_pair_block(s + b * MR * K, K, std::min(MR, M - b * MR), p + b * (K / 4) * PAIRS * MR, nonfinite + b * MR);
  });
  return out;
}

// acc (R rows x 96 tokens, fp32) += sum over e < count of the pair v[r][e] . panel[off[r][e] ...]
// for each row r; rows are `count` slots apart in v and off.
template <int R>
SPARSEKERN_DOT_BF16 void fwd_pair_rows(float* acc_mem, const uint32_t* panel, const uint32_t* v, const uint16_t* off,
                                       int64_t count) {
  __m512 a[R][6];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 6; ++t) a[r][t] = _mm512_loadu_ps(acc_mem + r * MR + 16 * t);
  for (int64_t e = 0; e < count; ++e) {
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(int32_t(v[r * count + e]));
      const uint32_t* x = panel + off[r * count + e];
      for (int t = 0; t < 6; ++t)
        a[r][t] = _mm512_dpbf16_ps(a[r][t], (__m512bh)_mm512_loadu_si512(x + 16 * t), w);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 6; ++t) _mm512_storeu_ps(acc_mem + r * MR + 16 * t, a[r][t]);
}

// The slot of kept pair p (entries 2p, 2p+1) of weight row n in the pair stream.
inline int64_t pair_slot(int64_t n, int64_t p, int64_t N, int64_t half, int64_t nb, int64_t kc) {
  return stream_index(n, 2 * p, N, half, nb, kc) / 2;
}

// nonfinite_row for the bf16 kernel: the row's dense product with W's zeros, from the pair stream.
void nonfinite_pair_row(const uint16_t* xm, int64_t K, const uint32_t* PV, const uint16_t* PO, int64_t N, int64_t nb,
                        int64_t kc, at::BFloat16* ym) {
  const int64_t half = K / 2;
  const auto value = [](uint32_t bits) { return float(at::BFloat16(uint16_t(bits), at::BFloat16::from_bits())); };
  for (int64_t n = 0; n < N; ++n) {
    float acc = 0.f;
    for (int64_t g = 0; g < K / 4; ++g) {
      const int64_t slot = pair_slot(n, g, N, half, nb, kc);
      const int64_t c = PO[slot] / MR % PAIRS, i = 4 * g + kPairFirst[c], j = 4 * g + kPairSecond[c];
      acc += value(xm[i]) * value(PV[slot]) + value(xm[j]) * value(PV[slot] >> 16);
      for (int64_t k = 4 * g; k < 4 * g + 4; ++k)
        if (k != i && k != j && bf16_nonfinite(xm[k])) acc += value(xm[k]) * 0.f;
    }
    ym[n] = at::BFloat16(acc);
  }
}

// forward() for bf16 x and values (offsets from plan(..., pairs=true)), on AVX512-BF16.
torch::Tensor forward_pairs(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& offsets,
                            const torch::Tensor& source, int64_t nb, int64_t kc) {
  const int64_t M = x.size(0), K = x.size(1), N = offsets.size(0), half = K / 2;
  TORCH_CHECK(values.scalar_type() == torch::kBFloat16 && values.is_contiguous() && values.numel() == N * half,
              "semi: values must be contiguous bfloat16 with N * K/2 entries");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == half / 2 && offsets.scalar_type() == torch::kInt16 &&
                  source.scalar_type() == torch::kInt32 && (source.numel() == N * half || source.numel() == 0),
              "semi: offsets/source do not match bfloat16 x (make them with plan(..., pairs=True))");
  TORCH_CHECK(sparsekern::common::avx512_bf16_usable(),
              "semi: the bfloat16 kernels need AVX512-BF16, which this CPU lacks");
  auto y = sparsekern::common::empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  TORCH_CHECK(blocking_fits(nb, kc, true), "semi: bad blocking");
  std::vector<uint8_t> nonfinite(M, 0);
  const auto panels = pack_pair_panels(x, nonfinite.data());
  auto stream = sparsekern::common::empty_output({N, half}, values.options());
  const uint16_t* V = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  uint16_t* SV = reinterpret_cast<uint16_t*>(stream.data_ptr<at::BFloat16>());
  fill_stream(V, source, SV, N, half, nb, kc);
  const uint32_t* Q = reinterpret_cast<const uint32_t*>(panels.data_ptr<int32_t>());
  const uint32_t* PV = reinterpret_cast<const uint32_t*>(SV);
  const uint16_t* PO = reinterpret_cast<const uint16_t*>(offsets.data_ptr<int16_t>());
  check_offsets(PO, N, half, nb, kc, true);
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
  const int64_t G = K / 4;
  forward_tasks(M, N, (half + kc / 2 - 1) / (kc / 2), nb, Y, [&](float* tile, int64_t b, int64_t n0, int64_t rows,
                                                                  int64_t block) {
    const int64_t j0 = block * (kc / 2);
    const uint32_t* panel = Q + (b * G + j0 / 2) * PAIRS * MR;
    const int64_t cnt = std::min(kc / 2, half - j0) / 2, start = (n0 * half + rows * j0) / 2;
    int64_t r = 0;
    for (; r + 1 < rows; r += 2)
      fwd_pair_rows<2>(tile + r * MR, panel, PV + start + r * cnt, PO + start + r * cnt, cnt);
    if (r < rows) fwd_pair_rows<1>(tile + r * MR, panel, PV + start + r * cnt, PO + start + r * cnt, cnt);
  });
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      if (nonfinite[m]) nonfinite_pair_row(X + m * K, K, PV, PO, N, nb, kc, Y + m * N);
  });
  return y;
}

// The semi_forward_cpu op: fp32 on the AVX2/AVX-512F row kernels, bf16 on the pair kernels.
torch::Tensor forward_op(torch::Tensor x, torch::Tensor values, torch::Tensor offsets, torch::Tensor source,
                         int64_t nb, int64_t kc, bool allow_avx512) {
  if (x.scalar_type() != torch::kBFloat16) return forward(x, values, offsets, source, nb, kc, allow_avx512);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 4 == 0,
              "semi: x must be contiguous bfloat16 (M, K), K a multiple of 4");
  return forward_pairs(x, values, offsets, source, nb, kc);
}

// Sum of each of 8 vectors, as one vector [sum a0, ..., sum a7].
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                              __m256 a6, __m256 a7) {
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

// The dW driver: DV[n, j] (N, K/2, fp32) += the sampled products, 8 kept entries of a row at a
// time over `super` panel blocks per reduction. dots(n, s0, s1, col, sums) writes the 8 sums of
// row n over blocks [s0, s1) for the entries whose panel columns start at col[e] (entries past
// the row's last repeat entry 0 and are dropped). Rows of W per task: each task streams the
// whole x super-panel once (from L3), so fewer, larger tasks read less (512 rows measured ~10%
// faster than 64 at 4096 x 4096); their dy rows stay in L2. At least 4 tasks per thread.
template <typename Dots>
void sampled_product(float* DV, const uint8_t* I, int64_t ib, int64_t M, int64_t N, int64_t K, int64_t super,
                     int64_t column, Dots dots) {
  const int64_t nbm = (M + MR - 1) / MR, half = K / 2;
  const int64_t rows_per_task = std::max<int64_t>(
      64, std::min<int64_t>(512, (N / (4 * at::get_num_threads()) + 7) / 8 * 8));
  const int64_t nbn = (N + rows_per_task - 1) / rows_per_task;
  for (int64_t s0 = 0; s0 < nbm; s0 += super) {
    const int64_t s1 = std::min(nbm, s0 + super);
    at::parallel_for(0, nbn, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t n0 = t0 * rows_per_task; n0 < std::min(N, t1 * rows_per_task); n0 += rows_per_task) {
        const int64_t n1 = std::min(N, n0 + rows_per_task);
        for (int64_t k0 = 0; k0 < K; k0 += KC_DW) {
          const int64_t j0 = k0 / 2, count = std::min(KC_DW, K - k0) / 2;
          for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* idx = I + n * ib;
            int64_t col[8];
            for (int64_t e = 0; e < 8; ++e)
              col[e] = (e < count ? kept_column(idx, j0 + e) : kept_column(idx, j0)) * column;
            alignas(32) float sums[8];
            dots(n, s0, s1, col, sums);
            float* out = DV + n * half + j0;
            for (int64_t e = 0; e < count; ++e) out[e] += sums[e];
          }
        }
      }
    });
  }
}

// sums[e] = sum over blocks [s0, s1) and their 96 tokens of dy[., n] * x[., col[e]], e < 8 (fp32
// panels: 8 ymm dot-product accumulators over MSUPER x 96 tokens, one hadd tree).
inline void sampled_dots(const float* PX, const float* PD, int64_t K, int64_t N, int64_t n, int64_t s0, int64_t s1,
                         const int64_t* col, float* sums) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t b = s0; b < s1; ++b) {
    const float* xb = PX + b * K * MR;
    const float* d = PD + (b * N + n) * MR;
    for (int64_t r = 0; r < MR; r += 8) {
      const __m256 dr = _mm256_loadu_ps(d + r);
      a0 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[0] + r), a0);
      a1 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[1] + r), a1);
      a2 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[2] + r), a2);
      a3 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[3] + r), a3);
      a4 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[4] + r), a4);
      a5 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[5] + r), a5);
      a6 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[6] + r), a6);
      a7 = _mm256_fmadd_ps(dr, _mm256_loadu_ps(xb + col[7] + r), a7);
    }
  }
  _mm256_store_ps(sums, hsum8(a0, a1, a2, a3, a4, a5, a6, a7));
}

// dvalues (N, K/2): dvalues[n, j] = sum_m dy[m, n] * x[m, col(n, j)].
torch::Tensor grad_weight(torch::Tensor dy, torch::Tensor x, torch::Tensor indices) {
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.is_contiguous() && dy.scalar_type() == torch::kFloat32,
              "semi: dy must be contiguous float32 (M, N)");
  auto dvalues = torch::zeros({N, K / 2}, x.options());
  check_inputs(x, dvalues, indices, K);
  if (M == 0 || N == 0 || K == 0) return dvalues;
  const auto xp = pack_panels(x), dyp = pack_panels(dy);
  const float* PX = xp.data_ptr<float>();
  const float* PD = dyp.data_ptr<float>();
  sampled_product(dvalues.data_ptr<float>(), indices.data_ptr<uint8_t>(), indices.size(1), M, N, K, MSUPER, MR,
                  [&](int64_t n, int64_t s0, int64_t s1, const int64_t* col, float* sums) {
                    sampled_dots(PX, PD, K, N, n, s0, s1, col, sums);
                  });
  return dvalues;
}

// ---- bf16 dW: token-pair panels and VDPBF16PS ----

constexpr int64_t MP = MR / 2;            // token pairs per panel block
// dW bf16: panel blocks summed per reduction; 12 measured 7-9 % faster than 8 and 16 at 2048 x 4096
// x 4096 (the x columns of a step, 16 x 12 x 192 B, about fill the L1).
constexpr int64_t MSUPER_PAIRS = 12;

// T[b][c][p] = src[b*MR + 2p][c] | src[b*MR + 2p + 1][c] << 16 (0 past the last row): each column
// of a panel block as 48 pairs of consecutive tokens. Two gathers of 32-bit words (columns c and
// c + 1 of 16 rows each) give two columns' 16 pairs; an odd last column is packed alone.
SPARSEKERN_DOT_BF16 void pack_token_pair_block(const uint16_t* src, int64_t C, int64_t rows, uint32_t* t) {
  const __m512i low = _mm512_set1_epi32(0xffff), high = _mm512_set1_epi32(int32_t(0xffff0000u));
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t q = 0; q < MP; q += 16) {
    const __m512i even_row = _mm512_slli_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(q))), 1);
    const __m512i odd_row = _mm512_add_epi32(even_row, _mm512_set1_epi32(1));
    const __mmask16 even = _mm512_cmplt_epi32_mask(even_row, _mm512_set1_epi32(int32_t(rows)));
    const __mmask16 odd = _mm512_cmplt_epi32_mask(odd_row, _mm512_set1_epi32(int32_t(rows)));
    const __m512i even_at = _mm512_mullo_epi32(even_row, _mm512_set1_epi32(int32_t(C)));  // in elements
    const __m512i odd_at = _mm512_mullo_epi32(odd_row, _mm512_set1_epi32(int32_t(C)));
    int64_t c = 0;
    for (; c + 1 < C; c += 2) {
      const __m512i e = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), even, even_at, src + c, 2);
      const __m512i o = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), odd, odd_at, src + c, 2);
      _mm512_storeu_si512(t + c * MP + q, _mm512_or_si512(_mm512_and_si512(e, low), _mm512_slli_epi32(o, 16)));
      _mm512_storeu_si512(t + (c + 1) * MP + q, _mm512_or_si512(_mm512_srli_epi32(e, 16), _mm512_and_si512(o, high)));
    }
    for (; c < C; ++c)
      for (int64_t p = q; p < q + 16; ++p)
        t[c * MP + p] = (2 * p < rows ? uint32_t(src[2 * p * C + c]) : 0u) |
                        (2 * p + 1 < rows ? uint32_t(src[(2 * p + 1) * C + c]) << 16 : 0u);
  }
}

// Words between panel blocks of C columns: the MSUPER_PAIRS blocks dW reads together start in
// different L1 sets (C x 192 B is a multiple of 4 KiB at C = 64, 128, ...: unstaggered, a
// column's 12 blocks all fell into its 3 sets, and dW at 4096 x 4096 took 230 ms, not 160).
int64_t token_pair_stride(int64_t C) { return sparsekern::common::staggered_stride(C * MP * 4, MSUPER_PAIRS) / 4; }

torch::Tensor pack_token_pairs(const torch::Tensor& src) {
  const int64_t M = src.size(0), C = src.size(1), nbm = (M + MR - 1) / MR, stride = token_pair_stride(C);
  auto out = sparsekern::common::empty_output({nbm, stride}, src.options().dtype(torch::kInt32));
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  uint32_t* t = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, nbm, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pack_token_pair_block(s + b * MR * C, C, std::min(MR, M - b * MR), t + b * stride);
  });
  return out;
}

// sums[e] = sum over blocks [s0, s1) and their 96 tokens of dy[., n] * x[., col[e]], e < 8.
SPARSEKERN_DOT_BF16 void sampled_pair_dots(const uint32_t* xp, int64_t x_stride, const uint32_t* dyp,
                                           int64_t dy_stride, int64_t n, int64_t s0, int64_t s1, const int64_t* col,
                                           float* sums) {
  __m512 a[8];
  for (int e = 0; e < 8; ++e) a[e] = _mm512_setzero_ps();
  for (int64_t b = s0; b < s1; ++b) {
    const uint32_t* xb = xp + b * x_stride;
    const uint32_t* d = dyp + b * dy_stride + n * MP;
    const __m512bh d0 = (__m512bh)_mm512_loadu_si512(d), d1 = (__m512bh)_mm512_loadu_si512(d + 16);
    const __m512bh d2 = (__m512bh)_mm512_loadu_si512(d + 32);
#pragma GCC unroll 8
    for (int e = 0; e < 8; ++e) {
      const uint32_t* xe = xb + col[e];
      a[e] = _mm512_dpbf16_ps(a[e], (__m512bh)_mm512_loadu_si512(xe), d0);
      a[e] = _mm512_dpbf16_ps(a[e], (__m512bh)_mm512_loadu_si512(xe + 16), d1);
      a[e] = _mm512_dpbf16_ps(a[e], (__m512bh)_mm512_loadu_si512(xe + 32), d2);
    }
  }
  __m256 h[8];
  for (int e = 0; e < 8; ++e)
    h[e] = _mm256_add_ps(_mm512_castps512_ps256(a[e]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[e]), 1)));
  _mm256_storeu_ps(sums, hsum8(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
}

// grad_weight() for bf16 dy and x on AVX512-BF16: fp32 sums, rounded once to bf16.
torch::Tensor grad_weight_pairs(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& indices) {
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), half = K / 2;
  TORCH_CHECK(sparsekern::common::avx512_bf16_usable(),
              "semi: the bfloat16 kernels need AVX512-BF16, which this CPU lacks");
  TORCH_CHECK(indices.dim() == 2 && indices.is_contiguous() && indices.scalar_type() == torch::kUInt8 &&
                  indices.size(0) == N && indices.size(1) == (K + 7) / 8,
              "semi: indices must be contiguous uint8 (N, ceil(K/8)) for dy (M, N) and x (M, K)");
  auto sums = torch::zeros({N, half}, x.options().dtype(torch::kFloat32));
  if (M == 0 || N == 0 || K == 0) return sums.to(torch::kBFloat16);
  const auto xp = pack_token_pairs(x), dyp = pack_token_pairs(dy);
  const uint32_t* PX = reinterpret_cast<const uint32_t*>(xp.data_ptr<int32_t>());
  const uint32_t* PD = reinterpret_cast<const uint32_t*>(dyp.data_ptr<int32_t>());
  const int64_t x_stride = token_pair_stride(K), dy_stride = token_pair_stride(N);
  sampled_product(sums.data_ptr<float>(), indices.data_ptr<uint8_t>(), indices.size(1), M, N, K, MSUPER_PAIRS, MP,
                  [&](int64_t n, int64_t s0, int64_t s1, const int64_t* col, float* out) {
                    sampled_pair_dots(PX, x_stride, PD, dy_stride, n, s0, s1, col, out);
                  });
  return sums.to(torch::kBFloat16);
}

// The semi_grad_weight_cpu op: fp32, or bf16 on the pair kernels.
torch::Tensor grad_weight_op(torch::Tensor dy, torch::Tensor x, torch::Tensor indices) {
  if (x.scalar_type() != torch::kBFloat16) return grad_weight(dy, x, indices);
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0) && dy.is_contiguous() && x.is_contiguous() &&
                  dy.scalar_type() == torch::kBFloat16 && x.size(1) % 4 == 0,
              "semi: dy (M, N) and x (M, K) must be contiguous bfloat16, K a multiple of 4");
  return grad_weight_pairs(dy, x, indices);
}

}  // namespace

#pragma GCC pop_options

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.semi.cpu");
  m.def("semi_plan_cpu(Tensor indices, Tensor? perm, int half, int nb, int kc, bool pairs) -> (Tensor, Tensor)");
  m.def("semi_forward_cpu(Tensor x, Tensor values, Tensor offsets, Tensor source, int nb, int kc, "
        "bool allow_avx512) -> Tensor");
  m.def("semi_grad_weight_cpu(Tensor dy, Tensor x, Tensor indices) -> Tensor");
  m.def("semi_plan_columns_cpu(Tensor indices, int cols, int nb, int kc) -> (Tensor, Tensor, Tensor)");
  m.def("semi_grad_input_rowwise_cpu(Tensor dy, Tensor values, Tensor indices, Tensor offsets, Tensor source, "
        "Tensor segments, int nb, int kc, bool allow_avx512) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("semi_plan_cpu", &plan);
  m.impl("semi_forward_cpu", &forward_op);
  m.impl("semi_grad_weight_cpu", &grad_weight_op);
  m.impl("semi_plan_columns_cpu", &plan_columns);
  m.impl("semi_grad_input_rowwise_cpu", &grad_input_rowwise);
}

// Controls and tables, not products: plain module functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "2:4 semi-structured kernels on CPU; the products are sparsekern::semi_*_cpu dispatcher ops";
  sparsekern::common::def_output_cache(m);
  m.def("fp32_row_isa", [](bool allow_avx512) { return wide_rows(allow_avx512) ? "avx512f" : "avx2-fma"; },
        "what the fp32 forward's row kernels run on this CPU: 'avx512f' or 'avx2-fma'");
  m.def("bf16_pairs_usable", &sparsekern::common::avx512_bf16_usable,
        "whether the bfloat16 forward / dX kernels (AVX512-BF16 dot products) run on this CPU");
  m.def("transposable_pattern_table", &sparsekern::semi::transposable_pattern_table,
        "the 90 transposable 4x4 patterns, (90, 16) bool, in scoring order");
}
