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

constexpr int kAmxTile = 32;          // output tile and K step of amx_tile_step<2, 2>

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

// The shape of a tile step's eight tiles (0-3 hold C, 4-5 A, 6-7 B): C and A tiles of `rows`
// rows, a K step of `depth` bf16 (A tiles `depth` columns, B tiles depth / 2 pair rows), C and
// B tiles 16 columns.
struct TileShape {
  int rows = 16, depth = 32;
};
constexpr TileShape kHalfDepth{16, 16};  // K steps of 16

// Configures this thread's eight tiles to `shape` while alive.
class AmxTiles {
 public:
  SPARSEKERN_AMX explicit AmxTiles(TileShape shape = {}) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = uint16_t(t < 4 || t >= 6 ? 64 : 2 * shape.depth);
      config.rows[t] = uint8_t(t < 6 ? shape.rows : shape.depth / 2);
    }
    // GCC models LDTILECFG as reading one byte: without this barrier it drops the stores above.
    __asm__ __volatile__("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
  }
  SPARSEKERN_AMX ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// One tile step: c (16 RT rows x 16 NT fp32 columns, row stride ldc) = [c +] sum_j A_j B_j over
// `steps` K steps of the configured depth (32, or 16 with kHalfDepth):
//   A_j = a + a_off[j]: 16 RT rows, row stride lda (elements), in RT tiles of 16 rows;
//   B_j = b + j * b_step: VNNI pair rows, row stride ldb, columns 0-15 (then 16-31 at b + 32).
// C tile 2 r + n holds rows 16 r.., columns 16 n..; A tiles are 4 + r, B tiles 6 + n. RT = NT = 2
// is the 32 x 32 step of 32 x 32 blocks; 2 x 1 the strips of other multiples of 16 (half
// depth: about half the full step's rate, several times that of the fp32 kernels those
// blocks would widen to); 1 x 1 their dW tiles and, with NT = 2, the conv rows (amx_rows).
template <int RT, int NT>
SPARSEKERN_AMX inline void amx_tile_step(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b,
                                         int64_t ldb, int64_t b_step, int64_t steps, float* c, int64_t ldc,
                                         bool accumulate) {
  static_assert((RT == 1 || RT == 2) && (NT == 1 || NT == 2), "1 or 2 tiles each way");
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (NT == 2) _tile_loadd(1, c + 16, sc);
    if constexpr (RT == 2) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (RT == 2 && NT == 2) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (RT == 2) _tile_zero(2);
    if constexpr (RT == 2 && NT == 2) _tile_zero(3);
  }
  for (int64_t j = 0; j < steps; ++j, b += b_step) {
    const bf16* aj = a + a_off[j];
    _tile_loadd(4, aj, sa);
    if constexpr (RT == 2) _tile_loadd(5, aj + 16 * lda, sa);
    _tile_loadd(6, b, sb);
    if constexpr (NT == 2) _tile_loadd(7, b + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  if constexpr (NT == 2) _tile_stored(1, c + 16, sc);
  if constexpr (RT == 2) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (RT == 2 && NT == 2) _tile_stored(3, c + 16 * ldc + 16, sc);
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
  AmxTiles tiles(TileShape{R, 2 * KP});
  amx_tile_step<1, NV>(a, lda, a_off, b, ldb, b_step, steps, c, ldc, accumulate);
}

// Rows [0, R) of amx_tile_step<2, 2> on VDPBF16PS (each fp32 lane += the two products of
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

// amx_tile_step<2, 2>'s contract (same operands, same layouts) on AVX512-BF16 dot products:
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

// The engines of the bf16 products: a worker constructs one for a run of tile steps. kWidth:
// the output columns of a step (its packed B's), kDepth: its K step in the forward and dX
// (dW's K steps are 32 tokens on every engine).
struct AmxEngine {  // AMX tiles, configured while the engine lives: the 32 x 32 step
  static constexpr int kWidth = 32, kDepth = 32;
  AmxTiles tiles;
  template <typename... Args>
  void tile(Args... args) { amx_tile_step<2, 2>(args...); }
};
struct AmxStripEngine {  // 32 x 16 strips at half depth: forward and dX of blocks of a multiple of 16
  static constexpr int kWidth = 16, kDepth = 16;
  AmxTiles tiles{kHalfDepth};
  template <typename... Args>
  void tile(Args... args) { amx_tile_step<2, 1>(args...); }
};
struct AmxEngine16 {  // 16 x 16 tiles at K steps of 32: dW of the same blocks
  static constexpr int kWidth = 16, kDepth = 32;
  AmxTiles tiles;
  template <typename... Args>
  void tile(Args... args) { amx_tile_step<1, 1>(args...); }
};
struct DotEngine {  // AVX512-BF16 dot products (CPUs without AMX)
  static constexpr int kWidth = 32, kDepth = 32;
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
  static constexpr int kWidth = 16, kDepth = 32;
  SPARSEKERN_DOT_BF16 void tile(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                                int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate) {
    dot_rows<8, 1>(a, lda, a_off, b, ldb, b_step, steps, c, ldc, accumulate);
    dot_rows<8, 1>(a + 8 * lda, lda, a_off, b, ldb, b_step, steps, c + 8 * ldc, ldc, accumulate);
  }
};

// out[i * ldo + n] = bf16(c[i * 16 NV + n] (+ bias[n])) for rows i < rows, n < 16 NV (round to
// nearest even): NV = 2, tiles of 32 columns; NV = 1, of 16. stream: non-temporal stores for
// rows that are whole 64-byte lines (NV = 2, line-aligned), for an output too large to stay
// cached (the caller fences, stream_fence, before another thread reads it). Half lines are
// stored plainly: streamed, the 16-column tiles' forward at density 0.1 ran 376 GFLOP/s
// instead of 568 (each partial line is written back on its own).
template <int NV = 2>
SPARSEKERN_DOT_BF16 inline void store_tile_bf16(const float* c, int64_t rows, const bf16* bias, bf16* out,
                                                int64_t ldo, bool stream = false) {
  alignas(64) float widened[16 * NV] = {};
  if (bias) {
    for (int n = 0; n < 16 * NV; ++n) widened[n] = float(bias[n]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const bool line = NV == 2 && stream && reinterpret_cast<uintptr_t>(out + i * ldo) % 64 == 0;
    for (int v = 0; v < NV; ++v) {
      const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(c + (i * NV + v) * 16), _mm512_load_ps(widened + 16 * v));
      __m256i* dst = reinterpret_cast<__m256i*>(out + i * ldo + 16 * v);
      if (line) {
        _mm256_stream_si256(dst, (__m256i)_mm512_cvtneps_pbh(sum));
      } else {
        _mm256_storeu_si256(dst, (__m256i)_mm512_cvtneps_pbh(sum));
      }
    }
  }
}
#endif

}  // namespace common
}  // namespace sparsekern
