// sparsekern._C_conv: CPU kernels of the block-sparse Conv2d products, as dispatcher ops
// (fakes in sparsekern/kernels/conv/cpu.py):
//
// sparsekern::conv_forward_cpu     y = conv2d(x, W) (+ bias, in registers)
// sparsekern::conv_grad_input_cpu  dx = conv of dy with W's transposed, flipped taps
// sparsekern::conv_grad_weight_cpu (dvalues, dbias) = the weight gradient sampled on the stored
//                                  blocks, and the bias gradient where asked (else empty)
// Activations: CPU, 4-D NCHW logical shape, any strides (channels-last is read without a
// transpose); outputs are channels-last. float64 / float32 / bfloat16 / float16 (half types
// computed in fp32; bf16 on AVX512-BF16 dot products where dot_bf16_gathers holds, fp32
// accumulation); int64 indices of a valid BlockLayout (checked in O(nnz)). Geometry: see
// conv/geometry.h.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/grouped_product.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "conv/geometry.h"
#include "conv/implicit_gemm.h"
#include "conv/sampled_conv.h"

namespace sparsekern {
namespace conv {

namespace {

using common::Compute;

// An NCHW-shaped tensor whose memory is NHWC, from the allocator of large outputs.
at::Tensor channels_last_output(int64_t N, int64_t Ch, int64_t H, int64_t W, const at::TensorOptions& options) {
  return common::empty_output({N, H, W, Ch}, options).permute({0, 3, 1, 2});
}

void check_activation(const at::Tensor& t, const char* name, int64_t channels, const char* what) {
  check_float(t, name, 4);
  TORCH_CHECK(t.size(1) == channels, name, " has ", t.size(1), " channels, expected ", channels, " (", what, ")");
}

// bf16 products on AMX tiles (the amx path) or AVX512-BF16 dot products (the avx512 path of a
// CPU that has them), square blocks of a multiple of 16 channels (strips of dot_strip columns
// both ways: output columns and K steps of the gathers, dW's columns). Elsewhere bf16 is
// widened to fp32.
bool dot_bf16_gathers(const at::Tensor& t, const Geometry& geo) {
  return t.scalar_type() == at::kBFloat16 && (common::amx_tiles() || common::dot_bf16_tiles()) &&
         geo.bo == geo.bi && geo.bo % 16 == 0;
}

// f(storage tag, compute tag, pairs): bf16 pairs on dot products where dot_bf16_gathers holds,
// else the dtype's storage type and Compute type on the microkernels.
template <typename F>
void dispatch_gathers(const at::Tensor& t, const Geometry& geo, const F& f) {
  if (dot_bf16_gathers(t, geo)) {
    f(std::type_identity<bf16>{}, std::type_identity<bf16>{}, std::true_type{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "conv_gathers", [&] {
    f(std::type_identity<scalar_t>{}, std::type_identity<Compute<scalar_t>>{}, std::false_type{});
  });
}

// gather_conv on the strips of the path (with_strips).
template <typename S, typename C, bool kPairs>
void run_gathers(const GatherProblem<S, C>& pb, int64_t width) {
  with_strips<C, kPairs>(width, [&](auto nr) { gather_conv<S, C, decltype(nr)::value, kPairs>(pb); });
}

// Per tap (kh, kw), how far its input lies from the output pixel's first, for `row` elements
// per input row and `pixel` per input pixel ((1, 0): the tap's row shift; (0, 1): its column shift).
std::vector<int64_t> tap_offsets(const Geometry& geo, int64_t row, int64_t pixel) {
  std::vector<int64_t> off;
  for (int64_t kh = 0; kh < geo.KH; ++kh) {
    for (int64_t kw = 0; kw < geo.KW; ++kw) off.push_back(kh * geo.dh * row + kw * geo.dw * pixel);
  }
  return off;
}

// The input gradient by stride phases: input rows ih = p + s * a of phase p receive dY only
// through the taps k with (p + pad - k * d) divisible by s, from dY row a + shift, shift =
// (p + pad - k * d) / s. Each phase is a stride-1 gather over dY: no stride-dilated copy, no
// products with its zeros (stride 1: one phase, every tap). Per dimension, per phase:
struct Tap {
  int64_t k, shift;
};

std::vector<std::vector<Tap>> phase_taps(int64_t s, int64_t pad, int64_t d, int64_t K) {
  std::vector<std::vector<Tap>> phases(s);
  for (int64_t p = 0; p < s; ++p) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t lead = p + pad - k * d;
      if (((lead % s) + s) % s == 0) phases[p].push_back({k, lead / s});
    }
  }
  return phases;
}

// Pixels of phase p in a dimension of n pixels at stride s (p < min(s, n)).
int64_t phase_count(int64_t n, int64_t p, int64_t s) { return (n - p + s - 1) / s; }

// The placed dY's extent in one dimension: `before` zero rows ahead of dY's first, and `size`
// rows in all, so every (phase pixel a, tap) reads row a + shift + before inside it.
struct Margins {
  int64_t before, size;
};

Margins margins(const std::vector<std::vector<Tap>>& phases, int64_t n, int64_t s, int64_t dy_size) {
  int64_t before = 0, after = dy_size;
  for (int64_t p = 0; p < std::min(s, n); ++p) {
    const int64_t count = phase_count(n, p, s);
    for (const Tap& t : phases[p]) {
      before = std::max(before, -t.shift);
      after = std::max(after, count + t.shift);
    }
  }
  return {before, before + after};
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets,
                   const at::Tensor& col_indices, at::IntArrayRef geometry, const c10::optional<at::Tensor>& bias) {
  const Geometry geo = parse_geometry(geometry);
  check_activation(x, "x", geo.C, "in_channels");
  check_values(values, geo);
  check_same_dtype(x, values);
  const int64_t nnz = values.size(0), RB = geo.RB(), CB = geo.CB();
  check_offsets(row_offsets, "row_offsets", RB, nnz);
  check_index(col_indices, "col_indices", nnz, CB);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_float(*bias, "bias", 1);
    check_same_dtype(x, *bias);
    TORCH_CHECK(bias->size(0) == geo.O, "bias has ", bias->size(0), " entries, expected ", geo.O);
  }
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), Hp = H + geo.pt + geo.pb, Wp = W + geo.pl + geo.pr;
  TORCH_CHECK(Hp >= geo.dh * (geo.KH - 1) + 1 && Wp >= geo.dw * (geo.KW - 1) + 1, "padded input (", Hp, ", ", Wp,
              ") is smaller than the dilated kernel");
  const int64_t Ho = geo.out_h(H), Wo = geo.out_w(W);
  at::Tensor y = channels_last_output(N, geo.O, Ho, Wo, x.options());
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  dispatch_gathers(x, geo, [&](auto s_tag, auto c_tag, auto pairs) {
    using S = typename decltype(s_tag)::type;
    using C = typename decltype(c_tag)::type;
    const int64_t Cp = geo.G * geo.Cgp();
    const at::Tensor src = nhwc_compute<C>(x);
    GatherProblem<S, C> pb;
    pb.place = {src.data_ptr<C>(), H, W, geo.G, geo.Cg(), Hp, Wp, geo.Cgp(), geo.pt, geo.pl};
    pb.row_step = geo.sh, pb.pix_stride = geo.sw * Cp;
    pb.N = N, pb.Hout = Ho, pb.Wout = Wo;
    pb.tap_off = tap_offsets(geo, pb.place.row_elems(), Cp);
    for (int64_t t = 0; t < geo.taps(); ++t) pb.w_tap.push_back(t);
    const int64_t* ro = row_offsets.data_ptr<int64_t>();
    const int64_t* ci = col_indices.data_ptr<int64_t>();
    for (int64_t r = 0; r < RB; ++r) {
      pb.groups.push_back({r * geo.bo, std::min(geo.bo, geo.O - r * geo.bo), ro[r], ro[r + 1] - ro[r]});
      for (int64_t q = ro[r]; q < ro[r + 1]; ++q) {
        pb.blk.push_back(q);
        pb.a_chan.push_back(geo.group_of_row(r) * geo.Cgp() + ci[q] * geo.bi);
      }
    }
    pb.values = values.data_ptr<S>(), pb.bo = geo.bo, pb.bi = geo.bi, pb.value_taps = geo.taps();
    pb.forward = true;
    pb.out = y.data_ptr<S>(), pb.out_pix = geo.O, pb.out_row = Wo * geo.O, pb.out_img = Ho * Wo * geo.O;
    pb.bias = has_bias ? b.data_ptr<S>() : nullptr;
    run_gathers<S, C, decltype(pairs)::value>(pb, geo.bo);
  });
  return y;
}

at::Tensor grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_offsets,
                      const at::Tensor& t_block_ids, const at::Tensor& t_row_indices, at::IntArrayRef geometry,
                      at::IntArrayRef input_size) {
  const Geometry geo = parse_geometry(geometry);
  check_activation(dy, "dy", geo.O, "out_channels");
  check_values(values, geo);
  check_same_dtype(dy, values);
  TORCH_CHECK(input_size.size() == 2, "input_size must be (H, W), got ", input_size);
  const int64_t N = dy.size(0), H = input_size[0], W = input_size[1], nnz = values.size(0);
  TORCH_CHECK(H > 0 && W > 0 && geo.out_h(H) == dy.size(2) && geo.out_w(W) == dy.size(3), "dy has spatial size (",
              dy.size(2), ", ", dy.size(3), ") but an input of ", input_size, " gives (", geo.out_h(H), ", ",
              geo.out_w(W), ")");
  const int64_t RB = geo.RB(), CB = geo.CB();
  check_offsets(col_offsets, "col_offsets", CB, nnz);
  check_index(t_block_ids, "t_block_ids", nnz, nnz);
  check_index(t_row_indices, "t_row_indices", nnz, RB);
  at::Tensor dx = channels_last_output(N, geo.C, H, W, dy.options());
  const auto rows = phase_taps(geo.sh, geo.pt, geo.dh, geo.KH), cols = phase_taps(geo.sw, geo.pl, geo.dw, geo.KW);
  const Margins mh = margins(rows, H, geo.sh, dy.size(2)), mw = margins(cols, W, geo.sw, dy.size(3));
  dispatch_gathers(dy, geo, [&](auto s_tag, auto c_tag, auto pairs) {
    using S = typename decltype(s_tag)::type;
    using C = typename decltype(c_tag)::type;
    const int64_t Op = RB * geo.bo, Wq = mw.size;
    const at::Tensor src = nhwc_compute<C>(dy);
    GatherProblem<S, C> pb;
    pb.place = {src.data_ptr<C>(), dy.size(2), dy.size(3), 1, geo.O, mh.size, Wq, Op, mh.before, mw.before};
    pb.row_step = 1, pb.pix_stride = Op;
    const int64_t* co = col_offsets.data_ptr<int64_t>();
    const int64_t* tb = t_block_ids.data_ptr<int64_t>();
    const int64_t* tr = t_row_indices.data_ptr<int64_t>();
    for (int64_t g = 0; g < geo.G; ++g) {
      for (int64_t c = 0; c < CB; ++c) {
        const int64_t first = int64_t(pb.blk.size());
        for (int64_t q = co[c]; q < co[c + 1]; ++q) {
          if (geo.group_of_row(tr[q]) != g) continue;
          pb.blk.push_back(tb[q]);
          pb.a_chan.push_back(tr[q] * geo.bo);
        }
        pb.groups.push_back({g * geo.Cg() + c * geo.bi, std::min(geo.bi, geo.Cg() - c * geo.bi), first,
                             int64_t(pb.blk.size()) - first});
      }
    }
    pb.values = values.data_ptr<S>(), pb.bo = geo.bo, pb.bi = geo.bi, pb.value_taps = geo.taps();
    pb.forward = false, pb.bias = nullptr;
    pb.N = N, pb.out_pix = geo.sw * geo.C, pb.out_row = geo.sh * W * geo.C, pb.out_img = H * W * geo.C;
    for (int64_t py = 0; py < std::min(geo.sh, H); ++py) {
      for (int64_t px = 0; px < std::min(geo.sw, W); ++px) {
        pb.Hout = phase_count(H, py, geo.sh), pb.Wout = phase_count(W, px, geo.sw);
        pb.tap_off.clear(), pb.w_tap.clear();
        for (const Tap& u : rows[py]) {
          for (const Tap& v : cols[px]) {
            pb.tap_off.push_back((u.shift + mh.before) * pb.place.row_elems() + (v.shift + mw.before) * Op);
            pb.w_tap.push_back(u.k * geo.KW + v.k);
          }
        }
        if (pb.tap_off.empty()) {  // no tap reaches this phase's pixels: their gradient is zero
          dx.slice(2, py, H, geo.sh).slice(3, px, W, geo.sw).zero_();
          continue;
        }
        pb.out = dx.data_ptr<S>() + (py * W + px) * geo.C;
        run_gathers<S, C, decltype(pairs)::value>(pb, geo.bi);
      }
    }
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> grad_weight(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& row_indices, const at::Tensor& col_indices,
                                               at::IntArrayRef geometry, bool bias_grad) {
  const Geometry geo = parse_geometry(geometry);
  check_activation(dy, "dy", geo.O, "out_channels");
  check_activation(x, "x", geo.C, "in_channels");
  check_same_dtype(dy, x);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), nnz = row_indices.numel();
  TORCH_CHECK(dy.size(0) == N, "dy has batch ", dy.size(0), " but x has ", N);
  const int64_t Hp = H + geo.pt + geo.pb, Wp = W + geo.pl + geo.pr;
  TORCH_CHECK(Hp >= geo.dh * (geo.KH - 1) + 1 && Wp >= geo.dw * (geo.KW - 1) + 1 && geo.out_h(H) == dy.size(2) &&
                  geo.out_w(W) == dy.size(3),
              "dy has spatial size (", dy.size(2), ", ", dy.size(3), ") but x of (", H, ", ", W, ") gives (",
              geo.out_h(H), ", ", geo.out_w(W), ")");
  check_index(row_indices, "row_indices", nnz, geo.RB());
  check_index(col_indices, "col_indices", nnz, geo.CB());
  at::Tensor dvalues = common::empty_output({nnz, geo.bo, geo.bi, geo.KH, geo.KW}, x.options());
  at::Tensor dbias = at::empty({bias_grad ? geo.O : 0}, dy.options());
  dispatch_gathers(x, geo, [&](auto s_tag, auto c_tag, auto pairs) {
    using S = typename decltype(s_tag)::type;
    using C = typename decltype(c_tag)::type;
    const at::Tensor src = nhwc_compute<C>(x);
    const at::Tensor d = nhwc_compute<C>(dy);
    SampledProblem<C> pb;
    pb.dy = d.data_ptr<C>(), pb.O = geo.O, pb.x = src.data_ptr<C>(), pb.H = H, pb.W = W, pb.Cx = geo.C;
    pb.sh = geo.sh, pb.sw = geo.sw, pb.pt = geo.pt, pb.pl = geo.pl;
    pb.N = N, pb.Hout = dy.size(2), pb.Wout = dy.size(3);
    pb.tap_y = tap_offsets(geo, 1, 0), pb.tap_x = tap_offsets(geo, 0, 1);
    pb.rows = row_indices.data_ptr<int64_t>();
    const int64_t* ci = col_indices.data_ptr<int64_t>();
    for (int64_t q = 0; q < nnz; ++q) {
      pb.a_chan.push_back(geo.group_of_row(pb.rows[q]) * geo.Cg() + ci[q] * geo.bi);
      pb.a_width.push_back(std::min(geo.bi, geo.Cg() - ci[q] * geo.bi));
    }
    pb.nnz = nnz, pb.bo = geo.bo, pb.bi = geo.bi;
    constexpr bool kPairs = decltype(pairs)::value;
    with_strips<C, kPairs>(geo.bi, [&](auto nr) {
      sampled_conv<S, C, decltype(nr)::value, kPairs>(pb, dvalues.data_ptr<S>(),
                                                      bias_grad ? dbias.data_ptr<S>() : nullptr);
    });
  });
  return {dvalues, dbias};
}

}  // namespace
}  // namespace conv
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.conv.cpu");
  m.def("conv_forward_cpu(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, int[] geometry, "
        "Tensor? bias=None) -> Tensor");
  m.def("conv_grad_input_cpu(Tensor dy, Tensor values, Tensor col_offsets, Tensor t_block_ids, "
        "Tensor t_row_indices, int[] geometry, int[] input_size) -> Tensor");
  m.def("conv_grad_weight_cpu(Tensor dy, Tensor x, Tensor row_indices, Tensor col_indices, int[] geometry, "
        "bool bias_grad=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("conv_forward_cpu", &sparsekern::conv::forward);
  m.impl("conv_grad_input_cpu", &sparsekern::conv::grad_input);
  m.impl("conv_grad_weight_cpu", &sparsekern::conv::grad_weight);
}

// Controls, not products: plain module functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  sparsekern::common::def_output_cache(m);
  sparsekern::common::def_path_controls(m, sparsekern::common::Bf16Products::kDotAndAmx);
}
