// AMX (Advanced Matrix Extensions) bf16 tiles, shared by the bf16 products, and the same
// 32 x 32 tile step on AVX512-BF16 dot products for CPUs without AMX.
//
// One register-blocked step: a 32 x 32 fp32 output tile held in four tile registers
// (2 x 2 of 16 x 16), fed per 32-deep K step by two A tiles (16 rows x 32 bf16, read
// in place from a row-major matrix) and two B tiles (16 rows of 16 VNNI pairs: the
// bf16 layout TDPBF16PS wants, B[k][n] at row k / 2, element 2n + k % 2). Four
// TDPBF16PS per step: 32 x 32 x 32 multiply-adds for 4 KiB of tile loads, so one of
// the two operands must stay in L1 for the tile unit to be fed.
//
// Tile state is per thread: a worker configures the eight tiles (all 16 rows x 64
// bytes) once for a run of steps (AmxTiles) and releases them after. Linux hands the
// tile state to a process only on request (arch_prctl), made once at first use.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "common/cache_sets.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SPARSEKERN_AMX_BUILD 1
#define SPARSEKERN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#define SPARSEKERN_DOT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace sparsekern {
namespace common {

using bf16 = c10::BFloat16;

constexpr int kAmxTile = 32;          // output tile and K step of amx_tile_32x32

// The CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the tile state.
inline bool amx_bf16_usable() {
#ifdef SPARSEKERN_AMX_BUILD
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), dot_bf16 = d & (1u << 22);
    // avx512bf16 (leaf 7 subleaf 1, eax bit 5) rounds the fp32 tiles back to bf16.
    unsigned a1, b1, c1, d1;
    if (!tile || !dot_bf16 || !__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !(a1 & (1u << 5))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

// The CPU has AVX-512F/BW/VL and AVX512-BF16 (VDPBF16PS; leaf 7 subleaf 1, eax bit 5).
inline bool avx512_bf16_usable() {
#ifdef SPARSEKERN_AMX_BUILD
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return usable;
#else
  return false;
#endif
}

#ifdef SPARSEKERN_AMX_BUILD
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The shape of a tile step's eight tiles: tiles 0-3 hold C, 4-5 A, 6-7 B.
struct TileShape {
  int c_cols, a_cols, b_rows;  // fp32 columns of a C tile, bf16 columns (K) of an A tile, pair rows of B
};
constexpr TileShape kFullTiles{16, 32, 16};   // amx_tile_32x32 and amx_tile_16x16
constexpr TileShape kHalfDepth{16, 16, 8};    // amx_strip_32x16: K steps of 16

// Configures this thread's eight tiles (16 rows, or `b_rows` for B) while alive.
class AmxTiles {
 public:
  SPARSEKERN_AMX explicit AmxTiles(TileShape shape = kFullTiles) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = uint16_t(t < 4 ? 4 * shape.c_cols : t < 6 ? 2 * shape.a_cols : 64);
      config.rows[t] = uint8_t(t < 6 ? 16 : shape.b_rows);
    }
    // GCC models LDTILECFG as reading one byte: without this barrier it drops the stores above.
    __asm__ __volatile__("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
  }
  SPARSEKERN_AMX ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// c (32 x 32 fp32, row stride ldc) = [c +] sum_j A_j B_j over `steps` K steps of 32:
//   A_j = a + a_off[j]: 32 rows x 32 bf16, row stride lda (elements);
//   B_j = b + j * b_step: VNNI, 16 rows of 64 bf16 (columns 0-15, then 16-31), row stride ldb.
SPARSEKERN_AMX inline void amx_tile_32x32(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                          int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                          bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * ldc, sc);
    _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    const bf16* aj = a + a_off[j];
    _tile_loadd(4, aj, sa);
    _tile_loadd(5, aj + 16 * lda, sa);
    _tile_loadd(6, b, sb);
    _tile_loadd(7, b + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * ldc, sc);
  _tile_stored(3, c + 16 * ldc + 16, sc);
}

// Blocks of a multiple of 16 that are not whole 32 x 32 tiles, on the same tiles at half the
// width and depth (tiles configured with kHalfDepth): c (32 x 16 fp32) = [c +] sum_j A_j B_j over
// K steps of 16, A_j = a + a_off[j] (32 rows x 16 bf16, row stride lda), B_j = b + j * b_step
// (VNNI, 8 rows of 32 bf16: 16 columns, row stride ldb). Two TDPBF16PS per step: a half-depth
// product takes the tile unit about as long as a full one, so this runs at about half
// amx_tile_32x32's rate, several times the fp32 kernels' that blocks of 16 would widen to.
SPARSEKERN_AMX inline void amx_strip_32x16(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                           int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                           bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16 * ldc, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    const bf16* aj = a + a_off[j];
    _tile_loadd(4, aj, sa);
    _tile_loadd(5, aj + 16 * lda, sa);
    _tile_loadd(6, b, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16 * ldc, sc);
}

// dW's 16 x 16 tiles of such blocks (tiles configured with kFullTiles): c (16 x 16 fp32) =
// [c +] sum_j A_j B_j over K steps of 32, A_j 16 rows x 32 bf16, B_j VNNI 16 rows of 32 bf16.
SPARSEKERN_AMX inline void amx_tile_16x16(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                          int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                          bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
  } else {
    _tile_zero(0);
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    _tile_loadd(4, a + a_off[j], sa);
    _tile_loadd(6, b, sb);
    _tile_dpbf16ps(0, 4, 6);
  }
  _tile_stored(0, c, sc);
}

