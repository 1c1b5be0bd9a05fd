// Register-blocked microkernels shared by the block-sparse, conv and low-rank products.
//
// Every product reduces to the same inner step: an MR x NR tile of the output
// accumulates, over a list of K-segments, A(i, k) * B(k, n): A is the broadcast
// operand (X or dY read in place for the forward and dX, packed dYᵀ for dW), B
// the vector operand (NR = two SIMD vectors: packed values, or packed X).
// The accumulators stay in registers across all segments (all stored blocks of
// a block row), so the output tile is written once. With MR = 6: 12 accumulators
// + 2 B vectors + 1 broadcast, 12 FMAs per 8 loads, on either ISA:
//   AVX2/FMA   NR = 16 floats / 8 doubles (two ymm), 15 of the 16 registers;
//   AVX-512F   NR = 32 floats / 16 doubles (two zmm): twice the work per instruction.
// The block-sparse, conv and low-rank products run up to MR = 12 rows on AVX-512F (tile_rows: 24
// accumulators, 27 of the 32 zmm, 24 FMAs per 14 loads; measured 4-15 % faster than MR = 6).
// The products take NR as a template parameter: the strip width of the packed B
// operand follows the chosen path ("wide" tiles for AVX-512).
//
// The SIMD versions are compiled with function-level target attributes and chosen
// at run time from the CPU's features; a portable version (plain loops, auto-
// vectorised for the build's baseline ISA) runs everywhere else. A lower path can be
// forced (SPARSEKERN_CPU_ISA, tests), and the portable loops can run at the AVX-512
// tile geometry, so the wide packing is checked on a CPU without AVX-512.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/amx.h"
#include "common/cache_sets.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEKERN_X86 1
#define SPARSEKERN_AVX2 __attribute__((target("avx2,fma")))
#define SPARSEKERN_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline
#define SPARSEKERN_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define SPARSEKERN_AVX512_INLINE __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
#endif

