// The 2:4 dynamic-sparse-training update on CPU (csrc/semi/dst_update.cpp), bound in semi.cpp's
// module; the plain-torch rules in sparsekern/methods/functional.py are the fallback and the oracle.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace sparsekern {
namespace semi {

// Status codes of the checks these functions make on the mask (the caller raises the error).
constexpr int64_t kMaskOk = 0;
constexpr int64_t kMaskNotRows = 1;          // some group of 4 along a row does not keep exactly 2
constexpr int64_t kMaskNotTransposable = 2;  // some tile column does not keep exactly 2

// sparsekern.methods.functional.semi_drop_and_grow on (rows, cols) float32/float64 contiguous
// tensors (drop and grow of one dtype), with |.| taken of both scores when `absolute`.
// Returns (status, new bool mask, new weight): the new weight (only if `with_weight`, else an
// undefined tensor) is `drop` where the entry is kept before and after, else zero.
std::tuple<int64_t, at::Tensor, at::Tensor> dst_drop_grow(const at::Tensor& drop, const at::Tensor& mask,
                                                          const at::Tensor& grow, int64_t n_drop,
                                                          bool transposable, bool absolute, bool with_weight);

// SemiSparseLinear.set_mask's bookkeeping for the new bool (rows, cols) 2:4 `mask`: returns
// (status, slots int64 (rows, cols/2): the slot under `old_indices` of each new kept weight or -1,
// the new packed indices, and those of the transpose if `transposable`, else undefined).
std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor> dst_restructure(const at::Tensor& mask,
                                                                        const at::Tensor& old_indices,
                                                                        bool transposable);

// out = tensor.flatten()[slots] where slots >= 0, else 0 (shape of slots): values and optimizer
// state moved to a new structure. Any floating dtype.
at::Tensor dst_carry(const at::Tensor& tensor, const at::Tensor& slots);

// Dense (rows, cols) sum of 2:4-compressed (values, packed indices) pairs of one float dtype.
at::Tensor dst_decompress_sum(const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& indices,
                              int64_t cols);

}  // namespace semi
}  // namespace sparsekern
