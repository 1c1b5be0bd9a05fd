// Output tensors on transparent huge pages, with a bounded cache of freed blocks.
//
// A fresh 32 MB output (2048 tokens x 4096 features, fp32) is new anonymous
// memory: its first write takes 8192 page faults, each zeroing a 4 KB page.
// On this project's 2-core machine that costs ~14 ms per output (one thread),
// as much as the product that writes it at rank 64. Asking the kernel for 2 MB
// pages (madvise MADV_HUGEPAGE on a 2 MB-aligned block) cuts the faults 512x
// and the cost to ~3 ms. torch does the same for every tensor when the
// environment sets THP_MEM_ALLOC_ENABLE=1; this allocator does it for our
// outputs only, by default. Where THP is off ("never") the advice is a no-op.
//
// Even on huge pages, a block that glibc unmaps on free is faulted (zeroed) in
// again at the next step, and on a VM right after another large job frees its
// memory those faults intermittently cost 2-3x more. A training loop asks for
// the same output sizes every step, so freed blocks are kept, most recently
// freed first, up to SPARSEKERN_OUTPUT_CACHE_MB (default 256, read once; 0
// disables) per extension; beyond it the oldest are freed. 256 MB holds a
// 4096 x 4096 fp32 layer's outputs and, for the floor rule's dense composite at
// full density, its dense weight and dense weight gradient (192 MB in all). It is the CPU
// counterpart of a CUDA caching allocator: reuse is by exact (2 MB-rounded)
// size, and `empty_output_cache()` returns everything to the system.
#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/extension.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

// Hidden: each extension (.so) keeps its own cache. With default visibility the
// linker would merge the function-local statics of all three into one
// (STB_GNU_UNIQUE), and whether that happens would depend on build flags.
#pragma GCC visibility push(hidden)

namespace sparsekern {
namespace common {

class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
#ifdef __linux__
    if (nbytes >= kHugePage) {
      const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      Block* block = cache().take(rounded);
      if (block == nullptr) {
        void* data = nullptr;
        TORCH_CHECK(posix_memalign(&data, kHugePage, rounded) == 0, "out of memory allocating ", nbytes, " bytes");
        madvise(data, rounded, MADV_HUGEPAGE);  // advice only: a failure leaves 4 KB pages
        block = new Block{data, rounded};
      }
      return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetCPUAllocator()->allocate(nbytes);
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Bytes and blocks held by the cache (not in any tensor).
  static std::pair<size_t, size_t> cached() { return cache().stats(); }
  static void empty_cache() { cache().trim(0); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  class Cache {
   public:
    Cache() {
      const char* mb = std::getenv("SPARSEKERN_OUTPUT_CACHE_MB");
      limit_ = (mb != nullptr && *mb != '\0') ? size_t(std::strtoull(mb, nullptr, 10)) << 20 : size_t(256) << 20;
    }

    Block* take(size_t bytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if ((*it)->bytes == bytes) {
          Block* block = *it;
          blocks_.erase(it);
          held_ -= block->bytes;
          return block;
        }
      }
      return nullptr;
    }

    void give(Block* block) {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.push_front(block);
      held_ += block->bytes;
      trim_locked(limit_);
    }

    void trim(size_t limit) {
      std::lock_guard<std::mutex> lock(mutex_);
      trim_locked(limit);
    }

    std::pair<size_t, size_t> stats() {
      std::lock_guard<std::mutex> lock(mutex_);
      return {held_, blocks_.size()};
    }

   private:
    void trim_locked(size_t limit) {
      while (held_ > limit) {
        Block* oldest = blocks_.back();
        blocks_.pop_back();
        held_ -= oldest->bytes;
        drop(oldest);
      }
    }

    static void drop(Block* block) {
      std::free(block->data);
      delete block;
    }

    std::mutex mutex_;
    std::list<Block*> blocks_;  // most recently freed first
    size_t held_ = 0, limit_ = 0;
  };

  // Never destroyed: tensors may be freed during interpreter shutdown, after static
  // destructors ran. A forked child starts a fresh cache: another thread of the
  // parent may have held the mutex at the fork (the parent's blocks stay mapped
  // in the child, unused).
  static Cache& cache() { return *slot(); }

  static Cache*& slot() {
    static Cache* current = [] {
#ifdef __linux__
      pthread_atfork(nullptr, nullptr, [] { slot() = new Cache(); });
#endif
      return new Cache();
    }();
    return current;
  }

  static void release(void* ctx) { cache().give(static_cast<Block*>(ctx)); }
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

// The Python functions every extension that uses empty_output exports.
inline void def_output_cache(pybind11::module& m) {
  m.def("output_cache_info", [] { return HugePageAllocator::cached(); },
        "(bytes, blocks) of freed huge-page outputs this extension keeps for reuse");
  m.def("empty_output_cache", [] { HugePageAllocator::empty_cache(); }, "free every cached block");
  // For the composites the floor rule runs instead of the kernels: their large outputs
  // come from the same cache, so they are measured (and run) without page faults too.
  m.def("empty_output", [](std::vector<int64_t> sizes, const at::Tensor& like) {
    return empty_output(sizes, like.options());
  }, "an uninitialized contiguous CPU tensor of `sizes` with `like`'s dtype, on cached huge pages");
}

}  // namespace common
}  // namespace sparsekern

#pragma GCC visibility pop
