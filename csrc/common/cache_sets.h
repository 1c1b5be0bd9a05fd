// L1 set aliasing of tiles that read rows of a matrix in place.
//
// A register tile reads one element of each of its rows per K step. Rows a multiple of
// 4 KiB apart (K = 1024, 2048, 4096 fp32; 2048, 4096 bf16) fall into one L1 set, so a
// tile of more rows than the L1 has ways evicts its own lines every step: on a Zen 4
// (8 ways) the fp32 block-16 forward at K = 4096 ran 125 GFLOP/s with 12-row tiles and
// 182 with 8, the low-rank x V product 14 % faster. The products cap their tile rows
// at what the set holds.
#pragma once

#include <algorithm>
#include <cstdint>

#include <unistd.h>

namespace sparsekern {
namespace common {

// The L1 data cache as far as aliasing goes: ways, line size, and the distance at which two
// addresses share a set (sets x line). glibc reads them from CPUID; 8 ways of 64 sets of
// 64 B (Zen, Skylake) where it cannot.
struct L1Sets { int64_t ways, line, span; };

inline const L1Sets& l1_sets() {
  static const L1Sets l1 = [] {
#if defined(_SC_LEVEL1_DCACHE_ASSOC) && defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL1_DCACHE_LINESIZE)
    const long size = sysconf(_SC_LEVEL1_DCACHE_SIZE), ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC),
               line = sysconf(_SC_LEVEL1_DCACHE_LINESIZE);
    if (size > 0 && ways > 0 && line > 0 && size % (ways * line) == 0) return L1Sets{ways, line, size / ways};
#endif
    return L1Sets{8, 64, 4096};
  }();
  return l1;
}

// Bytes of the last-level (L3) cache glibc reports, 0 where it reports none.
inline int64_t l3_bytes() {
#ifdef _SC_LEVEL3_CACHE_SIZE
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}

// Most of `rows` rows `stride` bytes apart whose same-column elements share one L1 set.
inline int64_t rows_per_set(int rows, int64_t stride, const L1Sets& l1) {
  int64_t most = 0;
  for (int i = 0; i < rows; ++i) {
    int64_t same = 0;
    for (int j = 0; j < rows; ++j) {
      same += (int64_t(i) * stride % l1.span) / l1.line == (int64_t(j) * stride % l1.span) / l1.line;
    }
    most = std::max(most, same);
  }
  return most;
}

// The most rows, up to `rows`, `stride` bytes apart that no L1 set holds more of than it has ways.
inline int rows_within_ways(int rows, int64_t stride) {
  const L1Sets& l1 = l1_sets();
  while (rows > 1 && rows_per_set(rows, stride, l1) > l1.ways) --rows;
  return rows;
}

// A stride of at least `bytes` for blocks of which `parts` consecutive ones are read together:
// whole lines, each block starting span / parts further along the L1's sets than the one
// before (at a multiple of the set span, the same offset of every block falls into one set).
inline int64_t staggered_stride(int64_t bytes, int64_t parts) {
  const L1Sets& l1 = l1_sets();
  const int64_t shift = std::max(l1.line, l1.span / parts / l1.line * l1.line);
  return (bytes + l1.span - 1) / l1.span * l1.span + shift;
}

}  // namespace common
}  // namespace sparsekern