// The dot_rows contract on AMX for the conv products' tiles (R <= 16 pixels or channels of a
// block): c (R x 16 NV fp32) [+]= sum over `steps` K steps of 2 KP of A (R rows lda apart, step j
// at a + a_off[j]) times B (VNNI, KP pair rows ldb apart, step j at b + j * b_step). The tiles
// are configured for R rows on each call and released after it: tile shapes differ between the
// calls of one output row (its last, shorter tile), and a call runs a block's taps, dozens of
// tile products.
template <int R, int NV, int KP>
SPARSEKERN_AMX void amx_rows(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                             int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate) {
  static_assert(R >= 1 && R <= 16 && (NV == 1 || NV == 2) && (KP == 8 || KP == 16), "tiles of the conv products");
  TileConfig config;
  for (int t = 0; t < NV; ++t) {
    config.colsb[t] = 64, config.rows[t] = R;              // C: R rows of 16 fp32
    config.colsb[6 + t] = 64, config.rows[6 + t] = KP;     // B: KP pair rows of 16 columns
  }
  config.colsb[4] = uint16_t(4 * KP), config.rows[4] = R;  // A: R rows of 2 KP bf16
  __asm__ __volatile__("" : : "r"(&config) : "memory");   // see AmxTiles
  _tile_loadconfig(&config);
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (NV == 2) _tile_loadd(1, c + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NV == 2) _tile_zero(1);
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    _tile_loadd(4, a + a_off[j], sa);
    _tile_loadd(6, b, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NV == 2) {
      _tile_loadd(7, b + 32, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NV == 2) _tile_stored(1, c + 16, sc);
  _tile_release();
}

// Rows [0, R) of amx_tile_32x32's step on VDPBF16PS (each fp32 lane += the two products of
// a bf16 pair): 2R accumulators of 16 lanes (R = 12: 24 of the 32 zmm), per K pair two B
// vectors (VNNI row k / 2: the pair words of columns 0-15 and 16-31) against R broadcast
// A pairs, so 14 loads feed 24 dot products. NV = 1: a strip of 16 columns (one B vector a
// pair, R accumulators); KP: K pairs a step (16: K steps of 32; 8: of 16, 16-channel blocks).
template <int R, int NV = 2, int KP = 16>
SPARSEKERN_DOT_BF16 inline void dot_rows(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                         int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                         bool accumulate) {
  static_assert(NV == 1 || NV == 2, "strips of 16 or 32 columns");
  __m512 acc[R][NV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    const bf16* aj = a + a_off[j];
    for (int k2 = 0; k2 < KP; ++k2) {
      __m512bh bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + k2 * ldb + 32 * v);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, aj + r * lda + 2 * k2, sizeof pair);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
  }
}

