// sparsekern._C_bsr: CPU kernels of the block-sparse linear products, as dispatcher ops
// (fakes in sparsekern/kernels/bsr/cpu.py):
//
// sparsekern::bsr_forward_cpu     y = x Wᵀ (+ bias, in registers)
// sparsekern::bsr_grad_input_cpu  dx = dy W, W walked by block columns (transpose metadata)
// sparsekern::bsr_grad_weight_cpu dvalues = (dyᵀ x) sampled on the stored blocks, and (bias_grad)
//                                 dy's column sums on the same pass over dy (else an empty tensor)
// Tensors: CPU, contiguous, float64 / float32 / bfloat16 / float16 (half types
// computed in fp32), int64 indices of a valid BlockLayout (checked in O(nnz)).
// bf16 with block sides that are multiples of 32 runs on AMX tiles on the amx path, and on
// AVX512-BF16 dot products on the avx512 path of a CPU that has them; other blocks of a
// multiple of 16 run on those dot products on the avx512 path too.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/grouped_product.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "common/packed_rows_product.h"
#include "bsr/bf16_products.h"
#include "bsr/sampled_product.h"

namespace sparsekern {
namespace bsr {

namespace {

using common::Compute;
using common::empty_output;
using common::grouped_product;
using common::scalar_type_of;

void check_dense(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              name, " has unsupported dtype ", st);
}

void check_index(const at::Tensor& t, const char* name, int64_t numel, int64_t bound) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              name, " must be a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " entries, expected ", numel);
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < numel; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, "[", i, "] = ", p[i], " is outside [0, ", bound, ")");
  }
}

void check_offsets(const at::Tensor& t, const char* name, int64_t groups, int64_t nnz) {
  check_index(t, name, groups + 1, nnz + 1);
  const int64_t* p = t.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[groups] == nnz, name, " must run from 0 to nnz = ", nnz);
  for (int64_t i = 0; i < groups; ++i) TORCH_CHECK(p[i] <= p[i + 1], name, " must be non-decreasing");
}

// The activations as the microkernels read them: half types widened to fp32 once.
template <typename C>
at::Tensor in_compute_type(const at::Tensor& t) {
  return t.scalar_type() == scalar_type_of<C>() ? t : t.to(scalar_type_of<C>());
}

// What computes bf16 products of (br, bc) blocks on the current path: whole 32 x 32 tiles on AMX
// (the amx path) or on AVX512-BF16 dot products (the avx512 path of a CPU that has them); other
// blocks of a multiple of 16 on 16-column strips, on AMX at half depth (the amx path) or on dot
// products (the avx512 path); everything else widened to fp32.
enum class Bf16Engine { kWidened, kAmxTiles, kDotTiles, kAmxStrips, kDotStrips };

Bf16Engine bf16_engine(int64_t br, int64_t bc) {
#ifdef SPARSEKERN_AMX_BUILD
  if (br % common::kAmxTile == 0 && bc % common::kAmxTile == 0) {
    if (common::amx_tiles()) return Bf16Engine::kAmxTiles;
    if (common::dot_bf16_tiles()) return Bf16Engine::kDotTiles;
  }
  if (br % 16 == 0 && bc % 16 == 0) {
    if (common::amx_tiles()) return Bf16Engine::kAmxStrips;
    if (common::dot_bf16_tiles()) return Bf16Engine::kDotStrips;
  }
#endif
  return Bf16Engine::kWidened;
}

#ifdef SPARSEKERN_AMX_BUILD
Bf16Engine bf16_engine_of(const at::Tensor& t, int64_t br, int64_t bc) {
  return t.scalar_type() == at::kBFloat16 ? bf16_engine(br, bc) : Bf16Engine::kWidened;
}
#endif

