// 2:4 prune + compress on CPU (csrc/semi/prune.cpp), bound in semi.cpp's module.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sparsekern {
namespace semi {

// dense (N, K) float32 -> [values (N, K/2), indices uint8 (N, ceil(K/8))] and, if
// transposable, also [values_t (K, N/2), indices_t (K, ceil(N/8))] (Wᵀ's compression).
std::vector<at::Tensor> prune_compress(const at::Tensor& dense, bool transposable);

// The 90 transposable 4x4 patterns in the order the kernel scores them, (90, 16) bool.
at::Tensor transposable_pattern_table();

}  // namespace semi
}  // namespace sparsekern
