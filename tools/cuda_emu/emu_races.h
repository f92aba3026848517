// Global-memory races between the CTAs of one launch, which the emulator would otherwise
// hide: it runs the CTAs one after another, so a CTA reading what another CTA of the same
// launch writes (or two CTAs writing the same bytes) gives one fixed answer here, and a
// different one on a GPU whenever the two run at the same time or in the other order.
// compute-sanitizer's racecheck covers shared memory only, so nothing else checks this.
//
// Every access through csrc/cuda/global_io.cuh, cp.async and discard.global.L2 is recorded
// per byte (the CTA that wrote it, the CTA that read it or "several") from the start of each
// launch; a byte that one CTA writes and another reads or writes in the same launch is a
// race. The kernels have no atomics and no flags between CTAs, so there is no legitimate
// exception. The first race is kept for the driver to report (take()); the count goes on.
//
// Launches that may start before the previous one completes (MSF_LAUNCH_PDL: programmatic
// dependent launch) must not touch global memory in a thread before that thread's
// ptx::grid_dependency_wait(): such an access is reported too, whatever the bytes (before
// the wait, any earlier kernel may still be running). This check runs for every
// MSF_LAUNCH_PDL launch, whether or not the real launch would ask for early start.
//
// On by default; CUDA_EMU_RACES=0 turns it off (8 bytes of shadow per byte touched: the
// sweeps at batch 1 need under 1 GB, a full benchmark batch would need several). Kernels
// outside the tensor-core path (block_forward.cu, block_backward.cu) touch global memory
// directly and are not covered.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>

struct EmuRaces {
  static constexpr int kPageBits = 12, kPage = 1 << kPageBits;
  static constexpr int32_t kNone = -1, kSeveral = -2;
  struct Page {
    int32_t writer[kPage];  // the CTA that wrote the byte in this launch, or kNone
    int32_t reader[kPage];  // the CTA that read it, kSeveral for two or more, or kNone
    Page() {
      std::memset(writer, 0xff, sizeof(writer));  // kNone
      std::memset(reader, 0xff, sizeof(reader));
    }
  };
  std::unordered_map<uintptr_t, std::unique_ptr<Page>> pages;
  uintptr_t last_key = ~uintptr_t(0);
  Page* last = nullptr;
  bool on = true;
  unsigned long launch = 0;
  int32_t cta = 0;  // the running CTA's linear index in its grid (set as each thread runs)
  bool pdl = false;  // this launch may start early: global accesses only after the wait
  // per thread of the running CTA or cluster (emu.h's emu_fiber, up to kEmuMaxFibers):
  // grid_dependency_wait() called
  bool waited[4096] = {};
  uint64_t count = 0;
  char first[320] = {0};

  unsigned cta_threads = 1;  // threads per CTA of the launch (names a fiber's thread)
  void on_cluster(unsigned threads_per_cta) {
    cta_threads = threads_per_cta;
    std::memset(waited, 0, sizeof(waited));
  }
  // A global access by fiber t of the running CTA or cluster: before its wait in an
  // early-start launch?
  void check_wait(unsigned t, uintptr_t a) {
    if (!pdl || waited[t]) return;
    if (count++ == 0)
      std::snprintf(first, sizeof(first),
                    "global access at %p by thread %u of CTA %d before its "
                    "grid_dependency_wait(), in launch %lu, which may start before the "
                    "previous kernel completes", reinterpret_cast<void*>(a), t % cta_threads,
                    cta, launch);
  }
  void on_launch(unsigned long launch_no) {
    const char* e = std::getenv("CUDA_EMU_RACES");
    on = !(e && e[0] == '0');
    pages.clear();
    last = nullptr;
    last_key = ~uintptr_t(0);
    launch = launch_no;
  }
  Page* page(uintptr_t a) {
    const uintptr_t key = a >> kPageBits;
    if (key != last_key) {
      auto& slot = pages[key];
      if (!slot) slot.reset(new Page());
      last = slot.get();
      last_key = key;
    }
    return last;
  }
  // kind: "rw" this CTA reads a byte another wrote, "ww" writes one another wrote, "wr"
  // writes one another (other >= 0) or several others (kSeveral) read.
  void report(const char* kind, uintptr_t a, int32_t other) {
    if (count++ != 0) return;
    char who[48];
    if (other == kSeveral) std::snprintf(who, sizeof(who), "other CTAs read");
    else std::snprintf(who, sizeof(who), "CTA %d %s", other, kind[1] == 'w' ? "wrote" : "read");
    std::snprintf(first, sizeof(first),
                  "global-memory race in launch %lu: CTA %d %s byte %p, which %s in the same "
                  "launch", launch, cta, kind[0] == 'r' ? "reads" : "writes",
                  reinterpret_cast<void*>(a), who);
  }
  // f(page, index in the page, address) for each byte of [p, p + n)
  template <typename F>
  void each_byte(const void* p, size_t n, F f) {
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(p);
    for (uintptr_t a = a0; a < a0 + n; ++a) f(page(a), int(a & (kPage - 1)), a);
  }
  void read(const void* p, size_t n, unsigned thread) {
    check_wait(thread, reinterpret_cast<uintptr_t>(p));
    if (!on) return;
    each_byte(p, n, [&](Page* pg, int i, uintptr_t a) {
      const int32_t w = pg->writer[i];
      if (w != kNone && w != cta) report("rw", a, w);
      int32_t& r = pg->reader[i];
      if (r == kNone) r = cta;
      else if (r != cta) r = kSeveral;
    });
  }
  void write(const void* p, size_t n, unsigned thread) {
    check_wait(thread, reinterpret_cast<uintptr_t>(p));
    if (!on) return;
    each_byte(p, n, [&](Page* pg, int i, uintptr_t a) {
      int32_t& w = pg->writer[i];
      const int32_t r = pg->reader[i];
      if (w != kNone && w != cta) report("ww", a, w);
      else if (r == kSeveral || (r != kNone && r != cta)) report("wr", a, r);
      w = cta;
    });
  }
  // The number of races since the last call and the first one's description; then reset.
  uint64_t take(char* buf, size_t n) {
    const uint64_t c = count;
    if (buf && n) {
      std::strncpy(buf, first, n - 1);
      buf[n - 1] = 0;
    }
    count = 0;
    first[0] = 0;
    return c;
  }
};
inline EmuRaces emu_races;
