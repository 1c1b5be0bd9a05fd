// The transposable 2:4 patterns of csrc/semi/prune.cpp, shared with the DST update kernels.
#pragma once

#include <ATen/ATen.h>

namespace sparsekern {
namespace semi {

// The 90 transposable 4x4 patterns in the order prune_compress scores them, (90, 16) bool.
at::Tensor transposable_pattern_table();

}  // namespace semi
}  // namespace sparsekern
