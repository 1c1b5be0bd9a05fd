// Weight gradient on the stored blocks only:
//   dvalues[p][co][ci][t] = sum over output pixels m of dY[m, row_p * bo + co] * X[src(m, t), a_chan_p + ci]
// (X: the NHWC input; src(m, t) the input pixel output pixel m reads through tap t, none in the
// padding: those products are zero). The reduction runs over all output pixels, split into
// one contiguous pixel range per thread, each with its own accumulator of the stored blocks
// (summed at the end), so no operand is packed twice. A thread walks its range in chunks,
// GotoBLAS style: dYᵀ of every used block row is packed into row tiles ([chunk][mr]), then,
// one block column at a time, the shifted input of every tap into NR-column strips
// ([chunk][NR], zeros for the padding), straight from X: no padded copy of the input; each
// (block, tap, strip, row tile) is one microkernel call over two contiguous streams; the next
// chunk's dY and input rows are prefetched into L2 meanwhile.
// Where a tap's input pixels follow each other at one stride for long runs (rows of 8 or more
// output pixels), a block's channels fill whole strips and at most two blocks share the block
// column, the strips are read from X in place instead, one call per run: packing them for one
// block cost as much as its products at 16-32 channels a block.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/column_sums.h"
#include "common/grouped_product.h"
#include "common/microkernel.h"
#include "common/parallel.h"
#include "common/prefetch.h"
#include "conv/dot_bf16.h"

namespace sparsekern {
namespace conv {

constexpr int64_t kPixelChunk = 256;  // output pixels per packed chunk
constexpr int64_t kMinDirectRun = 8;     // mean run of output pixels from which X is read in place
constexpr int64_t kMaxDirectBlocks = 2;  // blocks of a block column up to which X is read in place

// Pixels [m, m + len) of a chunk whose tap reads X at x_off + i * stride for the i-th of them.
struct PixelRun {
  int64_t m, len, x_off;
};

// floor(a / b) and ceil(a / b) for b > 0 and any a.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

template <typename C>
struct SampledProblem {
  const C* dy;  // (M, O) NHWC
  int64_t O;
  const C* x;   // the input (N, H, W, Cx) NHWC
  int64_t H, W, Cx;
  int64_t sh, sw, pt, pl;  // output pixel (y, x), tap t reads input pixel (y * sh + tap_y[t] - pt, x * sw + tap_x[t] - pl)
  int64_t N, Hout, Wout;
  std::vector<int64_t> tap_y, tap_x;
  const int64_t* rows;           // block row of each stored block
  std::vector<int64_t> a_chan;   // first input channel of each stored block in X
  std::vector<int64_t> a_width;  // its channels that exist (fewer than bi in a group's last block column)
  int64_t nnz, bo, bi;

  // Elements of X between the input pixels a tap reads for neighbouring output pixels.
  int64_t x_step() const { return sw * Cx; }

  // The elements of X that output pixels [m0, m0 + len) (len > 0) read through any tap: whole
  // input rows, one contiguous range.
  std::pair<const C*, int64_t> x_rows(int64_t m0, int64_t len) const {
    const auto [reach_lo, reach_hi] = std::minmax_element(tap_y.begin(), tap_y.end());
    auto row = [&](int64_t m, int64_t reach) {  // input row index over the batch, clamped into m's image
      const int64_t n = m / (Hout * Wout), oy = m / Wout % Hout;
      return n * H + std::clamp<int64_t>(oy * sh - pt + reach, 0, H);
    };
    const int64_t lo = row(m0, *reach_lo), hi = row(m0 + len - 1, *reach_hi + 1);
    return {x + lo * W * Cx, std::max<int64_t>(0, hi - lo) * W * Cx};
  }

