// sparsekern._C_lowrank: the token-streaming products of a low-rank layer, as dispatcher ops
// (fakes in sparsekern/kernels/lowrank/cpu.py):
//
// sparsekern::lowrank_matmul_cpu             a @ b (b: (K, N)) or a @ bᵀ (b: (N, K)), + bias
// sparsekern::lowrank_transposed_matmul_cpu  (aᵀ b, a's column sums or None)
//
// A low-rank layer's four products that stream a (tokens x features) matrix
// (x V, b Uᵀ + bias, dY U, H Vᵀ) have one narrow side r. They run on the
// block-sparse driver (csrc/common/grouped_product.h) with one block holding the
// whole narrow factor: the factor is packed once into NR-column strips, the
// tokens are read in place, six rows at a time (twelve on AVX-512), and the bias seeds the
// accumulators (MKL's addmm instead copies the bias into the whole output
// first, one more pass over 32 MB at 2048 x 4096). At r = 64 this
// runs at 152-174 GFLOP/s on 2 Zen3 cores where MKL's sgemm reaches 134-160 at
// these shapes (docs/low_rank.md). The two token reductions (dYᵀ a, Xᵀ G) have
// their own driver on the same microkernel (lowrank/token_reduction.h).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "common/grouped_product.h"
#include "common/huge_page_output.h"
#include "common/microkernel.h"
#include "lowrank/token_reduction.h"

namespace sparsekern {
namespace lowrank {

namespace {

using common::Compute;
using common::empty_output;
using common::scalar_type_of;

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              name, " has unsupported dtype ", st);
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& b, bool transpose_b, const c10::optional<at::Tensor>& bias) {
  check_matrix(a, "a");
  check_matrix(b, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtype mismatch: a is ", a.scalar_type(), ", b is ",
              b.scalar_type());
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t Kb = transpose_b ? b.size(1) : b.size(0), N = transpose_b ? b.size(0) : b.size(1);
  TORCH_CHECK(K == Kb, "a of shape ", a.sizes(), " cannot multiply b", transpose_b ? "ᵀ" : "", " of shape ",
              b.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "bias must be a contiguous CPU vector of ", N, " entries, got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), "bias has dtype ", bias->scalar_type(), ", a has ",
                a.scalar_type());
  }
  at::Tensor out = empty_output({M, N}, a.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return has_bias ? out.copy_(bias->expand({M, N})) : out.zero_();
  // One group, one member: the whole of b is block 0, taken as (K, N) or, transposed, from (N, K).
  const int64_t offsets[2] = {0, 1}, seg[1] = {0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lowrank_matmul", [&] {
    using C = Compute<scalar_t>;
    const at::Tensor a_c = a.scalar_type() == scalar_type_of<C>() ? a : a.to(scalar_type_of<C>());
    common::with_strip_width<C>([&](auto nr) {
      common::grouped_product<scalar_t, C, decltype(nr)::value>(a_c.data_ptr<C>(), M, K, b.data_ptr<scalar_t>(), b.size(0),
                                                 b.size(1), transpose_b, offsets, 1, nullptr, seg,
                                                 out.data_ptr<scalar_t>(),
                                                 has_bias ? bias->data_ptr<scalar_t>() : nullptr);
    }, N);
  });
  return out;
}

// aᵀ b and, if asked, the column sums of a (in a's dtype; half types accumulate in float).
std::tuple<at::Tensor, c10::optional<at::Tensor>> transposed_matmul(const at::Tensor& a, const at::Tensor& b,
                                                                   bool column_sums) {
  check_matrix(a, "a");
  check_matrix(b, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "dtype mismatch: a is ", a.scalar_type(), ", b is ",
              b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0), "aᵀ b needs as many rows in a as in b: a has shape ", a.sizes(),
              ", b has shape ", b.sizes());
  const int64_t T = a.size(0), M = a.size(1), N = b.size(1);
  at::Tensor out, sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lowrank_transposed_matmul", [&] {
    using C = Compute<scalar_t>;
    const auto ct = scalar_type_of<C>();
    const at::Tensor a_c = a.scalar_type() == ct ? a : a.to(ct), b_c = b.scalar_type() == ct ? b : b.to(ct);
    out = empty_output({M, N}, a.options().dtype(ct));
    if (column_sums) sums = at::empty({M}, a.options().dtype(ct));
    common::with_strip_width<C>([&](auto nr) {
      token_reduction<C, decltype(nr)::value>(a_c.data_ptr<C>(), b_c.data_ptr<C>(), T, M, N, out.data_ptr<C>(),
                               column_sums ? sums.data_ptr<C>() : nullptr);
    }, N);
  });
  if (out.scalar_type() != a.scalar_type()) {
    out = out.to(a.scalar_type());
    if (column_sums) sums = sums.to(a.scalar_type());
  }
  return {out, column_sums ? c10::optional<at::Tensor>(sums) : c10::nullopt};
}

}  // namespace
}  // namespace lowrank
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.set_python_module("sparsekern.kernels.lowrank.cpu");
  m.def("lowrank_matmul_cpu(Tensor a, Tensor b, bool transpose_b, Tensor? bias=None) -> Tensor");
  m.def("lowrank_transposed_matmul_cpu(Tensor a, Tensor b, bool column_sums=False) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("lowrank_matmul_cpu", &sparsekern::lowrank::matmul);
  m.impl("lowrank_transposed_matmul_cpu", &sparsekern::lowrank::transposed_matmul);
}

// Controls, not products: plain module functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  sparsekern::common::def_output_cache(m);
  sparsekern::common::def_path_controls(m);
}
