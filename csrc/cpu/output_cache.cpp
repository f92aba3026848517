// A small cache of large mapped blocks for the CPU op's outputs (y, the pre-activation,
// dx, the backward's largest scratch).
//
// Why: glibc serves every allocation of 32 MiB and more with a fresh mmap and unmaps it on
// free, so a loop that calls the block gets a new, unmapped output each time and the kernels'
// first writes fault it in (and the kernel zeroes each page first). At paper-u1 (float32,
// 32 MiB y) a forward took 3.9-8.7 ms that way, huge pages advised, against 1.8-2.5 ms with
// the block already mapped (benchmarks/NOTES.md entries 19, 43 and 66). ONNX Runtime's arena and the
// CUDA caching allocator keep such blocks mapped; PyTorch's CPU allocator does not. Here a
// freed block waits, still mapped, for the next output of its size.
//
// What it holds: only blocks no tensor uses, at most MSFUSED_CPU_OUTPUT_CACHE_MB MiB of them
// (default 128; 0 turns the cache off), oldest returned first when a new one would pass the
// cap. msfused.empty_cpu_cache() returns them all. Blocks are 2 MiB-aligned mappings with
// transparent huge pages advised (MSFUSED_CPU_HUGEPAGE=0 turns the advice off), so the first
// use of a block faults once per 2 MiB where the system allows.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace msfused {
namespace cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

bool huge_page_advice_on() {
  static const bool on = [] {
    const char* env = std::getenv("MSFUSED_CPU_HUGEPAGE");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

// Transparent huge pages for [p, p + n)'s 2 MiB-aligned interior, before anything touches
// it: one fault per 2 MiB instead of one per 4 KiB. Advice only; nothing else changes.
void advise_huge_pages(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_page_advice_on()) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p), e = b + n;
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = e & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

#if defined(__linux__)

size_t cache_cap_bytes() {
  static const size_t cap = [] {
    constexpr long long kDefaultMiB = 128;
    const char* env = std::getenv("MSFUSED_CPU_OUTPUT_CACHE_MB");
    if (!env || !*env) return static_cast<size_t>(kDefaultMiB) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end == env || *end != '\0' || mb < 0 || mb > (1LL << 30)) {
      TORCH_WARN("MSFUSED_CPU_OUTPUT_CACHE_MB='", env, "' is not a whole number of MiB ",
                 "(0 turns the cache off); using the default, ", kDefaultMiB);
      return static_cast<size_t>(kDefaultMiB) << 20;
    }
    return static_cast<size_t>(mb) << 20;
  }();
  return cap;
}

