// Software prefetch of the next chunk's operands while the current chunk computes.
//
// A thread that walks its rows chunk by chunk touches each chunk's activations once, and
// right after another large product they come from DRAM: the placement copy and the output
// stores then stall the microkernels (a conv product ran 15-20 % slower right after a dense
// one than back to back). The chunk's work is long enough to hide that latency, so the next chunk's
// byte ranges are prefetched into L2 in even shares, one share per unit of work.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparsekern {
namespace common {

class AheadStream {
 public:
  // Prefetch [begin, begin + bytes) over the next `steps` calls of step(); nothing where bytes <= 0.
  void start(const void* begin, int64_t bytes, int64_t steps) {
    const auto first = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(kLine - 1);
    p_ = reinterpret_cast<const char*>(first);
    end_ = bytes > 0 ? static_cast<const char*>(begin) + bytes : p_;
    const int64_t lines = (end_ - p_ + kLine - 1) / kLine;
    per_step_ = lines > 0 ? (lines + std::max<int64_t>(1, steps) - 1) / std::max<int64_t>(1, steps) : 0;
  }

  void stop() { p_ = end_ = nullptr, per_step_ = 0; }

  void step() {
    for (int64_t i = 0; i < per_step_ && p_ < end_; ++i, p_ += kLine) __builtin_prefetch(p_, 0, 2);  // to L2
  }

 private:
  static constexpr int64_t kLine = 64;
  const char* p_ = nullptr;
  const char* end_ = nullptr;
  int64_t per_step_ = 0;
};

}  // namespace common
}  // namespace sparsekern
