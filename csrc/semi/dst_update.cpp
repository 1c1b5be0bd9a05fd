// The 2:4 dynamic-sparse-training update on CPU: the drop/grow decision and the new compressed
// structure in a few passes over the layer, instead of ~30 plain-torch passes over dense tensors.
// Dispatcher ops (fakes in sparsekern/kernels/semi/cpu.py; the plain-torch twins, which are also
// the oracle of the tests, in sparsekern/kernels/semi/dst_reference.py):
//
// sparsekern::semi_drop_grow_cpu       drop + in-group grow of a 2:4 mask -> (new mask, new weight?)
// sparsekern::semi_restructure_cpu     new 2:4 mask -> (slot map, indices, indices of the transpose?)
// sparsekern::semi_carry_cpu           tensor.flatten()[slots], zero where slots < 0
// sparsekern::semi_decompress_sum_cpu  dense sum of 2:4-compressed matrices
// sparsekern::semi_gather_kept_cpu     a dense matrix read out at the kept positions (compressed)
//
// Decisions are exactly those of the plain-torch twins (the tests compare both): the drop takes
// the n smallest scores over the whole tensor (ties: lower flat index), found by a radix histogram
// on order-preserving integer keys and a selection inside one bucket; the grow works per row group
// of 4, or per 4x4 tile over the transposable patterns that contain the tile's survivors (listed
// once per survivor set, in transposable_patterns() order; totals summed in double, ties to the
// first pattern).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/huge_page_output.h"
#include "semi/prune.h"

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sparsekern {
namespace semi {

namespace {

// Outcome of the checks the passes make on the mask (the op raises the error naming the mask).
constexpr int64_t kMaskOk = 0;
constexpr int64_t kMaskNotRows = 1;          // some group of 4 along a row does not keep exactly 2
constexpr int64_t kMaskNotTransposable = 2;  // some tile column does not keep exactly 2

// Order-preserving unsigned keys: a < b (as floats, -0 == +0) iff key(a) < key(b). Every NaN,
// of either sign (0/0 gives a negative one on x86), gets the largest key: NaNs rank after every
// number and tie among themselves, as the plain-torch rule ranks them.
// The 16 top bits of a key pick the histogram bucket of the selection below.
template <typename scalar_t>
struct Keys {
  // The unsigned integer of scalar_t's width (float: 32 bits, double: 64).
  using type = typename std::conditional<sizeof(scalar_t) == 4, uint32_t, uint64_t>::type;
  static_assert(std::is_floating_point<scalar_t>::value && sizeof(scalar_t) == sizeof(type),
                "keys are defined for IEEE float and double");
  static constexpr type kSign = type(1) << (8 * sizeof(type) - 1);
  static constexpr type kNaN = ~type(0);

  static type of(scalar_t x) {
    type b;
    x += scalar_t(0);  // -0 -> +0
    std::memcpy(&b, &x, sizeof b);
    return x != x ? kNaN : (b & kSign) ? ~b : (b | kSign);
  }
  static type of_magnitude(scalar_t x) {  // |x|: its bits already sort as the values do
    type b;
    x = std::abs(x);
    std::memcpy(&b, &x, sizeof b);
    return x != x ? kNaN : b;
  }
};

// The drop key of x: of |x| if kAbsolute (one call's keys all come from one of the two maps).
template <typename scalar_t, bool kAbsolute>
inline typename Keys<scalar_t>::type drop_key(scalar_t x) {
  return kAbsolute ? Keys<scalar_t>::of_magnitude(x) : Keys<scalar_t>::of(x);
}

// The rule "drop key index i": key < threshold, or key == threshold and i <= cut.
template <typename key_t>
struct DropRule {
  key_t threshold;
  int64_t cut;
  int operator()(key_t key, int64_t i) const {  // branch-free: the outcome is data-dependent
    return int(key < threshold) | (int(key == threshold) & int(i <= cut));
  }
};

// The k smallest of `keys` (ties: lower index) as a DropRule. k = 0 drops nothing.
template <typename key_t>
DropRule<key_t> smallest(const std::vector<key_t>& keys, int64_t k) {
  const int64_t n = int64_t(keys.size());
  if (k <= 0) return {key_t(0), -1};
  constexpr int kShift = 8 * sizeof(key_t) - 16;
  std::vector<uint32_t> hist(1 << 16, 0);  // callers stay far below 2^32 keys
  for (key_t key : keys) ++hist[key >> kShift];
  int64_t bucket = 0, before = 0;
  while (before + hist[bucket] < k) before += hist[bucket++];
  std::vector<key_t> inside;
  inside.reserve(hist[bucket]);
  for (key_t key : keys)
    if (int64_t(key >> kShift) == bucket) inside.push_back(key);
  const int64_t rank = k - before - 1;  // 0-based rank of the threshold inside the bucket
  std::nth_element(inside.begin(), inside.begin() + rank, inside.end());
  const key_t threshold = inside[rank];
  int64_t below = before, equal = 0;
  for (key_t key : inside) {
    below += key < threshold;
    equal += key == threshold;
  }
  const int64_t ties = k - below;  // >= 1 entries equal to the threshold are dropped, lowest first
  if (ties == equal) return {threshold, n};
  int64_t seen = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keys[i] == threshold && ++seen == ties) return {threshold, i};
  return {threshold, n};  // unreachable: `ties` < `equal` entries equal the threshold
}

// The transposable 4x4 patterns (bit 4 r + c) in transposable_patterns() order, each with its 8
// cells ascending, and for each 16-bit survivor set the patterns containing it, in that order
// (CSR: offsets into ids).
struct Candidates {
  std::vector<uint16_t> codes;
  std::vector<std::array<uint8_t, 8>> cells;
  std::vector<int32_t> offsets;
  std::vector<uint8_t> ids;
};

const Candidates& candidates() {
  static const Candidates table = [] {
    const at::Tensor patterns = transposable_pattern_table();
    const bool* p = patterns.data_ptr<bool>();
    Candidates out;
    const int n = int(patterns.size(0));
    out.codes.assign(n, 0);
    out.cells.resize(n);
    for (int i = 0; i < n; ++i) {
      int found = 0;
      for (int b = 0; b < 16; ++b) {
        if (!p[i * 16 + b]) continue;
        out.codes[i] |= uint16_t(1 << b);
        out.cells[i][found++] = uint8_t(b);
      }
      TORCH_CHECK(found == 8, "transposable_pattern_table: a pattern without 8 cells");
    }
    out.offsets.assign((1 << 16) + 1, 0);
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<int32_t> fill(out.offsets.begin(), out.offsets.end() - 1);
      if (pass) out.ids.resize(out.offsets.back());
      for (int i = 0; i < n; ++i) {
        const uint32_t code = out.codes[i];
        for (uint32_t sub = code;; sub = (sub - 1) & code) {  // every subset of the pattern
          if (pass) out.ids[fill[sub]++] = uint8_t(i); else ++out.offsets[sub + 1];
          if (sub == 0) break;
        }
      }
      if (!pass)
        for (size_t sub = 1; sub < out.offsets.size(); ++sub) out.offsets[sub] += out.offsets[sub - 1];
    }
    return out;
  }();
  return table;
}

// Set bits of a 16-bit code (SWAR: the build has no popcnt instruction to rely on).
inline int bit_count(int code) {
  unsigned x = unsigned(code) & 0xFFFFu;
  x = (x & 0x5555u) + (x >> 1 & 0x5555u);
  x = (x & 0x3333u) + (x >> 2 & 0x3333u);
  x = (x & 0x0F0Fu) + (x >> 4 & 0x0F0Fu);
  return int((x & 0xFFu) + (x >> 8));
}

// The 4-bit code (bit q = entry q is True) of 4 consecutive bools.
inline int group_code(const bool* a) {
  uint32_t bytes;
  std::memcpy(&bytes, a, 4);
  return int((bytes & 1) | (bytes >> 7 & 2) | (bytes >> 14 & 4) | (bytes >> 21 & 8));
}

// A 4-bit code as 4 bools.
inline void put_code(bool* a, int code) {
  const uint32_t bytes = uint32_t(code & 1) | uint32_t(code >> 1 & 1) << 8 | uint32_t(code >> 2 & 1) << 16 |
                         uint32_t(code >> 3 & 1) << 24;
  std::memcpy(a, &bytes, 4);
}

inline int low_bit(int code) { return __builtin_ctz(unsigned(code)); }
inline int high_bit(int code) { return 31 - __builtin_clz(unsigned(code)); }

template <typename scalar_t, bool kAbsolute>
inline scalar_t score_of(scalar_t x) {
  return kAbsolute ? std::abs(x) : x;
}

// Row group: add to `kept` the `2 - |kept|` free positions of largest score v (ties: lower
// position). Branch-free: one comparison per pair of positions.
template <typename scalar_t>
inline int grow_in_row(int kept, const scalar_t* v) {
  const int need = 2 - bit_count(kept);
  // lij (i < j): position j has a strictly larger score than position i
  const int l01 = v[1] > v[0], l02 = v[2] > v[0], l03 = v[3] > v[0];
  const int l12 = v[2] > v[1], l13 = v[3] > v[1], l23 = v[3] > v[2];
  const int f0 = ~kept & 1, f1 = ~kept >> 1 & 1, f2 = ~kept >> 2 & 1, f3 = ~kept >> 3 & 1;
  // free entries ahead of each position: larger, or equal at a lower position
  const int a0 = f1 * l01 + f2 * l02 + f3 * l03;
  const int a1 = f0 * (1 - l01) + f2 * l12 + f3 * l13;
  const int a2 = f0 * (1 - l02) + f1 * (1 - l12) + f3 * l23;
  const int a3 = f0 * (1 - l03) + f1 * (1 - l13) + f2 * (1 - l23);
  return kept | (f0 & (a0 < need)) | (f1 & (a1 < need)) << 1 | (f2 & (a2 < need)) << 2 | (f3 & (a3 < need)) << 3;
}

// x if keep, else +0: by masking x's bits (branch-free, exact).
template <typename scalar_t>
inline scalar_t keep_if(scalar_t x, int keep) {
  typename Keys<scalar_t>::type bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= decltype(bits)(0) - decltype(bits)(keep);
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

// The passes below take raw restrict-qualified pointers, so that their byte stores (codes, the
// bool mask) do not force the compiler to reload everything else.

// Pass 1 over row groups [g0, g1): each group's mask code and the drop keys of its two kept
// entries (flat order). False if some group does not keep exactly two.
template <typename scalar_t, bool kAbsolute>
bool collect(const bool* __restrict m, const scalar_t* __restrict d, uint8_t* __restrict codes,
             typename Keys<scalar_t>::type* __restrict keys, int64_t g0, int64_t g1) {
  bool ok = true;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int code = group_code(m + 4 * grp);
    codes[grp] = uint8_t(code);
    ok &= bit_count(code) == 2;
    const int lo = code ? low_bit(code) : 0, hi = code ? high_bit(code) : 0;
    keys[2 * grp] = drop_key<scalar_t, kAbsolute>(d[4 * grp + lo]);
    keys[2 * grp + 1] = drop_key<scalar_t, kAbsolute>(d[4 * grp + hi]);
  }
  return ok;
}

// The code of row group `grp` after the drop.
template <typename key_t>
inline int kept_code(const uint8_t* __restrict codes, const key_t* __restrict keys, const DropRule<key_t>& dropped,
                     int64_t grp) {
  const int code = codes[grp];
  const int lo = low_bit(code), hi = high_bit(code);
  return code & ~(dropped(keys[2 * grp], 2 * grp) << lo) & ~(dropped(keys[2 * grp + 1], 2 * grp + 1) << hi);
}

// Write group `grp`'s new code into the mask and, if w, the weights kept before and after.
template <typename scalar_t>
inline void store(bool* __restrict o, scalar_t* __restrict w, const scalar_t* __restrict d, int64_t grp, int code,
                  int old) {
  put_code(o + 4 * grp, code);
  if (!w) return;
  const int both = code & old;
  for (int q = 0; q < 4; ++q) w[4 * grp + q] = keep_if(d[4 * grp + q], both >> q & 1);
}

// Pass 2, row groups [g0, g1).
template <typename scalar_t, bool kAbsolute>
void grow_rows(const uint8_t* __restrict codes, const typename Keys<scalar_t>::type* __restrict keys,
               DropRule<typename Keys<scalar_t>::type> dropped, const scalar_t* __restrict d,
               const scalar_t* __restrict g, bool* __restrict o, scalar_t* __restrict w, int64_t g0, int64_t g1) {
  for (int64_t grp = g0; grp < g1; ++grp) {
    const scalar_t* s = g + 4 * grp;
    const scalar_t v[4] = {score_of<scalar_t, kAbsolute>(s[0]), score_of<scalar_t, kAbsolute>(s[1]),
                           score_of<scalar_t, kAbsolute>(s[2]), score_of<scalar_t, kAbsolute>(s[3])};
    // a group that lost nothing grows nothing
    store(o, w, d, grp, grow_in_row(kept_code(codes, keys, dropped, grp), v), codes[grp]);
  }
}

// Pass 2, the 4x4 tiles of tile rows [t0, t1). False if some tile column does not keep two.
template <typename scalar_t, bool kAbsolute>
bool grow_tiles(const uint8_t* __restrict codes, const typename Keys<scalar_t>::type* __restrict keys,
                DropRule<typename Keys<scalar_t>::type> dropped, const scalar_t* __restrict d,
                const scalar_t* __restrict g, bool* __restrict o, scalar_t* __restrict w, int64_t per_row,
                int64_t t0, int64_t t1, const Candidates& table) {
  const int64_t cols = 4 * per_row;
  const int32_t* offsets = table.offsets.data();
  const uint8_t* ids = table.ids.data();
  const uint16_t* patterns = table.codes.data();
  const std::array<uint8_t, 8>* cells = table.cells.data();
  bool ok = true;
  for (int64_t tr = t0; tr < t1; ++tr) {
    for (int64_t tc = 0; tc < per_row; ++tc) {
      const int64_t grp = 4 * tr * per_row + tc;  // the tile's first row group; the next ones + per_row
      int kept = 0, old = 0;
      for (int i = 0; i < 4; ++i) {
        kept |= kept_code(codes, keys, dropped, grp + i * per_row) << (4 * i);
        old |= codes[grp + i * per_row] << (4 * i);
      }
      for (int c = 0; c < 4; ++c) ok &= bit_count(old >> c & 0x1111) == 2;
      int best = old;
      if (kept != old) {
        // the tile's grow scores, zero where a survivor sits: a pattern's gain is the sum over its cells
        double fresh[16];
        for (int b = 0; b < 16; ++b)
          fresh[b] = keep_if(double(score_of<scalar_t, kAbsolute>(g[(4 * tr + b / 4) * cols + 4 * tc + b % 4])),
                             ~kept >> b & 1);
        double best_gain = -std::numeric_limits<double>::infinity();
        for (int32_t k = offsets[kept]; k < offsets[kept + 1]; ++k) {
          const uint8_t* cell = cells[ids[k]].data();
          double gain = 0.0;
          for (int j = 0; j < 8; ++j) gain += fresh[cell[j]];
          const bool better = gain > best_gain;  // strict: the first best pattern wins
          best_gain = better ? gain : best_gain;
          best = better ? patterns[ids[k]] : best;
        }
      }
      for (int i = 0; i < 4; ++i) store(o, w, d, grp + i * per_row, best >> (4 * i) & 15, old >> (4 * i) & 15);
    }
  }
  return ok;
}

template <typename scalar_t, bool kAbsolute>
int64_t drop_grow_impl(const at::Tensor& drop, const at::Tensor& mask, const at::Tensor& grow, int64_t n_drop,
                       bool transposable, at::Tensor& out, at::Tensor& weight) {
  using key_t = typename Keys<scalar_t>::type;
  const int64_t rows = drop.size(0), per_row = drop.size(1) / 4;
  const scalar_t* d = drop.data_ptr<scalar_t>();
  const scalar_t* g = grow.data_ptr<scalar_t>();
  const bool* m = mask.data_ptr<bool>();
  std::vector<uint8_t> codes(size_t(rows * per_row));
  std::vector<key_t> keys(size_t(rows * per_row * 2));
  std::atomic<int> bad{0};
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    if (!collect<scalar_t, kAbsolute>(m, d, codes.data(), keys.data(), r0 * per_row, r1 * per_row)) bad.fetch_or(1);
  });
  if (bad.load() & 1) return kMaskNotRows;
  const DropRule<key_t> dropped = smallest(keys, n_drop);
  bool* o = out.data_ptr<bool>();
  scalar_t* w = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
  if (!transposable) {
    at::parallel_for(0, rows * per_row, 4096, [&](int64_t g0, int64_t g1) {
      grow_rows<scalar_t, kAbsolute>(codes.data(), keys.data(), dropped, d, g, o, w, g0, g1);
    });
    return kMaskOk;
  }
  const Candidates& table = candidates();
  at::parallel_for(0, rows / 4, 4, [&](int64_t t0, int64_t t1) {
    if (!grow_tiles<scalar_t, kAbsolute>(codes.data(), keys.data(), dropped, d, g, o, w, per_row, t0, t1, table))
      bad.fetch_or(2);
  });
  return bad.load() & 2 ? kMaskNotTransposable : kMaskOk;
}

