// Global accesses outside the tensors of the call, and writes into its inputs: what
// compute-sanitizer's memcheck reports on a GPU, checked on every emulated call instead of
// on the GPU machine's rare runs, and more strictly (exact tensor bounds, where the CUDA
// caching allocator's rounded-up blocks hide a small overrun from memcheck).
//
// The caller (run_emu.py) registers each tensor it passes, read-only or writable, before a
// call (emu_tensors); every access through csrc/cuda/global_io.cuh and cp.async must then lie
// inside one of them, and a write inside a writable one. A bad access is not performed (a
// read gives zeros), counted, and the first is kept for the driver to report; the
// registration ends with the call. A call with nothing registered is not checked.
#pragma once
#include <cstdint>
#include <cstdio>
#include <vector>

struct EmuBounds {
  struct Range {
    uintptr_t lo, hi;
    bool writable;
  };
  std::vector<Range> ranges;
  size_t last = 0;  // the range of the previous access: most accesses hit it again
  uint64_t count = 0;
  char first[200] = {0};

  void set(int n, void* const* ptrs, const uint64_t* bytes, const int* writable) {
    ranges.clear();
    last = 0;
    for (int i = 0; i < n; ++i)
      if (ptrs[i] != nullptr && bytes[i] > 0) {
        const uintptr_t lo = reinterpret_cast<uintptr_t>(ptrs[i]);
        ranges.push_back({lo, lo + bytes[i], writable[i] != 0});
      }
  }
  // Whether the access may go ahead.
  bool check(const void* p, size_t n, bool write) {
    if (ranges.empty()) return true;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const Range* hit = nullptr;
    if (last < ranges.size() && a >= ranges[last].lo && a + n <= ranges[last].hi) {
      hit = &ranges[last];
    } else {
      for (size_t i = 0; i < ranges.size(); ++i)
        if (a >= ranges[i].lo && a + n <= ranges[i].hi) {
          hit = &ranges[i];
          last = i;
          break;
        }
    }
    if (hit != nullptr && (!write || hit->writable)) return true;
    if (count++ == 0)
      std::snprintf(first, sizeof(first), "global %s of %zu bytes at %p %s",
                    write ? "write" : "read", n, p,
                    hit != nullptr ? "into a tensor the call only reads"
                                   : "outside every tensor of the call");
    return false;
  }
  // The number of bad accesses since the last call and the first one's description; then
  // reset, the registration included.
  uint64_t take(char* buf, size_t n) {
    const uint64_t c = count;
    if (buf && n) {
      std::snprintf(buf, n, "%s", first);
    }
    count = 0;
    first[0] = 0;
    ranges.clear();
    return c;
  }
};
inline EmuBounds emu_bounds;