namespace sparsekern {
namespace common {

constexpr int kMR = 6;
template <typename C>
constexpr int kNR = 64 / sizeof(C);       // 16 floats or 8 doubles: two 256-bit vectors
template <typename C>
constexpr int kWideNR = 128 / sizeof(C);  // 32 floats or 16 doubles: two 512-bit vectors

// out[i * ldo + n] (+)= sum_j sum_k A_j(i, k) * b[(j * seglen + k) * ldb + n], where segment j of A is
//   kRowsA:  A_j(i, k) = a[seg_off[j] + i * lda + k]   (rows of a row-major matrix: X or dY as they are)
//   !kRowsA: A_j(i, k) = a[seg_off[j] + k * lda + i]   (k-major packed tiles: dYᵀ for dW)
// and B's rows follow each other across segments with stride ldb (NR when packed).
// init (NR values, or null) starts every row's accumulators: a bias, added in registers.
// store: kWrite (out =), kAdd (out +=), or kStream: out = with non-temporal stores, for an
// output too large to stay cached until it is read (no read-for-ownership of its lines); the
// SIMD kernels stream only when out and ldo keep every vector aligned (else they write), and
// the caller fences (stream_fence) before another thread reads the output.
enum class Store : int { kWrite, kAdd, kStream };

// Orders this thread's non-temporal stores before whatever follows: a worker's last step.
inline void stream_fence() {
#ifdef SPARSEKERN_X86
  _mm_sfence();
#endif
}

// Outputs at least this large are written with non-temporal stores: they cannot stay cached
// until they are read (8 x a core's L2 on a Xeon, 32 x on Zen3), and a 2048 x 4096 fp32 output
// written through the cache costs a read of every line first. A low-rank layer's fwd+bwd at
// r = 64 measured ~11 % faster with its two such outputs streamed (docs/lowrank.md); the bf16
// products' tiles stream theirs too (store_tile_bf16).
constexpr int64_t kStreamOutputBytes = 16 << 20;

// Whether a product writes its output of `elements` values of S with non-temporal stores.
template <typename S>
inline bool streamed_output(int64_t elements) {
  return elements * int64_t(sizeof(S)) >= kStreamOutputBytes;
}

template <typename C>
using Microkernel = void (*)(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg, int64_t seglen,
                             const C* b, int64_t ldb, C* out, int64_t ldo, Store store, const C* init);

template <typename C, int MR, int NR, bool kRowsA>
void microkernel_portable(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg, int64_t seglen,
                          const C* b, int64_t ldb, C* out, int64_t ldo, Store store, const C* init) {
  const bool add = store == Store::kAdd;
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
// kStream, and every row of the tile starts on a vector boundary (a non-temporal store of a
// misaligned vector faults).
template <typename V, typename C>
inline bool streams(Store store, const C* out, int64_t ldo) {
  return store == Store::kStream && reinterpret_cast<uintptr_t>(out) % sizeof(V) == 0 &&
         (ldo * int64_t(sizeof(C))) % int64_t(sizeof(V)) == 0;
}

struct Avx2Float {
  using V = __m256;
  static constexpr int W = 8;
  static SPARSEKERN_AVX2_INLINE V zero() { return _mm256_setzero_ps(); }
  static SPARSEKERN_AVX2_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static SPARSEKERN_AVX2_INLINE V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static SPARSEKERN_AVX2_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static SPARSEKERN_AVX2_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static SPARSEKERN_AVX2_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static SPARSEKERN_AVX2_INLINE void stream(float* p, V v) { _mm256_stream_ps(p, v); }
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
  static SPARSEKERN_AVX2_INLINE void stream(double* p, V v) { _mm256_stream_pd(p, v); }
};

template <typename C> struct Avx2;
template <> struct Avx2<float> : Avx2Float {};
template <> struct Avx2<double> : Avx2Double {};

struct Avx512Float {
  using V = __m512;
  static constexpr int W = 16;
  static SPARSEKERN_AVX512_INLINE V zero() { return _mm512_setzero_ps(); }
  static SPARSEKERN_AVX512_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static SPARSEKERN_AVX512_INLINE V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static SPARSEKERN_AVX512_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static SPARSEKERN_AVX512_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static SPARSEKERN_AVX512_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static SPARSEKERN_AVX512_INLINE void stream(float* p, V v) { _mm512_stream_ps(p, v); }
};

struct Avx512Double {
  using V = __m512d;
  static constexpr int W = 8;
  static SPARSEKERN_AVX512_INLINE V zero() { return _mm512_setzero_pd(); }
  static SPARSEKERN_AVX512_INLINE V load(const double* p) { return _mm512_loadu_pd(p); }
  static SPARSEKERN_AVX512_INLINE V broadcast(const double* p) { return _mm512_set1_pd(*p); }
  static SPARSEKERN_AVX512_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static SPARSEKERN_AVX512_INLINE V add(V a, V b) { return _mm512_add_pd(a, b); }
  static SPARSEKERN_AVX512_INLINE void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static SPARSEKERN_AVX512_INLINE void stream(double* p, V v) { _mm512_stream_pd(p, v); }
};

template <typename C> struct Avx512;
template <> struct Avx512<float> : Avx512Float {};
template <> struct Avx512<double> : Avx512Double {};

// Prefetch into L1 the `bytes` from `p` of each of MR rows `lda` apart: the next segment of a
// tile that reads A's rows in place. Its columns jump (the next stored block's), so the hardware
// prefetchers cannot see them coming, and without this every segment starts on MR cache misses at
// once: on a Xeon (whose L3 feeds a core ~24 GB/s) the block-sparse forward's loop nest at
// density 0.1-0.5 ran 10-16 % faster with it in a side-by-side kernel test, ~7 % in the product.
// A prefetch never faults, so no bound is needed.
template <typename C, int MR>
__attribute__((always_inline)) inline void prefetch_segment(const C* p, int64_t lda, int64_t bytes) {
  for (int i = 0; i < MR; ++i) {
    const char* row = reinterpret_cast<const char*>(p + i * lda);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
    __builtin_prefetch(row + bytes - 1, 0, 3);  // the last line, where the row starts mid-line
  }
}

// Accumulating tiles: a tile that adds to its output (dW's sum over token chunks: each
// chunk visits every stored block, so a block's accumulated tile comes back from L3) asks for
// the output's lines at its start, so they arrive while the K loop runs: in a perf profile 13 %
// of the dW kernel's samples sat on the first add's load. On a Xeon (2 threads, 2048 x 4096 x
// 4096) block-32 dW ran 7 % faster at density 0.5, 3-4 % at 0.1-0.05; block 16 4 % at 0.5.
// One body for both SIMD ISAs: the target attribute cannot depend on a template
// parameter, so the function is stamped out once per (name, target, vector traits).
#define SPARSEKERN_SIMD_MICROKERNEL(NAME, TARGET, TRAITS)                                                   \
  template <typename C, int MR, bool kRowsA>                                                               \
  TARGET void NAME(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg, int64_t seglen, const C* b, \
                   int64_t ldb, C* out, int64_t ldo, Store store, const C* init) {                           \
    using T = TRAITS<C>;                                                                                    \
    constexpr int W = T::W;                                                                                    \
    typename T::V c0[MR], c1[MR];                                                                              \
    if (store == Store::kAdd) {  /* see accumulating tiles above */                                            \
    _Pragma("GCC unroll 16")                                                                                    \
      for (int i = 0; i < MR; ++i) {                                                                           \
        __builtin_prefetch(out + i * ldo, 1, 3);                                                               \
        __builtin_prefetch(out + i * ldo + W, 1, 3);                                                           \
      }                                                                                                        \
    }                                                                                                          \
    const typename T::V i0 = init ? T::load(init) : T::zero(), i1 = init ? T::load(init + W) : T::zero();      \
    _Pragma("GCC unroll 16")                                                                                    \
    for (int i = 0; i < MR; ++i) {                                                                             \
      c0[i] = i0;                                                                                              \
      c1[i] = i1;                                                                                              \
    }                                                                                                          \
    for (int64_t j = 0; j < nseg; ++j) {                                                                       \
      if (kRowsA) {                                                                                            \
        const C* rows[MR];                                                                                     \
    _Pragma("GCC unroll 16")                                                                                    \
        for (int i = 0; i < MR; ++i) rows[i] = a + seg_off[j] + i * lda;                                       \
        if (j + 1 < nseg) prefetch_segment<C, MR>(a + seg_off[j + 1], lda, seglen * int64_t(sizeof(C)));      \
    _Pragma("GCC unroll 2")                                                                                    \
        for (int64_t k = 0; k < seglen; ++k, b += ldb) {                                                       \
          const typename T::V b0 = T::load(b), b1 = T::load(b + W);                                            \
    _Pragma("GCC unroll 16")                                                                                    \
          for (int i = 0; i < MR; ++i) {                                                                       \
            const typename T::V ai = T::broadcast(rows[i] + k);                                                \
            c0[i] = T::fma(ai, b0, c0[i]);                                                                     \
            c1[i] = T::fma(ai, b1, c1[i]);                                                                     \
          }                                                                                                    \
        }                                                                                                      \
      } else {                                                                                                 \
        const C* ap = a + seg_off[j];                                                                          \
    _Pragma("GCC unroll 2")                                                                                    \
        for (int64_t k = 0; k < seglen; ++k, ap += lda, b += ldb) {                                            \
          const typename T::V b0 = T::load(b), b1 = T::load(b + W);                                            \
    _Pragma("GCC unroll 16")                                                                                    \
          for (int i = 0; i < MR; ++i) {                                                                       \
            const typename T::V ai = T::broadcast(ap + i);                                                     \
            c0[i] = T::fma(ai, b0, c0[i]);                                                                     \
            c1[i] = T::fma(ai, b1, c1[i]);                                                                     \
          }                                                                                                    \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
    if (streams<typename T::V>(store, out, ldo)) {                                                             \
    _Pragma("GCC unroll 16")                                                                                    \
      for (int i = 0; i < MR; ++i) {                                                                           \
        T::stream(out + i * ldo, c0[i]);                                                                       \
        T::stream(out + i * ldo + W, c1[i]);                                                                   \
      }                                                                                                        \
      return;                                                                                                  \
    }                                                                                                          \
    _Pragma("GCC unroll 16")                                                                                    \
    for (int i = 0; i < MR; ++i) {                                                                             \
      C* o = out + i * ldo;                                                                                    \
      if (store == Store::kAdd) {                                                                              \
        c0[i] = T::add(T::load(o), c0[i]);                                                                     \
        c1[i] = T::add(T::load(o + W), c1[i]);                                                                 \
      }                                                                                                        \
      T::store(o, c0[i]);                                                                                      \
      T::store(o + W, c1[i]);                                                                                  \
    }                                                                                                          \
  }                                                                                                           

SPARSEKERN_SIMD_MICROKERNEL(microkernel_avx2, SPARSEKERN_AVX2, Avx2)
SPARSEKERN_SIMD_MICROKERNEL(microkernel_avx512, SPARSEKERN_AVX512, Avx512)
#undef SPARSEKERN_SIMD_MICROKERNEL

// The narrow strip (NR = kNR: 16 floats / 8 doubles) on AVX-512F: one zmm per row, so half
// the FMA instructions of the two-ymm AVX2 body (6 FMAs per 7 loads instead of 12 per 8).
// 16-column blocks take this strip on AVX-512 machines, and so do the packed-row products'
// 24-row tiles (common/packed_rows_product.h) and dW's tiles of up to 24 rows
// (packed_tile_rows): hence unroll 32, since at 24 rows GCC's partial unroll of 16 kept the
// accumulators in a memory array.
// Over a packed A (the packed-row products' 24-row tiles, dW's dYᵀ) the strip's rows, one line
// per K step at 16 floats, are prefetched this many steps ahead: in the packed-row forward and
// dX the strips of the whole layer stream from L3 once per 24 rows, and the hardware prefetchers
// lagged behind it. On a Xeon (2 threads, 2048 x 4096 x 4096, block 32) the forward and dX ran
// 8 % faster at density 0.5 and 4-5 % at 0.1 (distances of 32-256 steps alike); dW level.
constexpr int64_t kPrefetchSteps = 64;

template <typename C, int MR, bool kRowsA>
SPARSEKERN_AVX512 void microkernel_avx512_narrow(const C* a, int64_t lda, const int64_t* seg_off, int64_t nseg,
                                                 int64_t seglen, const C* b, int64_t ldb, C* out, int64_t ldo,
                                                 Store store, const C* init) {
  using T = Avx512<C>;
  typename T::V c[MR];
  if (store == Store::kAdd) {  // see accumulating tiles above the SIMD body
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) __builtin_prefetch(out + i * ldo, 1, 3);
  }
  const typename T::V i0 = init ? T::load(init) : T::zero();
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) c[i] = i0;
  for (int64_t j = 0; j < nseg; ++j) {
    if (kRowsA) {
      const C* rows[MR];
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) rows[i] = a + seg_off[j] + i * lda;
      if (j + 1 < nseg) prefetch_segment<C, MR>(a + seg_off[j + 1], lda, seglen * int64_t(sizeof(C)));
#pragma GCC unroll 2
      for (int64_t k = 0; k < seglen; ++k, b += ldb) {
        const typename T::V b0 = T::load(b);
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) c[i] = T::fma(T::broadcast(rows[i] + k), b0, c[i]);
      }
    } else {
      const C* ap = a + seg_off[j];
#pragma GCC unroll 2
      for (int64_t k = 0; k < seglen; ++k, ap += lda, b += ldb) {
        __builtin_prefetch(b + kPrefetchSteps * ldb, 0, 2);
        const typename T::V b0 = T::load(b);
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) c[i] = T::fma(T::broadcast(ap + i), b0, c[i]);
      }
    }
  }
  if (streams<typename T::V>(store, out, ldo)) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) T::stream(out + i * ldo, c[i]);
    return;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    C* o = out + i * ldo;
    T::store(o, store == Store::kAdd ? T::add(T::load(o), c[i]) : c[i]);
  }
}
#endif

