// Work partitioning shared by the products.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparsekern {
namespace common {

constexpr int64_t kMinWorkPerThread = 1 << 17;  // multiply-adds; below this a thread costs more than it saves

// Threads worth using for `work` multiply-adds (or element copies). Small calls
// stay on the caller's thread: waking the pool costs more than they do, and on
// a busy machine a parallel region waits for every thread to be scheduled.
inline int64_t threads_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
}

// at::parallel_for over [0, n) in at most threads_for(work) chunks.
template <typename F>
void parallel_for_work(int64_t n, int64_t work, const F& fn) {
  const int64_t threads = threads_for(work);
  at::parallel_for(0, n, (n + threads - 1) / threads, fn);
}

// Splits the items of [0, n) into contiguous ranges of about equal total cost, one per
// thread, and runs fn(begin, end) on each. `prefix` holds the n + 1 running sums of the
// item costs (multiply-adds). Power-law block rows are why this is by cost and not by
// item count.
template <typename F>
void parallel_ranges_by_cost(const std::vector<int64_t>& prefix, const F& fn) {
  const int64_t n = static_cast<int64_t>(prefix.size()) - 1;
  if (n <= 0) return;
  const int64_t total = prefix.back();
  const int64_t parts = std::min<int64_t>(threads_for(total), n);
  auto start = [&](int64_t p) -> int64_t {
    if (p >= parts) return n;
    const int64_t target = total / parts * p + (total % parts) * p / parts;
    return std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  };
  // grain 1 over `parts` items: each thread of the pool runs one part.
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(start(p), start(p + 1));
  });
}

}  // namespace common
}  // namespace sparsekern