// Groups [g0, g1) of one row, one source: each group zeroed and its two values stored in
// place. Built in a register array and copied out, as below, each group would reload four
// fresh scalar stores as one vector, a store-forwarding stall: 3x slower.
template <typename scalar_t>
void decompress_groups(const scalar_t* __restrict v, const uint8_t* __restrict packed, scalar_t* __restrict o,
                       int64_t g0, int64_t g1) {
  for (int64_t grp = g0; grp < g1; ++grp) {
    scalar_t* group = o + 4 * grp;
    const int nibble = packed[grp / 2] >> ((grp & 1) * 4);
    group[0] = group[1] = group[2] = group[3] = scalar_t(0);
    group[nibble & 3] = v[2 * grp];
    group[nibble >> 2 & 3] = v[2 * grp + 1];
  }
}

#ifdef __x86_64__
// An index byte (two groups' nibbles lo | hi << 2) -> the 8-bit mask of their kept positions,
// bit 8 set where both groups are ascending (lo < hi, as restructure writes them): then the
// two values of a group land where AVX-512's expand puts them, in position order. Other
// metadata (loaded, never built here) keeps the scalar loop's meaning, the later value winning.
inline const std::array<uint16_t, 256>& expand_masks() {
  static const std::array<uint16_t, 256> table = [] {
    std::array<uint16_t, 256> t{};
    for (int b = 0; b < 256; ++b) {
      int mask = 0, ascending = 1;
      for (int half = 0; half < 2; ++half) {
        const int nibble = b >> (4 * half) & 15, lo = nibble & 3, hi = nibble >> 2;
        ascending &= lo < hi;
        mask |= ((1 << lo) | (1 << hi)) << (4 * half);
      }
      t[b] = uint16_t(mask | ascending << 8);
    }
    return t;
  }();
  return table;
}