// Which implementation runs. The path is an ISA (its tile geometry: NR) and whether its
// SIMD loops or the portable ones execute; decided once from the CPU, then only lowered
// on request (SPARSEKERN_CPU_ISA, tests). One setting per extension module. The amx
// path is the avx512 one plus AMX tiles for the bf16 products that have them.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAmx ? "amx" : isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "portable";
}

// The best path this CPU runs natively (AVX-512F needs AVX2/FMA too: the tails use them).
inline Isa cpu_isa() {
#ifdef SPARSEKERN_X86
  static const Isa isa = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::kPortable
                         : !__builtin_cpu_supports("avx512f")                                 ? Isa::kAvx2
                         : amx_bf16_usable()                                                  ? Isa::kAmx
                                                                                              : Isa::kAvx512;
  return isa;
#else
  return Isa::kPortable;
#endif
}

// isa * 2 + (portable loops ? 1 : 0)
inline std::atomic<int>& path_state() {
  static std::atomic<int> state{int(cpu_isa()) * 2};
  return state;
}

inline Isa path_isa() { return Isa(path_state().load(std::memory_order_relaxed) / 2); }
inline bool portable_loops() {
  return path_isa() == Isa::kPortable || path_state().load(std::memory_order_relaxed) % 2 == 1;
}
// The AVX-512 geometry: packed strips of kWideNR columns.
inline bool wide_tiles() { return int(path_isa()) >= int(Isa::kAvx512); }
// bf16 products on AMX tiles (the amx path's SIMD loops).
inline bool amx_tiles() { return path_isa() == Isa::kAmx && !portable_loops(); }
// bf16 products on AVX512-BF16 dot products: the avx512 path on a CPU that has them.
inline bool dot_bf16_tiles() { return path_isa() == Isa::kAvx512 && !portable_loops() && avx512_bf16_usable(); }

