// Large CPU outputs from a small cache of mapped blocks (csrc/cpu/output_cache.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace msfused {
namespace cpu {

// Outputs of at least this many bytes come from the cache: glibc maps every allocation of
// 32 MiB and more fresh on each call (its dynamic mmap threshold stops at 32 MiB on 64-bit
// Linux) and returns it to the system on free, so each call page-faults it in again;
// smaller ones come back from glibc's own heap already mapped.
constexpr int64_t kCachedOutputBytes = int64_t(32) << 20;

// An uninitialised tensor like at::empty(sizes, opts.memory_format(fmt)). At
// kCachedOutputBytes and more its storage comes from the output cache; it is an ordinary
// resizable CPU tensor whose memory goes back to the cache when its last user drops it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                        at::MemoryFormat fmt = at::MemoryFormat::Contiguous);

// Returns the cache's idle blocks to the system; the bytes released.
int64_t release_output_cache();

// Bytes the cache holds idle now (tests).
int64_t output_cache_idle_bytes();

}  // namespace cpu
}  // namespace msfused
