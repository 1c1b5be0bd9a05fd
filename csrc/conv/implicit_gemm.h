// Forward (Y = conv(X, W)) and input gradient (dX = conv of dY with the transposed, flipped
// taps): one implicit-GEMM driver for both, over the zero-padded NHWC operand P.
//
// An output channel group (a block row of W for the forward; a block column within one
// conv group for dX) is the sum, over its stored blocks q and the taps t, of
//   A[pixel + tap_off[t] + a_chan[q] : +w] @ B_(q,t)      (w input channels of the block)
// where a run of output pixels along one output row maps to P's pixels at a fixed stride
// (stride * channels), so the microkernel reads A in place with that row stride and the
// (block, tap) segment offsets are the same for every pixel: no im2col. B is packed once per
// call into NR-column strips, members and taps back to back, so a group's strip is one
// contiguous stream. Loop nest: output rows are split over the threads; inside a thread,
// chunks of rows of one image, whose P rows the thread places into its own L2-sized buffer
// (P never exists as a whole: no padded copy of the activation goes through memory), inside
// them panels of groups whose packed B fits L2, inside them each output row, and on it every
// group of the panel, NR strip and tile of up to tile_rows() pixels. The accumulators stay in
// registers across all blocks and taps of a group, so each output tile is written once. While
// a chunk computes, the next chunk's source rows and output are prefetched into L2.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/grouped_product.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "common/parallel.h"
#include "common/prefetch.h"
#include "conv/dot_bf16.h"

namespace sparsekern {
namespace conv {

constexpr int64_t kGroupPanelBytes = 192 << 10;  // packed B of a panel of groups, kept hot in L2

constexpr int64_t kPRowsBytes = 160 << 10;  // a thread's buffer of P rows, kept hot in L2 while every panel sweeps it

// src (N, Cs, H, W; any strides and floating dtype) as a contiguous NHWC tensor of compute
// type C: a view of a channels-last input already of type C, else one conversion.
template <typename C>
at::Tensor nhwc_compute(const at::Tensor& src) {
  return src.permute({0, 2, 3, 1}).to(common::scalar_type_of<C>()).contiguous();
}

// The padded operand P the kernels read, from src (N, H, W, G * Cg), contiguous NHWC:
// P is (N, Hd, Wd, G * Cgp), source pixel (y, x) at (y + ey, x + ex) (dropped where that
// falls outside), channel g * Cg + j at g * Cgp + j; zero elsewhere. Only rows are built.
template <typename C>
struct Placement {
  const C* src;
  int64_t H, W, G, Cg;
  int64_t Hd, Wd, Cgp, ey, ex;

  int64_t row_elems() const { return Wd * G * Cgp; }

  // The source elements P rows [r0, r1) of image n copy: one contiguous range of src.
  std::pair<const C*, int64_t> source(int64_t n, int64_t r0, int64_t r1) const {
    const int64_t y0 = std::clamp<int64_t>(r0 - ey, 0, H), y1 = std::clamp<int64_t>(r1 - ey, 0, H);
    return {src + (n * H + y0) * W * G * Cg, std::max<int64_t>(0, y1 - y0) * W * G * Cg};
  }