// One row, one source, of 2- or 4-byte values: a vector of 32 (16) outputs is one masked
// expand-load of 16 (8) values, its mask from two (one) index-byte lookups per 8 groups.
template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vbmi2"))) void decompress_row_expand(
    const scalar_t* __restrict v, const uint8_t* __restrict packed, scalar_t* __restrict o, int64_t per_row) {
  static_assert(sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4, "16- or 32-bit values");
  constexpr int64_t kGroups = 64 / int64_t(sizeof(scalar_t)) / 4, kBytes = kGroups / 2;
  const std::array<uint16_t, 256>& masks = expand_masks();
  int64_t grp = 0;
  for (; grp + kGroups <= per_row; grp += kGroups) {
    uint32_t mask = 0, ascending = 1;
    for (int64_t b = 0; b < kBytes; ++b) {
      const uint16_t entry = masks[packed[grp / 2 + b]];
      mask |= uint32_t(entry & 0xff) << (8 * b);
      ascending &= entry >> 8;
    }
    if (!ascending) {
      decompress_groups(v, packed, o, grp, grp + kGroups);
    } else if constexpr (sizeof(scalar_t) == 2) {
      _mm512_storeu_si512(o + 4 * grp, _mm512_maskz_expandloadu_epi16(__mmask32(mask), v + 2 * grp));
    } else {
      _mm512_storeu_si512(o + 4 * grp, _mm512_castps_si512(_mm512_maskz_expandloadu_ps(__mmask16(mask), v + 2 * grp)));
    }
  }
  decompress_groups(v, packed, o, grp, per_row);
}
#endif