// amx_tile_32x32's contract (same operands, same layouts) on AVX512-BF16 dot products:
// the 32 rows in register blocks of 12, 12 and 8, or of 8 where 12 rows of A would share
// an L1 set (`eights`; see common/cache_sets.h).
SPARSEKERN_DOT_BF16 inline void dot_tile_32x32(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                              int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                              bool accumulate, bool eights = false) {
  if (eights) {
    for (int r = 0; r < 32; r += 8) {
      dot_rows<8>(a + r * lda, lda, a_off, b, ldb, b_step, steps, c + r * ldc, ldc, accumulate);
    }
    return;
  }
  dot_rows<12>(a, lda, a_off, b, ldb, b_step, steps, c, ldc, accumulate);
  dot_rows<12>(a + 12 * lda, lda, a_off, b, ldb, b_step, steps, c + 12 * ldc, ldc, accumulate);
  dot_rows<8>(a + 24 * lda, lda, a_off, b, ldb, b_step, steps, c + 24 * ldc, ldc, accumulate);
}

// The engines of the bf16 products: a worker constructs one for a run of tile steps.
struct AmxEngine {  // AMX tiles, configured while the engine lives
  AmxTiles tiles;
  template <typename... Args>
  void tile(Args... args) { amx_tile_32x32(args...); }
};
struct AmxStripEngine {  // amx_strip_32x16: forward and dX of blocks of a multiple of 16
  AmxTiles tiles{kHalfDepth};
  template <typename... Args>
  void tile(Args... args) { amx_strip_32x16(args...); }
};
struct AmxEngine16 {  // amx_tile_16x16: dW of the same blocks
  AmxTiles tiles;
  template <typename... Args>
  void tile(Args... args) { amx_tile_16x16(args...); }
};
struct DotEngine {  // AVX512-BF16 dot products (CPUs without AMX)
  int64_t lda = -1;     // A's row stride the block size below was chosen for
  bool eights = false;  // register blocks of 8 rows
  template <typename... Args>
  void tile(const bf16* a, int64_t a_stride, Args... args) {
    if (a_stride != lda) {
      lda = a_stride;
      eights = rows_within_ways(12, a_stride * int64_t(sizeof(bf16))) < 12;
    }
    dot_tile_32x32(a, a_stride, args..., eights);
  }
};
// A 16 x 16 tile step on dot products, the same contract at TW = 16 (B's pair rows of 16
// columns): two register blocks of 8 rows, eight dot-product chains each.
struct DotEngine16 {
  SPARSEKERN_DOT_BF16 void tile(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                                int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate) {
    dot_rows<8, 1>(a, lda, a_off, b, ldb, b_step, steps, c, ldc, accumulate);
    dot_rows<8, 1>(a + 8 * lda, lda, a_off, b, ldb, b_step, steps, c + 8 * ldc, ldc, accumulate);
  }
};

// out[i * ldo + n] = bf16(c[i * 16 NV + n] (+ bias[n])) for rows i < rows, n < 16 NV (round to
// nearest even): NV = 2, tiles of 32 columns; NV = 1, of 16.
template <int NV = 2>
SPARSEKERN_DOT_BF16 inline void store_tile_bf16(const float* c, int64_t rows, const bf16* bias, bf16* out,
                                                int64_t ldo) {
  alignas(64) float widened[16 * NV] = {};
  if (bias) {
    for (int n = 0; n < 16 * NV; ++n) widened[n] = float(bias[n]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int v = 0; v < NV; ++v) {
      const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(c + (i * NV + v) * 16), _mm512_load_ps(widened + 16 * v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ldo + 16 * v), (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}
#endif

}  // namespace common
}  // namespace sparsekern