  // Appends the runs of tap t over output pixels [m0, m0 + len): per output row the pixels
  // whose input lies inside the image (the padding reads nothing, so it has no run), one run
  // across rows where X continues at the same stride. O(output rows), not O(pixels).
  void tap_runs(int64_t t, int64_t m0, int64_t len, std::vector<PixelRun>& runs) const {
    const int64_t first = int64_t(runs.size());
    // Output columns whose input column x * sw - pl + tap_x[t] lies in [0, W).
    const int64_t x_lo = std::max<int64_t>(0, ceil_div(pl - tap_x[t], sw));
    const int64_t x_hi = std::min(Wout, floor_div(W - 1 + pl - tap_x[t], sw) + 1);
    const int64_t HW = Hout * Wout;
    int64_t n = m0 / HW, oy = m0 % HW / Wout, ox = m0 % Wout;
    for (int64_t m = 0; m < len;) {
      const int64_t row_len = std::min(len - m, Wout - ox), iy = oy * sh - pt + tap_y[t];
      const int64_t lo = std::max(ox, x_lo), hi = std::min(ox + row_len, x_hi);
      if (iy >= 0 && iy < H && lo < hi) {
        const int64_t mm = m + lo - ox, off = ((n * H + iy) * W + lo * sw - pl + tap_x[t]) * Cx;
        PixelRun* last = int64_t(runs.size()) > first ? &runs.back() : nullptr;
        if (last && last->m + last->len == mm && last->x_off + last->len * x_step() == off) {
          last->len += hi - lo;
        } else {
          runs.push_back({mm, hi - lo, off});
        }
      }
      m += row_len, ox += row_len;
      if (ox == Wout) {
        ox = 0;
        if (++oy == Hout) oy = 0, ++n;
      }
    }
  }
};

// kPairs: bf16 operands on AVX512-BF16 dot products (C = bf16, NR = dot_strip of the block): dYᵀ
// packed row-major and X's strips in pixel pairs, chunks padded with zero pixels to whole
// dot_rows steps of kDotPixels, accumulated in fp32; X is then always packed (its pixels are not
// paired in place).
// dbias (O entries, or null): the bias gradient, summed over dY on the way.
template <typename S, typename C, int NR, bool kPairs = false>
void sampled_conv(const SampledProblem<C>& pb, S* dvalues, S* dbias) {
  static_assert(!kPairs || (std::is_same<C, bf16>::value && (NR == 16 || NR == 32)),
                "the dot-product dW runs bf16 strips of 16 or 32 columns");
  using Acc = std::conditional_t<kPairs, float, C>;
  const int64_t T = int64_t(pb.tap_y.size()), nsub = (pb.bi + NR - 1) / NR, block = pb.bo * pb.bi * T;
  const int64_t M = pb.N * pb.Hout * pb.Wout, nnz = pb.nnz;
  if (nnz == 0 && dbias == nullptr) return;
  const auto scalar = at::TensorOptions(common::scalar_type_of<C>());
  if (M == 0) {
    std::fill(dvalues, dvalues + nnz * block, S(0));
    if (dbias != nullptr) std::fill(dbias, dbias + pb.O, S(0));
    return;
  }
  // Blocks by block column (then row), so each column's shifted input is packed once per chunk.
  std::vector<int64_t> order(nnz);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return pb.a_chan[a] < pb.a_chan[b]; });
  std::vector<int64_t> used_rows(pb.rows, pb.rows + nnz);
  std::sort(used_rows.begin(), used_rows.end());
  used_rows.erase(std::unique(used_rows.begin(), used_rows.end()), used_rows.end());
  std::vector<int64_t> row_slot(used_rows.empty() ? 0 : used_rows.back() + 1, -1);
  for (size_t u = 0; u < used_rows.size(); ++u) row_slot[used_rows[u]] = int64_t(u);

