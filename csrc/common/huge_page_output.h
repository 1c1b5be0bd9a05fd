// Output tensors on transparent huge pages.
//
// A fresh 32 MB output (2048 tokens x 4096 features, fp32) is new anonymous
// memory: its first write takes 8192 page faults, each zeroing a 4 KB page.
// On this project's 2-core machine that costs ~14 ms per output (one thread),
// as much as the product that writes it at rank 64. Asking the kernel for 2 MB
// pages (madvise MADV_HUGEPAGE on a 2 MB-aligned block) cuts the faults 512x
// and the cost to ~3 ms. torch does the same for every tensor when the
// environment sets THP_MEM_ALLOC_ENABLE=1; this allocator does it for our
// outputs only, by default. Memory is freed on release like any tensor's: no
// cache, no pool. Where THP is off ("never") the advice is a no-op.
#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/extension.h>

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace sparsekern {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
#ifdef __linux__
    if (nbytes >= kHugePage) {
      const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      void* data = nullptr;
      TORCH_CHECK(posix_memalign(&data, kHugePage, rounded) == 0, "out of memory allocating ", nbytes, " bytes");
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: a failure leaves 4 KB pages
      return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetCPUAllocator()->allocate(nbytes);
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  static void release(void* data) { std::free(data); }
};

inline HugePageAllocator* huge_page_allocator() {
  static HugePageAllocator allocator;
  return &allocator;
}

// at::empty for a CPU output that will be written in full.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

}  // namespace sparsekern
