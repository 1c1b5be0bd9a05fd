// Register-blocked microkernels shared by the three block-sparse products.
//
// Every product reduces to the same inner step: an MR x NR tile of the output
// accumulates, over a list of K-segments, A(i, k) * B(k, n): A is the broadcast
// operand (X or dY read in place for the forward and dX, packed dYᵀ for dW), B
// the vector operand (NR = two 256-bit vectors: packed values, or packed X).
// The accumulators stay in registers across all segments (all stored blocks of
// a block row), so the output tile is written once. With MR = 6: 12 accumulators + 2 B vectors + 1 broadcast = 15
// of the 16 AVX2 registers, 12 FMAs per 8 loads.
//
// The AVX2/FMA version is compiled with a function-level target attribute and
// chosen at run time; a portable version (plain loops, auto-vectorised for the
// build's baseline ISA) runs everywhere else.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEKERN_X86 1
#define SPARSEKERN_AVX2 __attribute__((target("avx2,fma")))
#define SPARSEKERN_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
#endif

namespace sparsekern {
namespace common {

constexpr int kMR = 6;
template <typename C>
constexpr int kNR = 64 / sizeof(C);  // 16 floats or 8 doubles: two 256-bit vectors

// out[i * ldo + n] (+)= sum_j sum_k A_j(i, k) * b[(j * seglen + k) * ldb + n], where segment j of A is
//   kRowsA:  A_j(i, k) = a[seg_off[j] + i * lda + k]   (rows of a row-major matrix: X or dY as they are)
//   !kRowsA: A_j(i, k) = a[seg_off[j] + k * lda + i]   (k-major packed tiles: dYᵀ for dW)
// and B's rows follow each other across segments with stride ldb (NR when packed).
// init (NR values, or null) starts every row's accumulators: a bias, added in registers.
template <typename C>
using Microkernel = void (*)(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg, int64_t seglen,
                             const C* b, int64_t ldb, C* out, int64_t ldo, bool add, const C* init);

template <typename C, int MR, bool kRowsA>
void microkernel_portable(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg, int64_t seglen,
                          const C* b, int64_t ldb, C* out, int64_t ldo, bool add, const C* init) {
  constexpr int NR = kNR<C>;
  C acc[MR][NR] = {};
  if (init) {
    for (int i = 0; i < MR; ++i) {
      for (int n = 0; n < NR; ++n) acc[i][n] = init[n];
    }
  }
  for (int64_t j = 0; j < nseg; ++j) {
    const C* aj = a + seg_off[j];
    for (int64_t k = 0; k < seglen; ++k, b += ldb) {
      for (int i = 0; i < MR; ++i) {
        const C ai = kRowsA ? aj[i * lda + k] : aj[k * lda + i];
        for (int n = 0; n < NR; ++n) acc[i][n] += ai * b[n];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int n = 0; n < NR; ++n) out[i * ldo + n] = add ? out[i * ldo + n] + acc[i][n] : acc[i][n];
  }
}

#ifdef SPARSEKERN_X86
struct Avx2Float {
  using V = __m256;
  static constexpr int W = 8;
  static SPARSEKERN_AVX2_INLINE V zero() { return _mm256_setzero_ps(); }
  static SPARSEKERN_AVX2_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static SPARSEKERN_AVX2_INLINE V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static SPARSEKERN_AVX2_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static SPARSEKERN_AVX2_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static SPARSEKERN_AVX2_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

struct Avx2Double {
  using V = __m256d;
  static constexpr int W = 4;
  static SPARSEKERN_AVX2_INLINE V zero() { return _mm256_setzero_pd(); }
  static SPARSEKERN_AVX2_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  static SPARSEKERN_AVX2_INLINE V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static SPARSEKERN_AVX2_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static SPARSEKERN_AVX2_INLINE V add(V a, V b) { return _mm256_add_pd(a, b); }
  static SPARSEKERN_AVX2_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
};

template <typename C> struct Avx2;
template <> struct Avx2<float> : Avx2Float {};
template <> struct Avx2<double> : Avx2Double {};

template <typename C, int MR, bool kRowsA>
SPARSEKERN_AVX2 void microkernel_avx2(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg,
                                      int64_t seglen, const C* b, int64_t ldb, C* out, int64_t ldo, bool add,
                                      const C* init) {
  using T = Avx2<C>;
  constexpr int W = T::W;
  typename T::V c0[MR], c1[MR];
  const typename T::V i0 = init ? T::load(init) : T::zero(), i1 = init ? T::load(init + W) : T::zero();
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c0[i] = i0;
    c1[i] = i1;
  }
  for (int64_t j = 0; j < nseg; ++j) {
    if (kRowsA) {
      const C* rows[MR];
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) rows[i] = a + seg_off[j] + i * lda;
#pragma GCC unroll 2
      for (int64_t k = 0; k < seglen; ++k, b += ldb) {
        const typename T::V b0 = T::load(b), b1 = T::load(b + W);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          const typename T::V ai = T::broadcast(rows[i] + k);
          c0[i] = T::fma(ai, b0, c0[i]);
          c1[i] = T::fma(ai, b1, c1[i]);
        }
      }
    } else {
      const C* ap = a + seg_off[j];
#pragma GCC unroll 2
      for (int64_t k = 0; k < seglen; ++k, ap += lda, b += ldb) {
        const typename T::V b0 = T::load(b), b1 = T::load(b + W);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          const typename T::V ai = T::broadcast(ap + i);
          c0[i] = T::fma(ai, b0, c0[i]);
          c1[i] = T::fma(ai, b1, c1[i]);
        }
      }
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    C* o = out + i * ldo;
    if (add) {
      c0[i] = T::add(T::load(o), c0[i]);
      c1[i] = T::add(T::load(o + W), c1[i]);
    }
    T::store(o, c0[i]);
    T::store(o + W, c1[i]);
  }
}
#endif

// Which implementation runs: decided once from the CPU, overridable for tests.
// Inline (one flag per extension module that includes this header).
inline std::atomic<bool>& portable_only_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline bool cpu_has_avx2() {
#ifdef SPARSEKERN_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool use_avx2() { return cpu_has_avx2() && !portable_only_flag().load(std::memory_order_relaxed); }
inline void set_portable_only(bool portable_only) { portable_only_flag() = portable_only; }

template <typename C, int MR, bool kRowsA>
Microkernel<C> microkernel() {
#ifdef SPARSEKERN_X86
  if (use_avx2()) return &microkernel_avx2<C, MR, kRowsA>;
#endif
  return &microkernel_portable<C, MR, kRowsA>;
}

// Microkernel for a tile of `mr` (1..MR) rows.
template <typename C, bool kRowsA>
Microkernel<C> microkernel_rows(int mr) {
  switch (mr) {
    case 1: return microkernel<C, 1, kRowsA>();
    case 2: return microkernel<C, 2, kRowsA>();
    case 3: return microkernel<C, 3, kRowsA>();
    case 4: return microkernel<C, 4, kRowsA>();
    case 5: return microkernel<C, 5, kRowsA>();
    default: return microkernel<C, 6, kRowsA>();
  }
}

}  // namespace common
}  // namespace sparsekern