// Force path `name` ("portable", "avx2", "avx512", "amx"); its SIMD loops must run on this
// CPU unless `portable` asks for the portable loops at that path's geometry.
inline void set_path(const std::string& name, bool portable) {
  Isa isa;
  if (name == "portable") isa = Isa::kPortable;
  else if (name == "avx2") isa = Isa::kAvx2;
  else if (name == "avx512") isa = Isa::kAvx512;
  else if (name == "amx") isa = Isa::kAmx;
  else throw std::invalid_argument("unknown CPU ISA '" + name + "'; expected portable, avx2, avx512 or amx");
  if (!portable && int(isa) > int(cpu_isa())) {
    throw std::invalid_argument(std::string("this CPU cannot run the ") + name + " kernels (the best it runs is " +
                                isa_name(cpu_isa()) + ")");
  }
  path_state() = int(isa) * 2 + (portable ? 1 : 0);
}

// Which bf16 products an extension has: none (bf16 widened to fp32), AVX512-BF16 dot products
// on the avx512 path, or those and AMX tiles on the amx path.
enum class Bf16Products { kNone, kDot, kDotAndAmx };

// What runs now: "avx512f+amx" (AVX-512 fp32, AMX bf16) or "avx512f+avx512_bf16" (bf16 on dot
// products; only an extension with such bf16 products says either), "avx512f", "avx2-fma",
// "portable", or "portable-wide" (portable loops, AVX-512 tiles).
inline std::string path_name(Bf16Products bf16) {
  if (amx_tiles() && bf16 == Bf16Products::kDotAndAmx) return "avx512f+amx";
  if (dot_bf16_tiles() && bf16 != Bf16Products::kNone) return "avx512f+avx512_bf16";
  if (!portable_loops()) return wide_tiles() ? "avx512f" : "avx2-fma";
  return wide_tiles() ? "portable-wide" : "portable";
}

