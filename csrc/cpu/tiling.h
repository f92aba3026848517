// How the CPU kernels cut a block call into tiles and chunks. A tile is one image and a
// band of R output rows; tiles are grouped into a fixed number of chunks (one per
// parallel task) whose partial weight gradients are reduced in a fixed order, so the
// backward gives the same bits every run and on any thread count (the plan depends on the
// shape and, for the backward's tile size, on the CPU's L2 size). Everything here is
// `static inline` on purpose: the header is compiled into each per-ISA translation unit.
#pragma once
#include <cstdint>
#include <cstdlib>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "block_desc.h"

namespace msfused {
namespace cpu {

struct Plan {
  int64_t Cs;        // rows of the strided input in the packed matrix (C with projection, else 0)
  int64_t Ktot;      // rows of the packed [a; xs; b] matrix: 2C + Cs
  int64_t R;         // output rows per tile
  int64_t nbands;    // tiles per image
  int64_t ntiles;    // B * nbands
  int64_t nchunks;   // parallel tasks; each owns a contiguous run of tiles
  int64_t npw;       // pointwise (+projection) weight-gradient elements in a partial
  int64_t part;      // elements of one chunk's partial gradients
  bool pixel_major;  // buffers [pixel][channel] (many channels) rather than planar (few)
  bool per_image;    // pixel-major backward: chunks of whole images, both passes per image
};

// From this many channels on, vectorising the depthwise work across channels beats
// vectorising along image rows.
static const int64_t kPixelMajorMinC = 8;

// From this batch size on, the pixel-major backward works image by image (Plan::per_image).
static const int64_t kPerImageMinB = 4;

// The smallest tile (elements of the packed matrix A) that make_plan splits rows down to
// for parallelism.
static const int64_t kMinSplitElems = 4096;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// L2 cache per core in bytes as the OS reports it (0: unknown). MSFUSED_CPU_L2_KB=n plans as
// if it were n KiB (A/B runs, and tests of the plan the other kind of CPU takes).
static inline int64_t l2_bytes_per_core() {
  static const int64_t v = [] {
    if (const char* e = std::getenv("MSFUSED_CPU_L2_KB")) return int64_t(std::atoll(e)) * 1024;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return s > 0 ? int64_t(s) : int64_t(0);
#else
    return int64_t(0);
#endif
  }();
  return v;
}

// The backward's tile target (elements of the packed matrix A). It keeps four matrices of
// about that size live (A, dA and gz in both layouts). With a 512 KiB L2 (AMD Zen 2 and 3)
// whole images measured 13-15% slower at 14x14 to 56x56 than 32768-element tiles, which
// stay in L2 (benchmarks/NOTES.md 20); with 1 MiB (AMD Zen 5) the forward's 262144 measured
// 3-13% faster than 32768 at every multi-band benchmark shape, in float32 and bfloat16 (the
// b1 halo rows recomputed once per image instead of per band, GEMMs with more pixels;
// NOTES.md 35). Unknown L2: the small tiles.
static inline int64_t backward_tile_elems() {
  return l2_bytes_per_core() >= (int64_t(1) << 20) ? 262144 : 32768;
}

// backward: the plan of the backward, which with enough images (per_image) takes its
// parallelism from images and so may use taller tiles (whole images at 14x14 and 28x28: no
// b1 halo rows to recompute) than the forward, whose tasks are tiles.
// threads: the forward's worker count (0: unknown), which sets how many tiles it aims for.
static inline Plan make_plan(const BlockDesc& d, bool backward = false, int64_t threads = 0) {
  Plan p;
  p.Cs = d.projection ? d.C : 0;
  p.Ktot = 2 * d.C + p.Cs;
  p.pixel_major = d.C >= kPixelMajorMinC;
  p.per_image = backward && p.pixel_major && d.B >= kPerImageMinB;
  // Aim the packed tile matrix (Ktot x P) at 32768 elements (~128 KiB in float32), with at
  // least 32 pixels so the GEMM is not degenerate; the pixel-major forward at 262144 (~1 MiB:
  // its b1 halo rows are recomputed once per tile, and whole 14x14 and 28x28 images measured
  // no slower in the GEMMs than 256 KiB tiles); the pixel-major backward by the L2 size
  // (backward_tile_elems).
  const int64_t target = !p.pixel_major ? 32768 : backward ? backward_tile_elems() : 262144;
  int64_t target_p = target / p.Ktot;
  if (target_p < 32) target_p = 32;
  if (target_p > 1024) target_p = 1024;
  int64_t r = target_p / d.Wo;
  if (r < 1) r = 1;
  if (r > d.Ho) r = d.Ho;
  // Enough tiles to keep the cores busy: split rows further for small batches, as long
  // as a tile keeps kMinSplitElems elements of A (below that a tile's fixed costs, the
  // row buffers and GEMM calls, outweigh its work; benchmarks/NOTES.md entry 8). The
  // backward aims at 32 tiles whatever the machine: its chunks' partial sums follow the
  // tiles, and its bits must not depend on the thread count. The forward's outputs are the
  // same bits for any tiling, so it aims at 4 tiles a thread (at most 32): every split
  // recomputes b1 on two more rows and loads four more x rows, and at batch 1 on two
  // threads 32 tiles meant one-row tiles: the 56x56 and 28x28 forwards 4-30% slower than
  // with 8 (NOTES.md entry 69).
  const int64_t want = backward || threads <= 0 ? 32 : (4 * threads < 32 ? 4 * threads : 32);
  if (!p.per_image)
    while (r > 1 && d.B * ceil_div(d.Ho, r) < want &&
           ceil_div(r, 2) * d.Wo * p.Ktot >= kMinSplitElems)
      r = ceil_div(r, 2);
  // Balance the bands (14 rows at R = 6 would be 6 + 6 + 2): same count, rows spread evenly.
  r = ceil_div(d.Ho, ceil_div(d.Ho, r));
  p.R = r;
  p.nbands = ceil_div(d.Ho, r);
  p.ntiles = d.B * p.nbands;
  p.npw = d.merge == kConcat ? 2 * d.N * (d.C + p.Cs) : d.N * p.Ktot;
  p.part = p.npw + d.Cout + 30 * d.C;
  // Chunks: enough parallel tasks for a many-core machine, but the partial gradients they
  // keep (nchunks x part, zeroed and summed every backward) capped near 1M elements. The
  // count depends on the shape only, never on the thread count, so results are the same
  // bits on any machine.
  int64_t cap = (int64_t(1) << 20) / p.part;
  if (cap < 8) cap = 8;
  if (cap > 64) cap = 64;
  p.nchunks = p.ntiles < cap ? p.ntiles : cap;
  // With enough images to go round, the pixel-major backward runs image by image (both
  // passes, scratch one image large and cache-resident); chunks are then runs of images.
  if (p.per_image) p.nchunks = d.B < cap ? d.B : cap;
  // A multiple of 8 tasks when there are more: at::parallel_for hands each thread one
  // contiguous run of tasks, and 9 or 15 chunks on 2 (4, 8) threads leave one thread a
  // chunk behind (benchmarks/NOTES.md entry 7).
  if (p.nchunks > 8) p.nchunks -= p.nchunks % 8;
  return p;
}

// Elements of the packed pointwise (+ projection) weights. add: [Pa | Ws | Pb] (N x Ktot);
// concat: [Pa | Ws[:N]] and [Ws[N:] | Pb] (each N x (C + Cs)).
static inline int64_t packed_weight_elems(const BlockDesc& d, const Plan& p) {
  return d.merge == kAdd ? d.N * p.Ktot : 2 * d.N * (d.C + p.Cs);
}

// The backward's scratch, one buffer that the binding allocates and the kernel carves up
// (offsets in elements): the gradients at the heads of branch A and B (sa, sb), then one
// partial-gradient block per chunk (parts, nchunks x Plan::part). The branch buffers are
// planar (B, C, Ho, Wo) on the planar path, zero-padded pixel-major (B, Ho + 2, Wo + 2, C)
// on the pixel-major path, and empty with the per-image plan (there each thread keeps one
// image's worth, thread-local).
struct BackwardScratch {
  int64_t branch;  // elements of each branch buffer
  int64_t sa, sb, parts;
  int64_t total;
};

static inline BackwardScratch backward_scratch(const BlockDesc& d, const Plan& p) {
  BackwardScratch s;
  s.branch = p.per_image     ? 0
             : p.pixel_major ? d.B * d.C * (d.Ho + 2) * (d.Wo + 2)
                             : d.B * d.C * d.Ho * d.Wo;
  s.sa = 0;
  s.sb = s.branch;
  s.parts = 2 * s.branch;
  s.total = s.parts + p.nchunks * p.part;
  return s;
}

}  // namespace cpu
}  // namespace msfused