std::string bf16_engine_name(int64_t br, int64_t bc) {
  TORCH_CHECK(br > 0 && bc > 0, "block size (", br, ", ", bc, ") must be positive");
  switch (bf16_engine(br, bc)) {
    case Bf16Engine::kAmxTiles: return "amx tiles";
    case Bf16Engine::kDotTiles: return "dot-product tiles";
    case Bf16Engine::kAmxStrips: return "amx strips";
    case Bf16Engine::kDotStrips: return "dot-product strips";
    default: return "widened to fp32";
  }
}

void check_same(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtype mismatch: ", a.scalar_type(), " vs ", b.scalar_type());
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets,
                   const at::Tensor& col_indices, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  check_dense(x, "x", 2);
  check_dense(values, "values", 3);
  check_same(x, values);
  const int64_t M = x.size(0), K = x.size(1), nnz = values.size(0), br = values.size(1), bc = values.size(2);
  TORCH_CHECK(br > 0 && bc > 0 && out_features % br == 0 && K % bc == 0, "shape (", out_features, ", ", K,
              ") is not divisible by block size (", br, ", ", bc, ")");
  const int64_t RB = out_features / br;
  check_offsets(row_offsets, "row_offsets", RB, nnz);
  check_index(col_indices, "col_indices", nnz, K / bc);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dense(*bias, "bias", 1);
    check_same(x, *bias);
    TORCH_CHECK(bias->size(0) == out_features, "bias has ", bias->size(0), " entries, expected ", out_features);
  }
  at::Tensor y = empty_output({M, out_features}, x.options());
#ifdef SPARSEKERN_AMX_BUILD
  using common::bf16;
  const Bf16Engine engine = bf16_engine_of(x, br, bc);
  auto tiles = [&](auto tag) {
    bf16_grouped_product<typename decltype(tag)::type>(
        x.data_ptr<bf16>(), M, K, values.data_ptr<bf16>(), br, bc, /*transpose=*/true, row_offsets.data_ptr<int64_t>(),
        RB, nullptr, col_indices.data_ptr<int64_t>(), y.data_ptr<bf16>(), has_bias ? bias->data_ptr<bf16>() : nullptr);
    return y;
  };
  if (engine == Bf16Engine::kAmxTiles) return tiles(std::type_identity<common::AmxEngine>{});
  if (engine == Bf16Engine::kDotTiles) return tiles(std::type_identity<common::DotEngine>{});
  if (engine == Bf16Engine::kAmxStrips) return tiles(std::type_identity<common::AmxStripEngine>{});
  if (engine == Bf16Engine::kDotStrips) {
    grouped_product<bf16, bf16, 16, true>(x.data_ptr<bf16>(), M, K, values.data_ptr<bf16>(), br, bc, /*transpose=*/true,
                                          row_offsets.data_ptr<int64_t>(), RB, nullptr, col_indices.data_ptr<int64_t>(),
                                          y.data_ptr<bf16>(), has_bias ? bias->data_ptr<bf16>() : nullptr);
    return y;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_forward", [&] {
    using C = Compute<scalar_t>;
    const at::Tensor xc = in_compute_type<C>(x);
    if constexpr (std::is_same<scalar_t, C>::value) {
      if (common::packed_rows(M)) {
        common::packed_rows_product<C>(xc.data_ptr<C>(), M, K, values.data_ptr<C>(), br, bc, /*transpose=*/true,
                                       row_offsets.data_ptr<int64_t>(), RB, nullptr, col_indices.data_ptr<int64_t>(),
                                       y.data_ptr<C>(), has_bias ? bias->data_ptr<C>() : nullptr);
        return;
      }
    }
    common::with_strip_width<C>([&](auto nr) {
      grouped_product<scalar_t, C, decltype(nr)::value>(xc.data_ptr<C>(), M, K, values.data_ptr<scalar_t>(), br, bc,
                                         /*transpose=*/true, row_offsets.data_ptr<int64_t>(), RB, nullptr,
                                         col_indices.data_ptr<int64_t>(), y.data_ptr<scalar_t>(),
                                         has_bias ? bias->data_ptr<scalar_t>() : nullptr);
    }, br);
  });
  return y;
}

