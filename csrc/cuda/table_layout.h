// The word layout of a work table (launch.h), without torch: used by tables.cpp to build and
// cache the device tables, and by the CPU emulator (emu/) to run the kernels on host memory.
//
// One int64 buffer:
//   [ptrs: num_lists * n][numels: n][chunks: num_chunks (ChunkRef, 8 bytes)][done: n uint32, padded]
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "launch.h"

namespace fusedopt {
namespace cuda {

static_assert(sizeof(ChunkRef) == sizeof(int64_t), "a chunk entry is one table word");
static_assert(sizeof(void*) == sizeof(int64_t), "a pointer is one table word");

// Chunks of a tensor of `numel` elements: at least one, so that empty tensors still step.
inline int64_t table_chunks_of(int64_t numel) {
  return numel <= kChunkElems ? 1 : (numel + kChunkElems - 1) / kChunkElems;
}

struct TableLayout {
  int64_t num_lists, n, num_chunks;
  int64_t numels() const { return num_lists * n; }       // word offset of the numels
  int64_t chunks() const { return numels() + n; }         // word offset of the chunk list
  int64_t done() const { return chunks() + num_chunks; }  // word offset of the counters
  int64_t words() const { return done() + (n + 1) / 2; }  // total words
};

inline TableLayout table_layout(int64_t num_lists, int64_t n, const int64_t* numels) {
  int64_t num_chunks = 0;
  for (int64_t i = 0; i < n; ++i) num_chunks += table_chunks_of(numels[i]);
  return TableLayout{num_lists, n, num_chunks};
}

// The table's words: ptrs[l * n + i] = data pointer of tensor i of list l. Counters are zero.
inline std::vector<int64_t> table_words(const TableLayout& layout, const void* const* ptrs,
                                        const int64_t* numels) {
  const int64_t n = layout.n;
  std::vector<int64_t> words(layout.words(), 0);
  for (int64_t k = 0; k < layout.num_lists * n; ++k) {
    words[k] = reinterpret_cast<int64_t>(ptrs[k]);
  }
  int64_t c = layout.chunks();
  for (int64_t i = 0; i < n; ++i) {
    words[layout.numels() + i] = numels[i];
    for (int64_t k = 0, m = table_chunks_of(numels[i]); k < m; ++k) {
      const ChunkRef ref{static_cast<int32_t>(i), static_cast<int32_t>(k)};
      std::memcpy(&words[c++], &ref, sizeof ref);
    }
  }
  return words;
}

// Pointers into a table image at `base` (device memory for launches, host memory for emu/).
inline WorkTable table_view(int64_t* base, const TableLayout& layout) {
  WorkTable t;
  t.ptrs = reinterpret_cast<void* const*>(base);
  t.numels = base + layout.numels();
  t.chunks = reinterpret_cast<const ChunkRef*>(base + layout.chunks());
  t.done = reinterpret_cast<unsigned int*>(base + layout.done());
  t.num_tensors = static_cast<int32_t>(layout.n);
  t.num_chunks = static_cast<int32_t>(layout.num_chunks);
  return t;
}

// The launches of one clipping-op call (total_norm, scale_, clamp_): its tensors grouped by
// storage dtype in order of first appearance, empty tensors left out (they have nothing to
// read or write, and no step counter), with total_norm's partial slots: group g owns slots
// [slot0, slot0 + chunks), one per chunk of its table, in table order.
struct ClipGroup {
  DType dtype;
  std::vector<int64_t> tensors;  // indices into the op's list
  int64_t slot0;                 // first partial slot of this group
  int64_t chunks;                // its table's chunk count
};

inline std::vector<ClipGroup> plan_clip_groups(int64_t n, const DType* dtypes,
                                               const int64_t* numels, int64_t* total_slots) {
  std::vector<ClipGroup> groups;
  int index_of[4] = {-1, -1, -1, -1};  // DType -> position in groups
  for (int64_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    int& g = index_of[static_cast<int>(dtypes[i])];
    if (g < 0) {
      g = static_cast<int>(groups.size());
      groups.push_back(ClipGroup{dtypes[i], {}, 0, 0});
    }
    groups[g].tensors.push_back(i);
    groups[g].chunks += table_chunks_of(numels[i]);
  }
  int64_t slot = 0;
  for (ClipGroup& g : groups) {
    g.slot0 = slot;
    slot += g.chunks;
  }
  *total_slots = slot;
  return groups;
}

}  // namespace cuda
}  // namespace fusedopt
