// Forward (Y = conv(X, W)) and input gradient (dX = conv of dY with the transposed, flipped
// taps): one implicit-GEMM driver for both, over a zero-padded NHWC copy P of the operand.
//
// An output channel group (a block row of W for the forward; a block column within one
// conv group for dX) is the sum, over its stored blocks q and the taps t, of
//   A[pixel + tap_off[t] + a_chan[q] : +w] @ B_(q,t)      (w input channels of the block)
// where a run of output pixels along one output row maps to P's pixels at a fixed stride
// (stride * channels), so the microkernel reads A in place with that row stride and the
// (block, tap) segment offsets are the same for every pixel: no im2col. B is packed once per
// call into NR-column strips, members and taps back to back, so a group's strip is one
// contiguous stream. Loop nest: output rows are split over the threads; inside a thread,
// chunks of rows whose P rows fit L2, inside them panels of groups whose packed B fits L2,
// inside them each output row, and on it every group of the panel, NR strip and tile of up
// to MR pixels. The accumulators stay in registers across all blocks and taps of a group, so
// each output tile is written once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/grouped_product.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "common/parallel.h"

namespace sparsekern {
namespace conv {

constexpr int64_t kPRowsBytes = 96 << 10;  // rows of P kept hot in L2 while every panel sweeps them
constexpr int64_t kGroupPanelBytes = 192 << 10;  // packed B of a panel of groups, kept hot in L2

// The NHWC copy of src (N, Cs, H, W; any strides and floating dtype) the kernels read, in
// compute type C: (N, Hd, Wd, G * Cgp), source pixel (y, x) at (y + ey, x + ex) (dropped where
// that falls outside), channel g * Cg + j at g * Cgp + j; zero elsewhere. Only what the copy
// does not cover is zeroed. A temporary: its block is the one cached scratch block, which
// every layer's copy reuses (no fresh page faults every call).
template <typename C>
at::Tensor placed_nhwc(const at::Tensor& src, int64_t G, int64_t Cgp, int64_t Hd, int64_t Wd, int64_t ey,
                       int64_t ex) {
  const int64_t N = src.size(0), Cg = src.size(1) / G, H = src.size(2), W = src.size(3);
  at::Tensor dst = common::empty_scratch({N, Hd, Wd, G * Cgp}, at::TensorOptions(common::scalar_type_of<C>()));
  // Source rows y with 0 <= y + ey < Hd (likewise columns).
  const int64_t y0 = std::max<int64_t>(0, -ey), y1 = std::min(H, Hd - ey);
  const int64_t x0 = std::max<int64_t>(0, -ex), x1 = std::min(W, Wd - ex);
  if (N == 0 || Cg == 0 || y0 >= y1 || x0 >= x1) return dst.zero_();
  const int64_t top = y0 + ey, bottom = y1 + ey, left = x0 + ex, right = x1 + ex;
  dst.narrow(1, 0, top).zero_();
  dst.narrow(1, bottom, Hd - bottom).zero_();
  at::Tensor rows = dst.narrow(1, top, bottom - top);
  rows.narrow(2, 0, left).zero_();
  rows.narrow(2, right, Wd - right).zero_();
  at::Tensor into = rows.narrow(2, left, right - left).view({N, bottom - top, right - left, G, Cgp});
  if (Cgp > Cg) into.narrow(4, Cg, Cgp - Cg).zero_();
  into.narrow(4, 0, Cg).copy_(src.slice(2, y0, y1).slice(3, x0, x1).permute({0, 2, 3, 1}).unflatten(3, {G, Cg}));
  return dst;
}

// One output channel group: output columns [out_col, out_col + width) (width <= g), members
// [first, first + count) of the member arrays.
struct Group {
  int64_t out_col, width, first, count;
};

// The problem the driver solves; offsets are in elements of P / out.
template <typename S, typename C>
struct GatherProblem {
  const C* p;                    // the placed operand
  int64_t img_stride, row_stride, pix_stride;  // P: per image, per output row, per output pixel
  int64_t N, Hout, Wout;         // output pixels
  std::vector<int64_t> tap_off;  // offset in P of each tap the problem runs
  std::vector<int64_t> w_tap;    // the weight tap (kh * KW + kw) each of them multiplies by
  std::vector<Group> groups;
  std::vector<int64_t> blk, a_chan;  // per member: block of values, channel offset in P
  const S* values;               // (nnz, bo, bi, value_taps)
  int64_t bo, bi, value_taps;
  bool forward;                  // B(k, n) = W[n, k, w_tap] (forward, w = bi) or W[k, n, w_tap] (dX, w = bo)
  S* out;                        // pixel (n, y, x), channel c at n * out_img + y * out_row + x * out_pix + c
  int64_t out_img, out_row, out_pix;
  const S* bias;                 // per output column, or null
};

// Pixel tiles of an output row: ceil(W / MR) tiles of near-equal width (16 -> 6,5,5; 8 -> 4,4),
// so no tile runs the microkernel with one or two rows.
inline std::vector<std::pair<int64_t, int>> pixel_tiles(int64_t W) {
  std::vector<std::pair<int64_t, int>> tiles;
  const int64_t n = (W + common::kMR - 1) / common::kMR;
  for (int64_t i = 0, x = 0; i < n; ++i) {
    const int width = int(W / n + (i < W % n ? 1 : 0));
    tiles.emplace_back(x, width);
    x += width;
  }
  return tiles;
}

template <typename S, typename C, int NR>
void gather_conv(const GatherProblem<S, C>& pb) {
  constexpr bool kDirect = std::is_same<S, C>::value;
  const int64_t T = int64_t(pb.tap_off.size()), w = pb.forward ? pb.bi : pb.bo, g = pb.forward ? pb.bo : pb.bi;
  const int64_t nsub = (g + NR - 1) / NR, strip = w * NR, members = int64_t(pb.blk.size());
  const int64_t rows = pb.N * pb.Hout;
  if (rows == 0 || pb.Wout == 0 || pb.groups.empty()) return;

  // Pack B: group i's sub-tile s, member q, tap t at ((first * T) * nsub + (s * count + q) * T + t) * strip.
  at::Tensor b_buf = at::empty({std::max<int64_t>(1, members * T * nsub * strip)},
                               at::TensorOptions(common::scalar_type_of<C>()));
  C* bp = b_buf.data_ptr<C>();
  const int64_t block = pb.bo * pb.bi * pb.value_taps;
  common::parallel_for_work(int64_t(pb.groups.size()), members * block / 16, [&](int64_t g0, int64_t g1) {
    for (int64_t i = g0; i < g1; ++i) {
      const Group& gr = pb.groups[i];
      for (int64_t q = 0; q < gr.count; ++q) {
        const S* v = pb.values + pb.blk[gr.first + q] * block;
        for (int64_t s = 0; s < nsub; ++s) {
          for (int64_t t = 0; t < T; ++t) {
            C* dst = bp + (gr.first * T * nsub + (s * gr.count + q) * T + t) * strip;
            for (int64_t k = 0; k < w; ++k) {
              for (int64_t n = 0; n < NR; ++n) {
                const int64_t col = s * NR + n;
                dst[k * NR + n] = col >= g ? C(0)
                                  : pb.forward ? C(v[(col * pb.bi + k) * pb.value_taps + pb.w_tap[t]])
                                               : C(v[(k * pb.bi + col) * pb.value_taps + pb.w_tap[t]]);
              }
            }
          }
        }
      }
    }
  });
  std::vector<int64_t> seg_off(std::max<int64_t>(1, members * T));
  for (const Group& gr : pb.groups) {
    for (int64_t q = 0; q < gr.count; ++q) {
      for (int64_t t = 0; t < T; ++t) seg_off[(gr.first + q) * T + t] = pb.a_chan[gr.first + q] + pb.tap_off[t];
    }
  }

  const auto tiles = pixel_tiles(pb.Wout);
  std::vector<common::Microkernel<C>> kernels;
  for (const auto& tile : tiles) kernels.push_back(common::microkernel_rows<C, NR, true>(tile.second));
  const int64_t chunk = std::max<int64_t>(1, kPRowsBytes / std::max<int64_t>(1, pb.row_stride * int64_t(sizeof(C))));
  const int64_t macs_per_row = (members * T * w + int64_t(pb.groups.size()) * common::kItemOverhead) * g * pb.Wout;

  // Panels of consecutive groups whose packed B fits a share of L2: a panel's groups all run
  // on one output row before the next, so the row's P input and its output stay in L1/L2.
  std::vector<size_t> panels{0};
  for (size_t i = 0, bytes = 0; i < pb.groups.size(); ++i) {
    const size_t b = size_t(pb.groups[i].count * T * nsub * strip) * sizeof(C);
    if (bytes > 0 && bytes + b > size_t(kGroupPanelBytes)) panels.push_back(i), bytes = 0;
    bytes += b;
  }
  panels.push_back(pb.groups.size());

  common::parallel_for_work(rows, rows * macs_per_row, [&](int64_t r0, int64_t r1) {
    for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
      const int64_t c1 = std::min(r1, c0 + chunk);
      for (size_t pi = 0; pi + 1 < panels.size(); ++pi) {
        for (int64_t row = c0; row < c1; ++row) {
          const int64_t n = row / pb.Hout, y = row % pb.Hout;
          const C* arow = pb.p + n * pb.img_stride + y * pb.row_stride;
          // The first panel pulls the next chunk's rows of P towards L2, a row at a time, so the
          // broadcasts do not stall on memory.
          if (pi == 0 && row + chunk < r1) {
            const int64_t ahead = row + chunk;
            const char* next = reinterpret_cast<const char*>(pb.p + ahead / pb.Hout * pb.img_stride +
                                                             ahead % pb.Hout * pb.row_stride);
            for (int64_t off = 0; off < pb.row_stride * int64_t(sizeof(C)); off += 64) __builtin_prefetch(next + off, 0, 2);
          }
          for (size_t gi = panels[pi]; gi < panels[pi + 1]; ++gi) {
            const Group& gr = pb.groups[gi];
            const int64_t* segs = seg_off.data() + gr.first * T;
            for (int64_t s = 0; s < nsub; ++s) {
              const int64_t col0 = gr.out_col + s * NR, ncols = std::min<int64_t>(NR, gr.width - s * NR);
              if (ncols <= 0) continue;
              const C* bs = bp + (gr.first * T * nsub + s * gr.count * T) * strip;
              S* orow = pb.out + n * pb.out_img + y * pb.out_row + col0;
              if (gr.count == 0) {  // no stored block: the output is zero (or the bias)
                S fill[NR];
                for (int64_t c = 0; c < NR; ++c) fill[c] = pb.bias && c < ncols ? pb.bias[col0 + c] : S(0);
                for (int64_t x = 0; x < pb.Wout; ++x) {
                  S* o = orow + x * pb.out_pix;
                  if (ncols == NR) {  // a constant width: vector stores (a memset per pixel costs ~10x more)
                    for (int c = 0; c < NR; ++c) o[c] = fill[c];
                  } else {
                    for (int64_t c = 0; c < ncols; ++c) o[c] = fill[c];
                  }
                }
                continue;
              }
              for (size_t ti = 0; ti < tiles.size(); ++ti) {
                const int64_t x = tiles[ti].first;
                const int mr = tiles[ti].second;
                S* o = orow + x * pb.out_pix;
                const C* a = arow + x * pb.pix_stride;
                if (kDirect && ncols == NR) {
                  kernels[ti](a, pb.pix_stride, segs, gr.count * T, w, bs, NR, reinterpret_cast<C*>(o), pb.out_pix, false,
                              reinterpret_cast<const C*>(pb.bias ? pb.bias + col0 : nullptr));
                } else {
                  alignas(64) C tmp[common::kMR * NR];
                  kernels[ti](a, pb.pix_stride, segs, gr.count * T, w, bs, NR, tmp, NR, false, nullptr);
                  for (int i = 0; i < mr; ++i) {
                    for (int64_t c = 0; c < ncols; ++c) {
                      o[i * pb.out_pix + c] = pb.bias ? S(tmp[i * NR + c] + C(pb.bias[col0 + c])) : S(tmp[i * NR + c]);
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
}

}  // namespace conv
}  // namespace sparsekern