// Rows [r0, r1) of o (rows, 4 per_row) = the sum of the dense forms of the 2:4-compressed
// (values, indices) sources: a group's four sums are built in registers, then stored at once
// (one source: decompress_groups, or the expand where `expand` says).
template <typename scalar_t>
void decompress_rows(const std::vector<const scalar_t*>& values, const std::vector<const uint8_t*>& indices,
                     scalar_t* __restrict o, int64_t r0, int64_t r1, int64_t per_row, int64_t bytes,
                     bool expand) {
  if (values.size() == 1) {  // a weight decompressed for a dense GEMM
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* v = values[0] + r * 2 * per_row;
      const uint8_t* packed = indices[0] + r * bytes;
#ifdef __x86_64__
      if constexpr (sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4) {
        if (expand) {
          decompress_row_expand(v, packed, o + r * 4 * per_row, per_row);
          continue;
        }
      }
#endif
      decompress_groups(v, packed, o + r * 4 * per_row, 0, per_row);
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t grp = 0; grp < per_row; ++grp) {
      scalar_t acc[4] = {0, 0, 0, 0};
      for (size_t k = 0; k < values.size(); ++k) {
        const int nibble = indices[k][r * bytes + grp / 2] >> ((grp & 1) * 4);
        acc[nibble & 3] += values[k][r * 2 * per_row + 2 * grp];
        acc[nibble >> 2 & 3] += values[k][r * 2 * per_row + 2 * grp + 1];
      }
      std::memcpy(o + r * 4 * per_row + 4 * grp, acc, sizeof acc);
    }
  }
}