// Strip width NR of the current path, as a compile-time constant: f(std::integral_constant<int, NR>).
// `width`: the columns of the output groups the strips cover (a block's, a product's). Groups
// narrower than a wide strip (16-column blocks) take the narrow one, which would otherwise be half
// zeros; no default, so no caller can miss it.
template <typename C, typename F>
void with_strip_width(const F& f, int64_t width) {
  if (wide_tiles() && width >= kWideNR<C>) {
    f(std::integral_constant<int, kWideNR<C>>{});
  } else {
    f(std::integral_constant<int, kNR<C>>{});
  }
}

// Most rows a tile has on any path (the microkernels are compiled for 1..kMaxTileRows).
constexpr int kMaxTileRows = 12;

template <typename C, int MR, int NR, bool kRowsA>
Microkernel<C> microkernel() {
  static_assert(NR == kNR<C> || NR == kWideNR<C>, "strip width of no path");
  static_assert(MR >= 1 && MR <= kMaxTileRows, "tile rows of no path");
#ifdef SPARSEKERN_X86
  if (!portable_loops()) {
    if constexpr (NR == kWideNR<C>) {
      return &microkernel_avx512<C, MR, kRowsA>;
    } else {
      if (wide_tiles()) return &microkernel_avx512_narrow<C, MR, kRowsA>;  // a narrow strip on AVX-512
      // AVX2 holds 6 rows of two-ymm accumulators (tile_rows); more would spill.
      if constexpr (MR <= kMR) return &microkernel_avx2<C, MR, kRowsA>;
      throw std::logic_error("no AVX2 microkernel has more than 6 rows");
    }
  }
#endif
  return &microkernel_portable<C, MR, NR, kRowsA>;
}

