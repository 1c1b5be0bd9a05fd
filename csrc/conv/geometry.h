// The shape of one block-sparse convolution, as it crosses the op boundary (an int list),
// and the checks every conv op runs on its arguments before a kernel reads anything.
//
// Weight (O, C / G, KH, KW) cut into blocks of bo output x bi input channels, each holding
// all KH x KW taps: values (nnz, bo, bi, KH, KW). The block grid is (RB, CB) with
// CB = ceil(Cg / bi) columns per group's input channels; with groups > 1 every group holds
// a whole number of output block rows (Og % bo == 0), so block row r belongs to group
// r * bo / Og. Channels beyond O (last block row) or beyond Cg (last block column of a
// group) are padding: the kernels read them as zero and never write them.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace sparsekern {
namespace conv {

struct Geometry {
  int64_t C, O, G, KH, KW, sh, sw, pt, pb, pl, pr, dh, dw, bo, bi;

  int64_t Cg() const { return C / G; }
  int64_t Og() const { return O / G; }
  int64_t RB() const { return (O + bo - 1) / bo; }
  int64_t CB() const { return (Cg() + bi - 1) / bi; }
  int64_t Cgp() const { return CB() * bi; }  // a group's input channels padded to whole blocks
  int64_t taps() const { return KH * KW; }
  int64_t group_of_row(int64_t r) const { return G == 1 ? 0 : r * bo / Og(); }
  int64_t out_h(int64_t H) const { return (H + pt + pb - dh * (KH - 1) - 1) / sh + 1; }
  int64_t out_w(int64_t W) const { return (W + pl + pr - dw * (KW - 1) - 1) / sw + 1; }
};

// geometry = [C, O, G, KH, KW, sh, sw, pt, pb, pl, pr, dh, dw, bo, bi]
inline Geometry parse_geometry(at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 15, "geometry must have 15 entries, got ", g.size());
  Geometry geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13], g[14]};
  TORCH_CHECK(geo.C > 0 && geo.O > 0 && geo.G > 0 && geo.KH > 0 && geo.KW > 0 && geo.bo > 0 && geo.bi > 0,
              "channels, groups, kernel and block sizes must be positive, got ", g);
  TORCH_CHECK(geo.sh > 0 && geo.sw > 0 && geo.dh > 0 && geo.dw > 0, "stride and dilation must be positive, got ", g);
  TORCH_CHECK(geo.pt >= 0 && geo.pb >= 0 && geo.pl >= 0 && geo.pr >= 0, "padding must be non-negative, got ", g);
  TORCH_CHECK(geo.C % geo.G == 0 && geo.O % geo.G == 0, "channels (", geo.C, ", ", geo.O,
              ") must be divisible by groups ", geo.G);
  TORCH_CHECK(geo.G == 1 || geo.Og() % geo.bo == 0, "with groups > 1, output channels per group (", geo.Og(),
              ") must be a multiple of the block size ", geo.bo);
  return geo;
}

inline void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              " has unsupported dtype ", st);
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtype mismatch: ", a.scalar_type(), " vs ", b.scalar_type());
}

inline void check_values(const at::Tensor& values, const Geometry& geo) {
  check_float(values, "values", 5);
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(values.size(1) == geo.bo && values.size(2) == geo.bi && values.size(3) == geo.KH &&
                  values.size(4) == geo.KW,
              "values has shape ", values.sizes(), ", expected (nnz, ", geo.bo, ", ", geo.bi, ", ", geo.KH, ", ",
              geo.KW, ")");
}

inline void check_index(const at::Tensor& t, const char* name, int64_t numel, int64_t bound) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " entries, expected ", numel);
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < numel; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is outside [0, ", bound, ")");
  }
}

inline void check_offsets(const at::Tensor& t, const char* name, int64_t groups, int64_t nnz) {
  check_index(t, name, groups + 1, nnz + 1);
  const int64_t* p = t.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[groups] == nnz, name, " must run from 0 to nnz = ", nnz);
  for (int64_t i = 0; i < groups; ++i) TORCH_CHECK(p[i] <= p[i + 1], name, " must be non-decreasing");
}

}  // namespace conv
}  // namespace sparsekern