// "(rows, cols)": a shape as the Python side writes it, so both backends raise the same message.
std::string shape_of(const at::Tensor& t) {
  return "(" + std::to_string(t.size(0)) + ", " + std::to_string(t.size(1)) + ")";
}

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The n_drop smallest scores of `drop` (|drop| if absolute) leave the bool 2:4 `mask`, and each
// row group (4x4 tile if transposable) regrows what it lost by `grow`. Returns the new mask and,
// if with_weight, the new weight: `drop` where kept before and after, else zero.
std::tuple<at::Tensor, std::optional<at::Tensor>> drop_grow(const at::Tensor& drop, const at::Tensor& mask,
                                                            const at::Tensor& grow, int64_t n_drop,
                                                            bool transposable, bool absolute, bool with_weight) {
  constexpr const char* op = "semi_drop_grow_cpu";
  check_cpu_contiguous(drop, op, "drop");
  check_cpu_contiguous(mask, op, "mask");
  check_cpu_contiguous(grow, op, "grow");
  TORCH_CHECK(mask.dim() == 2 && drop.sizes() == mask.sizes() && grow.sizes() == mask.sizes(), op,
              ": drop, mask and grow must be 2-D of one shape, got ", drop.sizes(), ", ", mask.sizes(), ", ",
              grow.sizes());
  TORCH_CHECK(mask.size(1) % 4 == 0 && (!transposable || mask.size(0) % 4 == 0), op, ": mask of shape ",
              shape_of(mask), transposable ? " needs both dims multiples of 4" : " needs columns a multiple of 4");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(drop.scalar_type() == grow.scalar_type() &&
                  (drop.scalar_type() == at::kFloat || drop.scalar_type() == at::kDouble),
              op, ": scores of one dtype, float32 or float64, got ", drop.scalar_type(), " and ",
              grow.scalar_type());
  const int64_t active = mask.numel() / 2;
  TORCH_CHECK_VALUE(n_drop >= 0 && n_drop <= active, "cannot drop ", n_drop, " of ", active, " active entries");
  TORCH_CHECK(active < (int64_t(1) << 32), op, ": more than 2^32 kept entries");
  at::Tensor out = at::empty(mask.sizes(), mask.options());
  at::Tensor weight = with_weight ? at::empty(drop.sizes(), drop.options()) : at::Tensor();
  int64_t status;
  AT_DISPATCH_FLOATING_TYPES(drop.scalar_type(), op, [&] {
    status = absolute ? drop_grow_impl<scalar_t, true>(drop, mask, grow, n_drop, transposable, out, weight)
                      : drop_grow_impl<scalar_t, false>(drop, mask, grow, n_drop, transposable, out, weight);
  });
  TORCH_CHECK_VALUE(status == kMaskOk, "mask of shape ", shape_of(mask), " is not exactly ",
                    transposable ? "transposable 2:4: it must keep exactly 2 of every 4 along rows and 2 per column "
                                   "of every 4x4 tile"
                                 : "2:4: it must keep exactly 2 of every 4 along rows");
  return {out, with_weight ? std::optional<at::Tensor>(weight) : std::nullopt};
}

