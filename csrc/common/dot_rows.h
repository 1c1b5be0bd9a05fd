// The AVX512-BF16 dot-product tile steps (common::dot_rows) as run-time-selected kernels, shared
// by the products that run bf16 blocks of a multiple of 16 on them (conv; block-sparse linear
// where a block side is not a multiple of 32): B packed in VNNI pairs (B(k, n) at pair row
// k / 2, element 2n + k % 2) in strips of NR = 16 or 32 columns, A read with its K pairs adjacent.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/amx.h"
#include "common/microkernel.h"

namespace sparsekern {
namespace common {

// The strip width of the dot products for blocks of `block` columns (a multiple of 16).
inline int dot_strip(int64_t block) { return block % 32 == 0 ? 32 : 16; }

// Element of B(k, n) in a VNNI-packed strip of NR columns.
template <int NR>
int64_t vnni_index(int64_t k, int64_t n) { return (k >> 1) * 2 * NR + 2 * n + (k & 1); }

// dot_rows<R, NR / 16, KP>: c (R x NR fp32, row stride ldc) [+]= sum over `steps` K steps of
// 2 KP: A (rows lda apart, step j at a + a_off[j]) times B (step j at b + j * b_step, pair rows ldb apart).
using DotRows = void (*)(const bf16* a, int64_t lda, const int64_t* a_off, const bf16* b, int64_t ldb,
                         int64_t b_step, int64_t steps, float* c, int64_t ldc, bool accumulate);

#ifdef SPARSEKERN_AMX_BUILD
template <int NR, int KP, int... R>
DotRows dot_rows_of(int rows, std::integer_sequence<int, R...>) {
  DotRows table[] = {&dot_rows<R + 1, NR / 16, KP>...};
  return table[rows - 1];
}
template <int NR, int KP, int... R>
DotRows amx_rows_of(int rows, std::integer_sequence<int, R...>) {
  DotRows table[] = {&amx_rows<R + 1, NR / 16, KP>...};
  return table[rows - 1];
}
#endif

// Most rows of a bf16 tile step on any path: an AMX tile's 16 (the dot products stop at kMaxTileRows).
constexpr int kMaxBf16TileRows = 16;

// Rows of the bf16 tile steps on the current path: AMX tiles take 16 (an output row of 16 pixels
// in one tile, not two of 8), dot products `dot_rows` (their register and L1 limits).
inline int bf16_tile_rows(int dot_rows) { return amx_tiles() ? kMaxBf16TileRows : dot_rows; }

// The bf16 tile step of the path for `rows` rows (1 <= rows <= bf16_tile_rows), NR columns, K
// steps of 2 KP: AMX tiles on the amx path, AVX512-BF16 dot products on the avx512 path.
template <int NR, int KP>
DotRows dot_rows_kernel(int rows) {
#ifdef SPARSEKERN_AMX_BUILD
  if (rows >= 1 && rows <= bf16_tile_rows(kMaxTileRows)) {
    return amx_tiles() ? amx_rows_of<NR, KP>(rows, std::make_integer_sequence<int, kMaxBf16TileRows>{})
                       : dot_rows_of<NR, KP>(rows, std::make_integer_sequence<int, kMaxTileRows>{});
  }
#endif
  throw std::logic_error("no bf16 tile step of this many rows on this build");
}

// The tile steps for `tiles` (first, rows): the dot products (K steps of 2 KP) with kPairs, else
// the microkernels of C (A's rows read in place with kRowsA, else packed k-major: packed_tile_kernel).
template <typename C, int NR, bool kPairs, bool kRowsA, int KP>
auto tile_kernels(const std::vector<std::pair<int64_t, int>>& tiles) {
  std::vector<std::conditional_t<kPairs, DotRows, Microkernel<C>>> kernels;
  for (const auto& tile : tiles) {
    if constexpr (kPairs) {
      kernels.push_back(dot_rows_kernel<NR, KP>(tile.second));
    } else if constexpr (kRowsA) {
      kernels.push_back(microkernel_rows<C, NR, true>(tile.second));
    } else {
      kernels.push_back(packed_tile_kernel<C, NR>(tile.second));
    }
  }
  return kernels;
}

// f(std::integral_constant<int, NR>) for the strips of a product over `width` columns: the dot
// products' (dot_strip) with kPairs, else the widest strip of C the path has.
template <typename C, bool kPairs, typename F>
void with_strips(int64_t width, const F& f) {
  if constexpr (kPairs) {
    if (dot_strip(width) == 32) {
      f(std::integral_constant<int, 32>{});
    } else {
      f(std::integral_constant<int, 16>{});
    }
  } else {
    with_strip_width<C>(f, width);
  }
}

}  // namespace common
}  // namespace sparsekern