  const auto tiles = common::row_tiles(pb.bo, kPairs ? common::bf16_tile_rows(common::tile_rows())
                                                      : common::packed_tile_rows<C, NR>());
  const auto kernels = tile_kernels<C, NR, kPairs, false, kDotPixels / 2>(tiles);
  const int64_t parts = std::min((M + kPixelChunk - 1) / kPixelChunk, common::threads_for(nnz * block * M));
  std::vector<at::Tensor> accs(parts);
  std::vector<Acc*> acc_of(parts);
  for (int64_t part = 0; part < parts; ++part) {  // zeroed: the in-place runs add to it call by call
    accs[part] = at::zeros({nnz * block}, at::TensorOptions(common::scalar_type_of<Acc>()));
    acc_of[part] = accs[part].data_ptr<Acc>();
  }
  using BiasAcc = common::SumType<C>;
  std::vector<std::vector<BiasAcc>> bias_parts(dbias ? parts : 0, std::vector<BiasAcc>(pb.O, BiasAcc(0)));
  const int64_t zero = 0;
  int64_t step_off[kPixelChunk / kDotPixels];  // dot_rows' K steps along a packed dY row
  for (int64_t j = 0; j < kPixelChunk / kDotPixels; ++j) step_off[j] = j * kDotPixels;
  const int64_t x_step = pb.x_step();

  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t part = q0; part < q1; ++part) {
      Acc* acc = acc_of[part];
      const int64_t m_lo = M * part / parts, m_hi = M * (part + 1) / parts;
      const int64_t span = std::min(kPixelChunk, m_hi - m_lo);
      const int64_t chunk = kPairs ? (span + kDotPixels - 1) / kDotPixels * kDotPixels : span;  // pairs: whole K steps
      at::Tensor buf = at::empty({int64_t(used_rows.size()) * pb.bo * chunk + T * nsub * chunk * NR}, scalar);
      C* pdy = buf.data_ptr<C>();
      C* px = pdy + int64_t(used_rows.size()) * pb.bo * chunk;
      std::vector<PixelRun> runs;
      std::vector<int64_t> tap_runs(T + 1);  // runs of tap t: [tap_runs[t], tap_runs[t + 1])
      common::AheadStream next_dy, next_x;  // the next chunk's operands, a share per (block, tap)
      std::vector<BiasAcc> chunk_bias(dbias ? pb.O : 0);
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += chunk) {
        const int64_t len = std::min(chunk, m_hi - m0), next = std::min(chunk, m_hi - m0 - len);
        // The bias gradient's share of the chunk: its dY is in L2 (prefetched, and packed right
        // after), where a separate sum over dY would read it from memory again.
        if (dbias) common::sum_rows(pb.dy + m0 * pb.O, pb.O, len, pb.O, chunk_bias.data(), bias_parts[part].data());
        if (next > 0) {
          next_dy.start(pb.dy + (m0 + len) * pb.O, next * pb.O * int64_t(sizeof(C)), nnz * T);
          const auto [x_from, x_count] = pb.x_rows(m0 + len, next);
          next_x.start(x_from, x_count * int64_t(sizeof(C)), nnz * T);
        } else {
          next_dy.stop(), next_x.stop();
        }
        const int64_t klen = kPairs ? (len + kDotPixels - 1) / kDotPixels * kDotPixels : len;
        runs.clear();
        for (int64_t t = 0; t < T; ++t) {
          tap_runs[t] = int64_t(runs.size());
          pb.tap_runs(t, m0, len, runs);
        }
        tap_runs[T] = int64_t(runs.size());
        const bool long_runs = int64_t(runs.size()) * kMinDirectRun <= T * len;
        for (size_t u = 0; u < used_rows.size(); ++u) {
          if constexpr (kPairs) {  // row-major: row i holds channel ch + i of every pixel
#ifdef SPARSEKERN_AMX_BUILD
            const int64_t ch = used_rows[u] * pb.bo;
            pack_channel_rows(pdy + int64_t(u) * pb.bo * chunk, chunk, pb.dy + m0 * pb.O + ch, pb.O, len, klen,
                              std::min<int64_t>(pb.bo, pb.O - ch), pb.bo);  // the last block row's padding: zeros
#endif
          } else {
            for (const auto& tile : tiles) {
              C* dst = pdy + (int64_t(u) * pb.bo + tile.first) * chunk;
              const int64_t ch = used_rows[u] * pb.bo + tile.first;
              const C* src = pb.dy + m0 * pb.O + ch;
              const int mr = tile.second;
              const int valid = int(std::min<int64_t>(mr, pb.O - ch));  // the last block row's padding reads as zero
              if (valid == mr) {
                common::copy_row_tile(dst, src, pb.O, 0, len, mr);
              } else {
                for (int64_t m = 0; m < len; ++m) {
                  for (int i = 0; i < mr; ++i) dst[m * mr + i] = i < valid ? src[m * pb.O + i] : C(0);
                }
              }
            }
          }
        }
        for (int64_t oi = 0; oi < nnz;) {
          const int64_t chan = pb.a_chan[order[oi]], width = pb.a_width[order[oi]];
          // In place: every strip of the column full (reads stay inside the column's channels), and
          // few blocks to share a packed copy (at 4-8 a column, packing once was 5-10 % faster).
          int64_t col_end = oi;
          while (col_end < nnz && pb.a_chan[order[col_end]] == chan) ++col_end;
          const bool direct =
              !kPairs && long_runs && width == pb.bi && pb.bi % NR == 0 && col_end - oi <= kMaxDirectBlocks;
          // The column's shifted input packed per tap and strip, unless read in place.
          for (int64_t t = 0; t < T && !direct; ++t) {
            for (int64_t s = 0; s < nsub; ++s) {
              C* dst = px + (t * nsub + s) * chunk * NR;
              const int64_t valid = std::min<int64_t>(NR, width - s * NR);
              if constexpr (kPairs) {  // zeros first (padding, the odd pixel's partner), then the runs
#ifdef SPARSEKERN_AMX_BUILD
                std::fill(dst, dst + klen * NR, C(0));
                for (int64_t r = tap_runs[t]; r < tap_runs[t + 1]; ++r) {
                  const PixelRun& run = runs[r];
                  const C* from = pb.x + run.x_off + chan + s * NR;
                  for (int64_t i = 0; i < run.len;) {
                    const int64_t m = run.m + i;
                    if (valid == NR && (m & 1) == 0 && i + 1 < run.len) {  // a whole pair of this run
                      pack_pixel_pair<NR>(dst + m * NR, from, from + x_step);
                      i += 2, from += 2 * x_step;
                      continue;
                    }
                    if (valid == NR) {  // a pixel without its partner (a run's odd end): its halves only
                      pack_pixel_half<NR>(dst + (m >> 1) * 2 * NR, from, int(m & 1));
                    } else {
                      for (int64_t c = 0; c < valid; ++c) dst[(m >> 1) * 2 * NR + 2 * c + (m & 1)] = from[c];
                    }
                    i += 1, from += x_step;
                  }
                }
#endif
                continue;
              }
              auto zero_rows = [&](int64_t m1, int64_t m2) { std::fill(dst + m1 * NR, dst + m2 * NR, C(0)); };
              int64_t m = 0;  // pixels before it are packed
              for (int64_t r = tap_runs[t]; r < tap_runs[t + 1]; ++r) {
                const PixelRun& run = runs[r];
                zero_rows(m, run.m);  // the padding between runs
                const C* from = pb.x + run.x_off + chan + s * NR;
                for (int64_t i = 0; i < run.len; ++i, from += x_step) {
                  C* d = dst + (run.m + i) * NR;
                  if (valid == NR) {  // constant size: inlined vector moves, not a memmove call per pixel
                    __builtin_memcpy(d, from, NR * sizeof(C));
                  } else {
                    for (int64_t c = 0; c < NR; ++c) d[c] = c < valid ? from[c] : C(0);
                  }
                }
                m = run.m + run.len;
              }
              zero_rows(m, len);
            }
          }
          for (; oi < col_end; ++oi) {
            const int64_t b = order[oi];
            const C* arow = pdy + row_slot[pb.rows[b]] * pb.bo * chunk;
            for (int64_t t = 0; t < T; ++t) {
              next_dy.step(), next_x.step();
              for (int64_t s = 0; s < nsub; ++s) {
                const int64_t ncols = std::min<int64_t>(NR, pb.bi - s * NR);
                const C* bs = px + (t * nsub + s) * chunk * NR;
                for (size_t ti = 0; ti < tiles.size(); ++ti) {
                  const int64_t o = tiles[ti].first;
                  const int mr = tiles[ti].second;
                  Acc* out = acc + ((b * T + t) * pb.bo + o) * pb.bi + s * NR;
                  if constexpr (kPairs) {
                    const C* a = arow + o * chunk;
                    if (ncols == NR) {
                      kernels[ti](a, chunk, step_off, bs, 2 * NR, kDotPixels * NR, klen / kDotPixels, out, pb.bi,
                                  true);
                      continue;
                    }
                    alignas(64) float tmp[common::kMaxBf16TileRows * NR];
                    kernels[ti](a, chunk, step_off, bs, 2 * NR, kDotPixels * NR, klen / kDotPixels, tmp, NR, false);
                    for (int i = 0; i < mr; ++i) {
                      for (int64_t n = 0; n < ncols; ++n) out[i * pb.bi + n] += tmp[i * NR + n];
                    }
                  } else if (direct) {  // one call per run of the tap, its strip read from X
                    for (int64_t r = tap_runs[t]; r < tap_runs[t + 1]; ++r) {
                      const PixelRun& run = runs[r];
                      kernels[ti](arow + o * chunk + run.m * mr, mr, &zero, 1, run.len,
                                  pb.x + run.x_off + chan + s * NR, x_step, out, pb.bi, common::Store::kAdd, nullptr);
                    }
                  } else if (ncols == NR) {
                    kernels[ti](arow + o * chunk, mr, &zero, 1, len, bs, NR, out, pb.bi, common::Store::kAdd, nullptr);
                  } else {
                    alignas(64) C tmp[common::kMaxNarrowRows * NR];
                    kernels[ti](arow + o * chunk, mr, &zero, 1, len, bs, NR, tmp, NR, common::Store::kWrite, nullptr);
                    for (int i = 0; i < mr; ++i) {
                      for (int64_t n = 0; n < ncols; ++n) out[i * pb.bi + n] += tmp[i * NR + n];
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
  });
  for (int64_t c = 0; dbias && c < pb.O; ++c) {
    BiasAcc sum = 0;
    for (const auto& part : bias_parts) sum += part[c];
    dbias[c] = S(sum);
  }
  // Sum the parts and move the taps innermost, as nn.Conv2d's weight has them.
  common::parallel_for_work(nnz, nnz * block * parts, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < pb.bo * pb.bi; ++e) {
          const int64_t i = (b * T + t) * pb.bo * pb.bi + e;
          Acc sum = acc_of[0][i];
          for (int64_t part = 1; part < parts; ++part) sum += acc_of[part][i];
          dvalues[(b * pb.bo * pb.bi + e) * T + t] = S(sum);
        }
      }
    }
  });
}

}  // namespace conv
}  // namespace sparsekern