// SemiSparseLinear.set_mask's bookkeeping for the new bool (rows, cols) 2:4 `mask`: the slot under
// `old_indices` of each new kept weight, or -1 (int64 (rows, cols/2)), the new packed indices, and
// those of the transpose if `transposable`.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> restructure(const at::Tensor& mask,
                                                                          const at::Tensor& old_indices,
                                                                          bool transposable) {
  constexpr const char* op = "semi_restructure_cpu";
  check_cpu_contiguous(mask, op, "mask");
  check_cpu_contiguous(old_indices, op, "old_indices");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool, op, ": mask must be 2-D bool, got ",
              mask.scalar_type(), " of shape ", mask.sizes());
  const int64_t rows = mask.size(0), cols = mask.size(1), per_row = cols / 4, bytes = (cols / 2 + 3) / 4;
  TORCH_CHECK(cols % 4 == 0 && (!transposable || rows % 4 == 0), op, ": mask of shape ", shape_of(mask),
              transposable ? " needs both dims multiples of 4" : " needs columns a multiple of 4");
  TORCH_CHECK(old_indices.scalar_type() == at::kByte && old_indices.sizes() == at::IntArrayRef({rows, bytes}), op,
              ": old_indices must be uint8 of shape (", rows, ", ", bytes, "), got ", old_indices.scalar_type(),
              " of shape ", old_indices.sizes());
  const bool* m = mask.data_ptr<bool>();
  const uint8_t* old = old_indices.data_ptr<uint8_t>();
  at::Tensor slots = at::empty({rows, cols / 2}, mask.options().dtype(at::kLong));
  at::Tensor indices = at::zeros({rows, bytes}, old_indices.options());
  int64_t* sl = slots.data_ptr<int64_t>();
  uint8_t* idx = indices.data_ptr<uint8_t>();
  std::atomic<int> bad{0};
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t grp = 0; grp < per_row; ++grp) {
        const int code = group_code(m + r * cols + 4 * grp);
        if (bit_count(code) != 2) {
          bad.fetch_or(1);
          continue;
        }
        const int lo = low_bit(code), hi = high_bit(code);
        const int shift = (grp & 1) * 4;
        const int before = old[r * bytes + grp / 2] >> shift & 15, old_lo = before & 3, old_hi = before >> 2;
        const int64_t base = 2 * (r * per_row + grp);
        sl[base] = lo == old_lo ? base : lo == old_hi ? base + 1 : -1;
        sl[base + 1] = hi == old_lo ? base : hi == old_hi ? base + 1 : -1;
        idx[r * bytes + grp / 2] |= uint8_t((lo | hi << 2) << shift);
      }
    }
  });
  at::Tensor indices_t;
  if (transposable && !(bad.load() & 1)) {
    // Wᵀ's row c is W's column c; its groups are 4 consecutive rows of W. Two row groups fill a byte.
    const int64_t bytes_t = (rows / 2 + 3) / 4;
    indices_t = at::zeros({cols, bytes_t}, old_indices.options());
    uint8_t* it = indices_t.data_ptr<uint8_t>();
    at::parallel_for(0, (rows / 4 + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t rb = 2 * p; rb < std::min(2 * p + 2, rows / 4); ++rb) {
          const bool* a = m + 4 * rb * cols;
          for (int64_t c = 0; c < cols; ++c) {
            const int code = a[c] | a[cols + c] << 1 | a[2 * cols + c] << 2 | a[3 * cols + c] << 3;
            if (bit_count(code) != 2) {
              bad.fetch_or(2);
              continue;
            }
            const int lo = low_bit(code), hi = high_bit(code);
            it[c * bytes_t + p] |= uint8_t((lo | hi << 2) << ((rb & 1) * 4));
          }
        }
      }
    });
  }
  const int flags = bad.load();
  TORCH_CHECK_VALUE(!(flags & 1), "mask of shape ", shape_of(mask), " is not exactly ",
                    transposable ? "transposable 2:4" : "2:4", ": it must keep exactly 2 of every 4 along rows");
  TORCH_CHECK_VALUE(!(flags & 2), "mask of shape ", shape_of(mask),
                    " is not exactly transposable 2:4: it must keep exactly 2 per column of every 4x4 tile");
  return {slots, indices, transposable ? std::optional<at::Tensor>(indices_t) : std::nullopt};
}