  // P rows [r0, r1) of image n (r1 <= Hd), one after another, into dst.
  void fill_rows(int64_t n, int64_t r0, int64_t r1, C* dst) const {
    const int64_t Cp = G * Cgp, re = row_elems();
    const int64_t x0 = std::max<int64_t>(0, -ex), x1 = std::min(W, Wd - ex);
    for (int64_t r = r0; r < r1; ++r, dst += re) {
      const int64_t y = r - ey;
      if (y < 0 || y >= H || x0 >= x1) {
        std::fill(dst, dst + re, C(0));
        continue;
      }
      std::fill(dst, dst + (x0 + ex) * Cp, C(0));
      std::fill(dst + (x1 + ex) * Cp, dst + re, C(0));
      const C* s = src + ((n * H + y) * W + x0) * G * Cg;
      C* d = dst + (x0 + ex) * Cp;
      if (Cgp == Cg) {
        std::memcpy(d, s, size_t((x1 - x0) * Cp) * sizeof(C));
        continue;
      }
      for (int64_t i = 0; i < (x1 - x0) * G; ++i, s += Cg, d += Cgp) {
        std::memcpy(d, s, size_t(Cg) * sizeof(C));
        std::fill(d + Cg, d + Cgp, C(0));
      }
    }
  }
};

// One output channel group: output columns [out_col, out_col + width) (width <= g), members
// [first, first + count) of the member arrays.
struct Group {
  int64_t out_col, width, first, count;
};

// The problem the driver solves; offsets are in elements of P / out.
template <typename S, typename C>
struct GatherProblem {
  Placement<C> place;            // the operand
  int64_t row_step, pix_stride;  // P rows per output row; elements of P per output pixel
  int64_t N, Hout, Wout;         // output pixels
  std::vector<int64_t> tap_off;  // offset in P (from an output pixel's first P row) of each tap the problem runs
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

// kPairs: bf16 operands on AVX512-BF16 dot products (S = C = bf16, NR = dot_strip of the block, w
// a multiple of NR): B is packed in VNNI pairs and the tiles run dot_rows_kernel, each (block,
// tap) segment as w / NR K steps of NR; otherwise the microkernels of C.
template <typename S, typename C, int NR, bool kPairs = false>
void gather_conv(const GatherProblem<S, C>& pb) {
  static_assert(!kPairs || (std::is_same<S, bf16>::value && std::is_same<C, bf16>::value && (NR == 16 || NR == 32)),
                "the dot-product gathers run bf16 strips of 16 or 32 columns");
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
                dst[kPairs ? vnni_index<NR>(k, n) : k * NR + n] = col >= g ? C(0)
                                  : pb.forward ? C(v[(col * pb.bi + k) * pb.value_taps + pb.w_tap[t]])
                                               : C(v[(k * pb.bi + col) * pb.value_taps + pb.w_tap[t]]);
              }
            }
          }
        }
      }
    }
  });
  const int64_t steps = kPairs ? w / NR : 1;  // microkernel segments a (block, tap) segment is cut into
  std::vector<int64_t> seg_off(std::max<int64_t>(1, members * T * steps));
  for (const Group& gr : pb.groups) {
    for (int64_t q = 0; q < gr.count; ++q) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < steps; ++j) {
          seg_off[((gr.first + q) * T + t) * steps + j] = pb.a_chan[gr.first + q] + pb.tap_off[t] + j * NR;
        }
      }
    }
  }

  const int row_limit = common::tile_rows(pb.pix_stride * int64_t(sizeof(C)));
  const auto tiles = common::row_tiles(pb.Wout, kPairs ? common::bf16_tile_rows(row_limit) : row_limit);
  const auto kernels = tile_kernels<C, NR, kPairs, true, NR / 2>(tiles);
  // A chunk of output rows reads P rows [y0 * step, (y1 - 1) * step + span) of its image.
  const int64_t re = pb.place.row_elems(), step = pb.row_step;
  const int64_t span = *std::max_element(pb.tap_off.begin(), pb.tap_off.end()) / re + 1;
  const int64_t budget = std::max<int64_t>(span, kPRowsBytes / (re * int64_t(sizeof(C))));
  const int64_t most = std::min(pb.Hout, std::max<int64_t>(1, (budget - span) / step + 1));
  const int64_t per_image = (pb.Hout + most - 1) / most;        // chunks an image's rows take,
  const int64_t chunk = (pb.Hout + per_image - 1) / per_image;  // of even size (16 rows: 8 + 8, not 15 + 1)
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
    at::Tensor local = at::empty({((chunk - 1) * step + span) * re}, at::TensorOptions(common::scalar_type_of<C>()));
    C* buf = local.data_ptr<C>();
    // The end of the chunk of this thread's rows that starts at row c0 (rows of one image).
    auto chunk_end = [&](int64_t c0) { return std::min({r1, c0 + chunk, (c0 / pb.Hout + 1) * pb.Hout}); };
    common::AheadStream next_in, next_out;
    for (int64_t c0 = r0, c1; c0 < r1; c0 = c1) {
      const int64_t n = c0 / pb.Hout, y0 = c0 % pb.Hout;
      c1 = chunk_end(c0);
      pb.place.fill_rows(n, y0 * step, (y0 + c1 - c0 - 1) * step + span, buf);
      if (c1 < r1) {  // the next chunk's source rows, and its output where that is one range (no stride phases)
        const int64_t steps = int64_t(panels.size() - 1) * (c1 - c0), nn = c1 / pb.Hout, ny = c1 % pb.Hout;
        const int64_t ny1 = ny + chunk_end(c1) - c1;
        const auto [from, count] = pb.place.source(nn, ny * step, (ny1 - 1) * step + span);
        next_in.start(from, count * int64_t(sizeof(C)), steps);
        const bool one_range = pb.out_row == pb.Wout * pb.out_pix;
        next_out.start(pb.out + nn * pb.out_img + ny * pb.out_row,
                       one_range ? (ny1 - ny) * pb.out_row * int64_t(sizeof(S)) : 0, steps);
      } else {
        next_in.stop(), next_out.stop();
      }
      for (size_t pi = 0; pi + 1 < panels.size(); ++pi) {
        for (int64_t row = c0; row < c1; ++row) {
          next_in.step(), next_out.step();
          const int64_t y = row - n * pb.Hout;
          const C* arow = buf + (y - y0) * step * re;
          for (size_t gi = panels[pi]; gi < panels[pi + 1]; ++gi) {
            const Group& gr = pb.groups[gi];
            const int64_t* segs = seg_off.data() + gr.first * T * steps;
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
                if constexpr (kPairs) {
#ifdef SPARSEKERN_AMX_BUILD
                  alignas(64) float tmp[common::kMaxBf16TileRows * NR];
                  kernels[ti](a, pb.pix_stride, segs, bs, 2 * NR, NR * NR, gr.count * T * steps, tmp, NR, false);
                  if (ncols == NR) {
                    common::store_tile_bf16<NR / 16>(tmp, mr, pb.bias ? pb.bias + col0 : nullptr, o, pb.out_pix);
                    continue;
                  }
                  for (int i = 0; i < mr; ++i) {
                    for (int64_t c = 0; c < ncols; ++c) {
                      o[i * pb.out_pix + c] = S(tmp[i * NR + c] + (pb.bias ? float(pb.bias[col0 + c]) : 0.f));
                    }
                  }
#endif
                } else if (kDirect && ncols == NR) {
                  kernels[ti](a, pb.pix_stride, segs, gr.count * T, w, bs, NR, reinterpret_cast<C*>(o), pb.out_pix,
                              common::Store::kWrite, reinterpret_cast<const C*>(pb.bias ? pb.bias + col0 : nullptr));
                } else {
                  alignas(64) C tmp[common::kMaxTileRows * NR];
                  kernels[ti](a, pb.pix_stride, segs, gr.count * T, w, bs, NR, tmp, NR, common::Store::kWrite, nullptr);
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