// Rows of a tile on the current path: 6 on AVX2 (12 of 16 ymm accumulate), 12 on AVX-512
// (wide strips: 24 of 32 zmm, 24 FMAs per 14 loads instead of 12 per 8; narrow strips, one zmm
// a row: 6 rows left 6 FMA chains, fewer than 2 ports x 4 cycles of latency keep busy).
inline int tile_rows() { return wide_tiles() ? kMaxTileRows : kMR; }

// Rows of a tile whose A rows (read in place, one element of each per K step) lie `stride`
// bytes apart: tile_rows(), or fewer where more would share an L1 set (common/cache_sets.h).
inline int tile_rows(int64_t stride) { return rows_within_ways(tile_rows(), stride); }

// The Python functions of every extension on these microkernels (Module: pybind11::module).
// bf16: the extension's bf16 products beside the widening ones.
template <typename Module>
void def_path_controls(Module& m, Bf16Products bf16 = Bf16Products::kNone) {
  m.def("isa", [bf16] { return path_name(bf16); },
        "what runs: 'avx512f+amx', 'avx512f+avx512_bf16', 'avx512f', 'avx2-fma', 'portable' or 'portable-wide'");
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); }, "the best path this CPU runs");
  m.def("set_isa", &set_path,
        "force a path: 'portable', 'avx2', 'avx512' or 'amx' (portable loops if the flag is set)");
  m.def("tile_rows", [](int64_t stride) { return tile_rows(stride); },
        "rows of a tile that reads rows of A `stride` bytes apart, on the current path");
}

// Tiles (first, rows) covering `rows` rows (a block's rows for dW, an output row's pixels for
// the conv gathers): ceil(rows / max_rows) tiles of near-equal height (32 -> 11, 11, 10 and
// 16 -> 8, 8 at 12; 16 -> 6, 5, 5 at 6), so no tile runs the microkernel with 1-2 rows.
inline std::vector<std::pair<int64_t, int>> row_tiles(int64_t rows, int max_rows) {
  std::vector<std::pair<int64_t, int>> tiles;
  const int64_t n = (rows + max_rows - 1) / max_rows;
  for (int64_t i = 0, first = 0; i < n; ++i) {
    const int height = int(rows / n + (i < rows % n ? 1 : 0));
    tiles.emplace_back(first, height);
    first += height;
  }
  return tiles;
}

template <int... R, typename F>
void with_rows_of(int rows, const F& f, std::integer_sequence<int, R...>) {
  ((rows == R + 1 ? f(std::integral_constant<int, R + 1>{}) : void()), ...);
}

// f(std::integral_constant<int, mr>{}): a row count as a compile-time constant, 1..kMaxRows
// (any other mr runs as kMaxRows).
template <int kMaxRows, typename F>
void with_rows(int mr, const F& f) {
  with_rows_of(mr >= 1 && mr <= kMaxRows ? mr : kMaxRows, f, std::make_integer_sequence<int, kMaxRows>{});
}

// Microkernel for a tile of `mr` (1..tile_rows) rows.
template <typename C, int NR, bool kRowsA>
Microkernel<C> microkernel_rows(int mr) {
  Microkernel<C> kernel = nullptr;
  with_rows<kMaxTileRows>(mr, [&](auto rows) { kernel = microkernel<C, decltype(rows)::value, NR, kRowsA>(); });
  return kernel;
}

// Most rows of a narrow-strip (kNR) tile on the AVX-512 geometry over a k-major packed A (the
// packed-row panels, dW's dYᵀ): one zmm accumulator a row, 24 of the 32.
constexpr int kMaxNarrowRows = 24;