struct Block {
  void* p;
  size_t bytes;  // a multiple of kHuge
};

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    // A tensor of this storage resized below the cache's size gets ordinary memory.
    if (n < static_cast<size_t>(kCachedOutputBytes))
      return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHuge - 1) & ~(kHuge - 1);
    Block b;
    if (!take(bytes, &b)) b = map(bytes);
    size_t used, idle;
    {
      std::lock_guard<std::mutex> g(mu_);
      used_[b.p] = b.bytes;
      used = used_bytes_ += b.bytes;
      idle = idle_bytes_;
    }
    report(b.p, static_cast<int64_t>(b.bytes), used, idle);
    // The context is the data pointer itself (a "simple" DataPtr, as the CUDA caching
    // allocator's are): copy-on-write clones (torch._lazy_clone) need that.
    return c10::DataPtr(b.p, b.p, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU));
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release() {
    std::vector<Block> out;
    {
      std::lock_guard<std::mutex> g(mu_);
      out.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t n = 0;
    for (const Block& b : out) {
      n += static_cast<int64_t>(b.bytes);
      munmap(b.p, b.bytes);
    }
    return n;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(idle_bytes_);
  }

  static OutputCache& get() {
    // Never destroyed: tensors may still give blocks back while the process exits.
    static OutputCache* c = [] {
      auto* cache = new OutputCache;
      // A fork (DataLoader workers) while another thread holds the lock would leave the
      // child's copy locked for good: hold it across the fork, release it on both sides.
      pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); },
                     [] { get().mu_.unlock(); });
      return cache;
    }();
    return *c;
  }

 private:
  // The smallest idle block that holds `bytes` and wastes at most a quarter of itself.
  bool take(size_t bytes, Block* out) {
    std::lock_guard<std::mutex> g(mu_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (it->bytes >= bytes && it->bytes - bytes <= it->bytes / 4 &&
          (best == idle_.end() || it->bytes < best->bytes))
        best = it;
    if (best == idle_.end()) return false;
    *out = *best;
    idle_.erase(best);
    idle_bytes_ -= out->bytes;
    return true;
  }

  static Block map(size_t bytes) {
    // Over-map by 2 MiB and cut the ends so the block starts on a 2 MiB boundary.
    void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      // Idle blocks may be what is missing: give them back and try once more.
      if (get().release() == 0) throw std::bad_alloc();
      raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
      if (raw == MAP_FAILED) throw std::bad_alloc();
    }
    const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t a = (r + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    if (a > r) munmap(raw, a - r);
    if (r + kHuge > a) munmap(reinterpret_cast<void*>(a + bytes), r + kHuge - a);
    advise_huge_pages(reinterpret_cast<void*>(a), bytes);
    return Block{reinterpret_cast<void*>(a), bytes};
  }

  // torch.profiler(profile_memory=True) sees these blocks as it sees the CPU allocator's.
  static void report(void* p, int64_t delta, size_t used, size_t idle) {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(p, delta, used, used + idle,
                                       c10::Device(c10::DeviceType::CPU));
  }

  static void give_back(void* p) {
    std::vector<Block> out;
    OutputCache& c = get();
    int64_t freed;
    size_t used, idle;
    {
      std::lock_guard<std::mutex> g(c.mu_);
      auto it = c.used_.find(p);
      const Block b{p, it->second};
      c.used_.erase(it);
      c.used_bytes_ -= b.bytes;
      freed = static_cast<int64_t>(b.bytes);
      const size_t cap = cache_cap_bytes();
      if (b.bytes > cap) {
        out.push_back(b);
      } else {
        c.idle_.push_back(b);  // newest last
        c.idle_bytes_ += b.bytes;
        size_t drop = 0;
        while (c.idle_bytes_ > cap) {
          c.idle_bytes_ -= c.idle_[drop].bytes;
          out.push_back(c.idle_[drop++]);
        }
        c.idle_.erase(c.idle_.begin(), c.idle_.begin() + drop);
      }
      used = c.used_bytes_;
      idle = c.idle_bytes_;
    }
    report(p, -freed, used, idle);
    // Outside the lock: unmapping 32 MiB takes a while.
    for (const Block& o : out) munmap(o.p, o.bytes);
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> used_;  // blocks tensors hold: their sizes
  std::vector<Block> idle_;                 // oldest first
  size_t used_bytes_ = 0, idle_bytes_ = 0;
};

#endif  // __linux__

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                        at::MemoryFormat fmt) {
  const int64_t bytes = c10::multiply_integers(sizes) *
                        static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(
                            opts.dtype())));
#if defined(__linux__)
  if (bytes >= kCachedOutputBytes && cache_cap_bytes() > 0)
    return at::detail::empty_generic(sizes, &OutputCache::get(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(opts.dtype()), fmt);
#endif
  at::Tensor t = at::empty(sizes, opts.memory_format(fmt));
  if (bytes >= kCachedOutputBytes) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

int64_t release_output_cache() {
#if defined(__linux__)
  return OutputCache::get().release();
#else
  return 0;
#endif
}

int64_t output_cache_idle_bytes() {
#if defined(__linux__)
  return OutputCache::get().idle_bytes();
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace msfused