// tensor.flatten()[slots] where slots >= 0, else 0 (shape of slots): values and optimizer state
// moved to a new structure.
at::Tensor carry(const at::Tensor& tensor, const at::Tensor& slots) {
  constexpr const char* op = "semi_carry_cpu";
  check_cpu_contiguous(tensor, op, "tensor");
  check_cpu_contiguous(slots, op, "slots");
  TORCH_CHECK(slots.scalar_type() == at::kLong, op, ": slots must be int64, got ", slots.scalar_type());
  const int64_t n = slots.numel(), size = tensor.numel();
  at::Tensor out = at::empty(slots.sizes(), tensor.options());
  const int64_t* s = slots.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor.scalar_type(), op, [&] {
    const scalar_t* src = tensor.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        TORCH_CHECK_INDEX(s[i] < size, op, ": slot ", s[i], " is out of range for ", size, " entries");
        dst[i] = s[i] >= 0 ? src[s[i]] : scalar_t(0);
      }
    });
  });
  return out;
}

// The dense (rows, cols) sum of 2:4-compressed (values, packed indices) pairs of one dtype.
// allow_avx512: one source of 16- or 32-bit values is expanded with AVX-512 (VBMI2) where the
// CPU has it (4096 x 4096 at 2 threads on a Xeon: bf16 1.1 against 3.2 ms, the scalar loop's;
// fp32 2.2 against 3.0).
at::Tensor decompress_sum(at::TensorList values, at::TensorList indices, int64_t cols, bool allow_avx512) {
  constexpr const char* op = "semi_decompress_sum_cpu";
  TORCH_CHECK(!values.empty() && values.size() == indices.size(), op,
              ": one indices tensor per values tensor, and at least one, got ", values.size(), " and ",
              indices.size());
  TORCH_CHECK(cols >= 0 && cols % 4 == 0, op, ": cols must be a multiple of 4, got ", cols);
  TORCH_CHECK(values[0].dim() == 2, op, ": values must be 2-D, got shape ", values[0].sizes());
  const int64_t rows = values[0].size(0), per_row = cols / 4, bytes = (cols / 2 + 3) / 4;
  for (size_t k = 0; k < values.size(); ++k) {
    check_cpu_contiguous(values[k], op, "values");
    check_cpu_contiguous(indices[k], op, "indices");
    TORCH_CHECK(values[k].scalar_type() == values[0].scalar_type() &&
                    values[k].sizes() == at::IntArrayRef({rows, cols / 2}),
                op, ": values[", k, "] must be ", values[0].scalar_type(), " of shape (", rows, ", ", cols / 2,
                "), got ", values[k].scalar_type(), " of shape ", values[k].sizes());
    TORCH_CHECK(indices[k].scalar_type() == at::kByte && indices[k].sizes() == at::IntArrayRef({rows, bytes}), op,
                ": indices[", k, "] must be uint8 of shape (", rows, ", ", bytes, "), got ",
                indices[k].scalar_type(), " of shape ", indices[k].sizes());
  }
  // On the output cache: the floor rule's dense composite decompresses W on every call.
  at::Tensor out = common::empty_output({rows, cols}, values[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, values[0].scalar_type(), op, [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<const scalar_t*> sources;
    std::vector<const uint8_t*> positions;
    for (size_t k = 0; k < values.size(); ++k) {
      sources.push_back(values[k].data_ptr<scalar_t>());
      positions.push_back(indices[k].data_ptr<uint8_t>());
    }
#ifdef __x86_64__
    const bool expand = allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vbmi2");
#else
    const bool expand = false;
#endif
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      decompress_rows(sources, positions, o, r0, r1, per_row, bytes, expand);
    });
  });
  return out;
}