at::Tensor grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& col_offsets,
                      const at::Tensor& t_block_ids, const at::Tensor& t_row_indices, int64_t in_features) {
  check_dense(dy, "dy", 2);
  check_dense(values, "values", 3);
  check_same(dy, values);
  const int64_t M = dy.size(0), N = dy.size(1), nnz = values.size(0), br = values.size(1), bc = values.size(2);
  TORCH_CHECK(br > 0 && bc > 0 && N % br == 0 && in_features % bc == 0, "shape (", N, ", ", in_features,
              ") is not divisible by block size (", br, ", ", bc, ")");
  const int64_t CB = in_features / bc;
  check_offsets(col_offsets, "col_offsets", CB, nnz);
  check_index(t_block_ids, "t_block_ids", nnz, nnz);
  check_index(t_row_indices, "t_row_indices", nnz, N / br);
  at::Tensor dx = empty_output({M, in_features}, dy.options());
#ifdef SPARSEKERN_AMX_BUILD
  using common::bf16;
  const Bf16Engine engine = bf16_engine_of(dy, br, bc);
  auto tiles = [&](auto tag) {
    bf16_grouped_product<typename decltype(tag)::type>(
        dy.data_ptr<bf16>(), M, N, values.data_ptr<bf16>(), br, bc, /*transpose=*/false, col_offsets.data_ptr<int64_t>(),
        CB, t_block_ids.data_ptr<int64_t>(), t_row_indices.data_ptr<int64_t>(), dx.data_ptr<bf16>(), nullptr);
    return dx;
  };
  if (engine == Bf16Engine::kAmxTiles) return tiles(std::type_identity<common::AmxEngine>{});
  if (engine == Bf16Engine::kDotTiles) return tiles(std::type_identity<common::DotEngine>{});
  if (engine == Bf16Engine::kAmxStrips) return tiles(std::type_identity<common::AmxStripEngine>{});
  if (engine == Bf16Engine::kDotStrips) {
    grouped_product<bf16, bf16, 16, true>(dy.data_ptr<bf16>(), M, N, values.data_ptr<bf16>(), br, bc,
                                          /*transpose=*/false, col_offsets.data_ptr<int64_t>(), CB,
                                          t_block_ids.data_ptr<int64_t>(), t_row_indices.data_ptr<int64_t>(),
                                          dx.data_ptr<bf16>());
    return dx;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "bsr_grad_input", [&] {
    using C = Compute<scalar_t>;
    const at::Tensor dyc = in_compute_type<C>(dy);
    if constexpr (std::is_same<scalar_t, C>::value) {
      if (common::packed_rows(M)) {
        common::packed_rows_product<C>(dyc.data_ptr<C>(), M, N, values.data_ptr<C>(), br, bc, /*transpose=*/false,
                                       col_offsets.data_ptr<int64_t>(), CB, t_block_ids.data_ptr<int64_t>(),
                                       t_row_indices.data_ptr<int64_t>(), dx.data_ptr<C>());
        return;
      }
    }
    common::with_strip_width<C>([&](auto nr) {
      grouped_product<scalar_t, C, decltype(nr)::value>(dyc.data_ptr<C>(), M, N, values.data_ptr<scalar_t>(), br, bc,
                                         /*transpose=*/false, col_offsets.data_ptr<int64_t>(), CB,
                                         t_block_ids.data_ptr<int64_t>(), t_row_indices.data_ptr<int64_t>(),
                                         dx.data_ptr<scalar_t>());
    }, bc);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> grad_weight(const at::Tensor& dy, const at::Tensor& x,
                                               const at::Tensor& row_indices, const at::Tensor& col_indices,
                                               int64_t br, int64_t bc, bool bias_grad) {
  check_dense(dy, "dy", 2);
  check_dense(x, "x", 2);
  check_same(dy, x);
  const int64_t M = x.size(0), N = dy.size(1), K = x.size(1), nnz = row_indices.numel();
  TORCH_CHECK(dy.size(0) == M, "dy has ", dy.size(0), " rows but x has ", M);
  TORCH_CHECK(br > 0 && bc > 0 && N % br == 0 && K % bc == 0, "shape (", N, ", ", K,
              ") is not divisible by block size (", br, ", ", bc, ")");
  check_index(row_indices, "row_indices", nnz, N / br);
  check_index(col_indices, "col_indices", nnz, K / bc);
  at::Tensor dvalues = empty_output({nnz, br, bc}, x.options());
  at::Tensor dbias = at::empty({bias_grad ? N : 0}, dy.options());
#ifdef SPARSEKERN_AMX_BUILD
  using common::bf16;
  const Bf16Engine engine = bf16_engine_of(x, br, bc);
  auto tiles = [&](auto tag) {
    bf16_sampled_product<typename decltype(tag)::type>(dy.data_ptr<bf16>(), x.data_ptr<bf16>(), M, N, K, br, bc,
                                                       row_indices.data_ptr<int64_t>(), col_indices.data_ptr<int64_t>(),
                                                       nnz, dvalues.data_ptr<bf16>(),
                                                       bias_grad ? dbias.data_ptr<bf16>() : nullptr);
    return std::make_tuple(dvalues, dbias);
  };
  if (engine == Bf16Engine::kAmxTiles) return tiles(std::type_identity<common::AmxEngine>{});
  if (engine == Bf16Engine::kDotTiles) return tiles(std::type_identity<common::DotEngine>{});
  if (engine == Bf16Engine::kAmxStrips) return tiles(std::type_identity<common::AmxEngine16>{});
  if (engine == Bf16Engine::kDotStrips) return tiles(std::type_identity<common::DotEngine16>{});
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bsr_grad_weight", [&] {
    using C = Compute<scalar_t>;
    const at::Tensor dyc = in_compute_type<C>(dy), xc = in_compute_type<C>(x);
    common::with_strip_width<C>([&](auto nr) {
      sampled_product<scalar_t, C, decltype(nr)::value>(dyc.data_ptr<C>(), xc.data_ptr<C>(), M, N, K, br, bc,
                                         row_indices.data_ptr<int64_t>(), col_indices.data_ptr<int64_t>(), nnz,
                                         dvalues.data_ptr<scalar_t>(),
                                         bias_grad ? dbias.data_ptr<scalar_t>() : nullptr);
    }, bc);
  });
  return {dvalues, dbias};
}

}  // namespace
}  // namespace bsr
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.bsr.cpu");
  m.def("bsr_forward_cpu(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, int out_features, "
        "Tensor? bias=None) -> Tensor");
  m.def("bsr_grad_input_cpu(Tensor dy, Tensor values, Tensor col_offsets, Tensor t_block_ids, "
        "Tensor t_row_indices, int in_features) -> Tensor");
  m.def("bsr_grad_weight_cpu(Tensor dy, Tensor x, Tensor row_indices, Tensor col_indices, int block_rows, "
        "int block_cols, bool bias_grad=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bsr_forward_cpu", &sparsekern::bsr::forward);
  m.impl("bsr_grad_input_cpu", &sparsekern::bsr::grad_input);
  m.impl("bsr_grad_weight_cpu", &sparsekern::bsr::grad_weight);
}

// Controls, not products: plain module functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  sparsekern::common::def_output_cache(m);
  sparsekern::common::def_path_controls(m, sparsekern::common::Bf16Products::kDotAndAmx);
  m.def("bf16_engine", &sparsekern::bsr::bf16_engine_name,
        "what computes bf16 products of (block_rows, block_cols) blocks on the current path: 'amx tiles', "
        "'dot-product tiles', 'dot-product strips' or 'widened to fp32'");
}
