// A model of the GPU's L2 behind the emulator's counted global accesses (emu.h's
// emu_count_read / emu_count_written), to estimate what of them would reach DRAM. Off until
// emu_l2_reset gives it a capacity.
//
// Fully associative LRU over 32-byte sectors (the unit of DRAM traffic on NVIDIA GPUs),
// write-allocate (a partial write does not fetch the sector) and write-back: DRAM traffic
// is the sectors a read misses, plus the dirty sectors evicted or still dirty when the
// count is read (outputs and scratch alike: the L2 cannot know a buffer is dead).
// cold_per_launch empties it, dirty sectors written back, before every launch, as ncu's
// default --cache-control all does between the kernels it profiles.
//
// What it does not model: the emulator runs the CTAs of a launch one after another in grid
// order, where a GPU runs about a wave of them at once in about that order, so the reuse
// distances are grid order's; fine for traffic that streams (a halo that the next tile
// reads again, scratch that the next launch reads), not for a wave's working set thrashing
// the cache. The L2's split into two partitions and its hashing are ignored. Single
// threaded, like the emulator's launches.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

struct EmuL2 {
  static constexpr uint64_t kSector = 32;
  uint64_t capacity = 0;  // sectors; 0: off
  bool cold_per_launch = false;
  uint64_t dram_read = 0, dram_written = 0;  // bytes
  // Optional attribution: DRAM bytes per registered address range (the rest under -1).
  struct Region {
    uint64_t lo, hi, read, written;
  };
  std::vector<Region> regions;
  Region* region_of(uint64_t sector) {
    const uint64_t a = sector * kSector;
    for (Region& r : regions)
      if (a + kSector > r.lo && a < r.hi) return &r;
    return nullptr;
  }
  void count(uint64_t sector, bool write) {
    (write ? dram_written : dram_read) += kSector;
    if (Region* r = regions.empty() ? nullptr : region_of(sector))
      (write ? r->written : r->read) += kSector;
  }

  struct Node {
    uint64_t tag;
    int64_t prev, next;
    bool dirty;
  };
  std::vector<Node> nodes;  // a doubly linked list, most recent first
  std::vector<int64_t> free_nodes;
  std::unordered_map<uint64_t, int64_t> where;
  int64_t head = -1, tail = -1;

  void unlink(int64_t i) {
    Node& n = nodes[i];
    (n.prev >= 0 ? nodes[n.prev].next : head) = n.next;
    (n.next >= 0 ? nodes[n.next].prev : tail) = n.prev;
  }
  void push_front(int64_t i) {
    nodes[i].prev = -1;
    nodes[i].next = head;
    if (head >= 0) nodes[head].prev = i;
    head = i;
    if (tail < 0) tail = i;
  }
  void touch(uint64_t tag, bool write) {
    auto it = where.find(tag);
    if (it != where.end()) {
      const int64_t i = it->second;
      unlink(i);
      push_front(i);
      nodes[i].dirty = nodes[i].dirty || write;
      return;
    }
    if (!write) count(tag, false);
    if (where.size() >= capacity) {  // evict the least recent
      const int64_t v = tail;
      unlink(v);
      if (nodes[v].dirty) count(nodes[v].tag, true);
      where.erase(nodes[v].tag);
      free_nodes.push_back(v);
    }
    int64_t i;
    if (!free_nodes.empty()) {
      i = free_nodes.back();
      free_nodes.pop_back();
    } else {
      i = int64_t(nodes.size());
      nodes.push_back(Node{});
    }
    nodes[i].tag = tag;
    nodes[i].dirty = write;
    push_front(i);
    where.emplace(tag, i);
  }
  void access(const void* p, uint64_t n, bool write) {
    if (capacity == 0 || n == 0) return;
    const uint64_t a = reinterpret_cast<uintptr_t>(p);
    for (uint64_t s = a / kSector; s <= (a + n - 1) / kSector; ++s) touch(s, write);
  }
  void discard(const void* p, uint64_t n) {  // discard.global.L2: dropped, not written
    if (capacity == 0) return;
    const uint64_t a = reinterpret_cast<uintptr_t>(p);
    for (uint64_t t = a / kSector; t <= (a + n - 1) / kSector; ++t) {
      auto it = where.find(t);
      if (it == where.end()) continue;
      unlink(it->second);
      free_nodes.push_back(it->second);
      where.erase(it);
    }
  }
  void write_back() {  // dirty sectors counted as written; they stay, clean
    for (int64_t i = head; i >= 0; i = nodes[i].next)
      if (nodes[i].dirty) {
        count(nodes[i].tag, true);
        nodes[i].dirty = false;
      }
  }
  void clear() {
    nodes.clear();
    free_nodes.clear();
    where.clear();
    head = tail = -1;
  }
  void on_launch() {
    if (capacity == 0 || !cold_per_launch) return;
    write_back();
    clear();
  }
  void reset(uint64_t bytes, bool cold) {
    clear();
    capacity = bytes / kSector;
    cold_per_launch = cold;
    dram_read = dram_written = 0;
    for (Region& r : regions) r.read = r.written = 0;
  }
};

inline EmuL2 emu_l2;