// The entries of a dense (rows, cols) matrix at the kept positions that packed 2:4 indices
// encode, (rows, cols/2) in the order of the compressed values: the weight gradient of the
// floor rule's dense composite (dyᵀx read out). Positions are 2-bit offsets within a row's
// group of four, so no metadata can address outside the row.
at::Tensor gather_kept(const at::Tensor& dense, const at::Tensor& indices) {
  constexpr const char* op = "semi_gather_kept_cpu";
  check_cpu_contiguous(dense, op, "dense");
  check_cpu_contiguous(indices, op, "indices");
  TORCH_CHECK(dense.dim() == 2 && dense.size(1) % 4 == 0, op,
              ": dense must be 2-D with a multiple of 4 columns, got shape ", dense.sizes());
  const int64_t rows = dense.size(0), cols = dense.size(1), per_row = cols / 4, bytes = (cols / 2 + 3) / 4;
  TORCH_CHECK(indices.scalar_type() == at::kByte && indices.sizes() == at::IntArrayRef({rows, bytes}), op,
              ": indices must be uint8 of shape (", rows, ", ", bytes, "), got ", indices.scalar_type(),
              " of shape ", indices.sizes());
  at::Tensor out = common::empty_output({rows, cols / 2}, dense.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), op, [&] {
    const scalar_t* d = dense.data_ptr<scalar_t>();
    const uint8_t* positions = indices.data_ptr<uint8_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = d + r * cols;
        const uint8_t* packed = positions + r * bytes;
        scalar_t* kept = o + r * 2 * per_row;
        for (int64_t grp = 0; grp < per_row; ++grp) {
          const int nibble = packed[grp / 2] >> ((grp & 1) * 4);
          kept[2 * grp] = row[4 * grp + (nibble & 3)];
          kept[2 * grp + 1] = row[4 * grp + (nibble >> 2 & 3)];
        }
      }
    });
  });
  return out;
}

}  // namespace

}  // namespace semi
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.semi.cpu");
  m.def("semi_drop_grow_cpu(Tensor drop, Tensor mask, Tensor grow, int n_drop, bool transposable, bool absolute, "
        "bool with_weight) -> (Tensor, Tensor?)");
  m.def("semi_restructure_cpu(Tensor mask, Tensor old_indices, bool transposable) -> (Tensor, Tensor, Tensor?)");
  m.def("semi_carry_cpu(Tensor tensor, Tensor slots) -> Tensor");
  m.def("semi_gather_kept_cpu(Tensor dense, Tensor indices) -> Tensor");
  m.def("semi_decompress_sum_cpu(Tensor[] values, Tensor[] indices, int cols, bool allow_avx512=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("semi_drop_grow_cpu", &sparsekern::semi::drop_grow);
  m.impl("semi_restructure_cpu", &sparsekern::semi::restructure);
  m.impl("semi_carry_cpu", &sparsekern::semi::carry);
  m.impl("semi_decompress_sum_cpu", &sparsekern::semi::decompress_sum);
  m.impl("semi_gather_kept_cpu", &sparsekern::semi::gather_kept);
}