// The narrow strip's tile of `mr` rows (1..kMaxNarrowRows) over a k-major packed A on the
// AVX-512 geometry: its SIMD loops, or the portable ones where those run.
template <typename C>
Microkernel<C> narrow_packed_kernel(int mr) {
  Microkernel<C> kernel = nullptr;
  with_rows<kMaxNarrowRows>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    kernel = &microkernel_portable<C, R, kNR<C>, false>;
#ifdef SPARSEKERN_X86
    if (!portable_loops()) kernel = &microkernel_avx512_narrow<C, R, false>;
#endif
  });
  return kernel;
}

// Whether tiles over a k-major packed A (dW's dYᵀ) in strips of NR columns take the narrow
// kernel's rows: narrow strips on the AVX-512 geometry hold one zmm accumulator a row, so a
// 16-row block is one tile (16 FMA chains, one B load per 16 FMAs) rather than two of 8.
template <typename C, int NR>
bool narrow_packed_tiles() {
  return NR == kNR<C> && wide_tiles();
}

// Rows of such a tile: up to kMaxNarrowRows where narrow_packed_tiles, else tile_rows().
template <typename C, int NR>
int packed_tile_rows() {
  return narrow_packed_tiles<C, NR>() ? kMaxNarrowRows : tile_rows();
}

// The microkernel for such a tile of `mr` rows (1..packed_tile_rows<C, NR>()).
template <typename C, int NR>
Microkernel<C> packed_tile_kernel(int mr) {
  return narrow_packed_tiles<C, NR>() ? narrow_packed_kernel<C>(mr) : microkernel_rows<C, NR, false>(mr);
}

#ifdef SPARSEKERN_X86
// copy_row_tile for fp32 on AVX-512F: each token's mr (<= 32) values as masked 16-lane moves.
// With copy_strip_rows_avx512 below, dW's packing on a Xeon (2 threads, 2048 x 4096 x 4096):
// block 32 3 % faster at density 0.05, block 16 7-8 % at 0.1 and 0.05.
SPARSEKERN_AVX512 inline void copy_row_tile_avx512(float* dst, const float* src, int64_t ld, int64_t t0, int64_t t1,
                                                   int mr) {
  const __mmask16 m0 = __mmask16(mr >= 16 ? 0xFFFF : (1u << mr) - 1), m1 = __mmask16(mr > 16 ? (1u << (mr - 16)) - 1 : 0);
  for (int64_t m = t0; m < t1; ++m) {
    _mm512_mask_storeu_ps(dst + m * mr, m0, _mm512_maskz_loadu_ps(m0, src + m * ld));
    if (m1) _mm512_mask_storeu_ps(dst + m * mr + 16, m1, _mm512_maskz_loadu_ps(m1, src + m * ld + 16));
  }
}

// dst[m * NR + n] = src[m * ld + n] for tokens m in [t0, t1), n < NR (a multiple of 16): a packed
// strip's rows (X's columns for dW, dX's values) as whole-vector moves, not a memmove call per row.
template <int NR>
SPARSEKERN_AVX512 void copy_strip_rows_avx512(float* dst, const float* src, int64_t ld, int64_t t0, int64_t t1) {
  for (int64_t m = t0; m < t1; ++m) {
    for (int h = 0; h < NR / 16; ++h) _mm512_storeu_ps(dst + m * NR + 16 * h, _mm512_loadu_ps(src + m * ld + 16 * h));
  }
}
#endif

// Whether the fp32 AVX-512 copies and packings run (the AVX-512 geometry's SIMD loops).
inline bool simd_copies() { return wide_tiles() && !portable_loops(); }

// dst[m * mr + i] = src[m * ld + i] for tokens m in [t0, t1), i < mr (<= kMaxNarrowRows): one k-major
// row tile of the A operand (dYᵀ for dW), with the row count constant so the copy vectorises.
template <typename C>
void copy_row_tile(C* dst, const C* src, int64_t ld, int64_t t0, int64_t t1, int mr) {
#ifdef SPARSEKERN_X86
  if constexpr (std::is_same<C, float>::value) {
    if (simd_copies()) return copy_row_tile_avx512(dst, src, ld, t0, t1, mr);
  }
#endif
  with_rows<kMaxNarrowRows>(mr, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    for (int64_t m = t0; m < t1; ++m) {
      for (int i = 0; i < R; ++i) dst[m * R + i] = src[m * ld + i];
    }
  });
}

}  // namespace common
}  // namespace sparsekern
