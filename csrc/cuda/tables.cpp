// Device work tables and their cache (see tables.h). A table is one int64 buffer on the device
// (layout: table_layout.h), built on the host as a word vector and compared word by word with
// the cached copy.
#include "tables.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "table_layout.h"

namespace fusedopt {
namespace cuda {
namespace {

constexpr size_t kMaxEntries = 64;  // cached tables (about one per param group x dtype x op)

struct Key {
  OpKind kind;
  DType dtype;
  int device;
  int64_t num_lists;
  int64_t n;
  const void* first_param;
  bool operator==(const Key& o) const {
    return kind == o.kind && dtype == o.dtype && device == o.device && num_lists == o.num_lists &&
           n == o.n && first_param == o.first_param;
  }
};

struct Entry {
  Key key;
  std::vector<int64_t> words;  // what the device buffer holds
  TableLayout layout;
  at::Tensor device;           // int64 [layout.words()]
  cudaStream_t stream;         // stream of the last upload and launch
  uint64_t last_use;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  uint64_t clock = 0;
  TableStats stats{0, 0, 0, 0};
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no teardown-order issues at exit
  return *c;
}

// The host image of the table of `lists`.
std::vector<int64_t> build_words(const TensorLists& lists, TableLayout& layout) {
  const int64_t n = static_cast<int64_t>(lists[0].size());
  const int64_t num_lists = static_cast<int64_t>(lists.size());
  std::vector<int64_t> numels(n);
  std::vector<const void*> ptrs(num_lists * n);
  for (int64_t i = 0; i < n; ++i) numels[i] = lists[0][i].numel();
  for (int64_t l = 0; l < num_lists; ++l) {
    for (int64_t i = 0; i < n; ++i) ptrs[l * n + i] = lists[l][i].data_ptr();
  }
  layout = table_layout(num_lists, n, numels.data());
  TORCH_CHECK(layout.num_chunks <= std::numeric_limits<int32_t>::max() &&
                  n <= std::numeric_limits<int32_t>::max(),
              "fusedopt CUDA: too many tensors or elements in one call (", layout.num_chunks,
              " chunks of ", kChunkElems, " elements)");
  return table_words(layout, ptrs.data(), numels.data());
}

// Copy words [offset, offset + count) of `words` to the device buffer, asynchronously on the
// current stream, through pinned memory (torch's host allocator keeps the staging block alive
// until the copy has run).
void upload(const at::Tensor& device, const std::vector<int64_t>& words, int64_t offset,
            int64_t count) {
  if (count == 0) return;
  at::Tensor staging = at::empty({count}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staging.data_ptr(), words.data() + offset, count * sizeof(int64_t));
  device.narrow(0, offset, count).copy_(staging, /*non_blocking=*/true);
}

WorkTable view(const Entry& e) { return table_view(e.device.data_ptr<int64_t>(), e.layout); }

bool same_range(const std::vector<int64_t>& a, const std::vector<int64_t>& b, int64_t from,
                int64_t to) {
  return std::equal(a.begin() + from, a.begin() + to, b.begin() + from);
}

}  // namespace

WorkTable acquire_table(OpKind kind, DType dtype, const TensorLists& lists, int grad_list) {
  const at::Tensor& first = lists[0][0];
  const int device = first.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const Key key{kind, dtype, device, static_cast<int64_t>(lists.size()),
                static_cast<int64_t>(lists[0].size()), first.data_ptr()};
  TableLayout layout;
  std::vector<int64_t> words = build_words(lists, layout);

  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  ++c.clock;
  auto it = std::find_if(c.entries.begin(), c.entries.end(),
                         [&](const Entry& e) { return e.key == key; });
  if (it != c.entries.end() && it->stream == stream && it->words.size() == words.size()) {
    // Same shape of table on the same stream: compare, upload the difference.
    const int64_t g0 = grad_list * layout.n, g1 = g0 + layout.n;
    it->last_use = c.clock;
    if (!same_range(words, it->words, 0, g0) ||
        !same_range(words, it->words, g1, static_cast<int64_t>(words.size()))) {
      upload(it->device, words, 0, static_cast<int64_t>(words.size()));
      ++c.stats.full_uploads;
    } else if (!same_range(words, it->words, g0, g1)) {
      upload(it->device, words, g0, layout.n);
      ++c.stats.grad_uploads;
    } else {
      ++c.stats.hits;
      return view(*it);
    }
    it->words = std::move(words);
    it->layout = layout;
    return view(*it);
  }
  // New table (or one last used on another stream: a fresh buffer avoids racing with it).
  if (it == c.entries.end()) {
    if (c.entries.size() >= kMaxEntries) {
      it = std::min_element(c.entries.begin(), c.entries.end(),
                            [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; });
    } else {
      c.entries.emplace_back();
      it = c.entries.end() - 1;
    }
  }
  it->key = key;
  it->layout = layout;
  it->stream = stream;
  it->last_use = c.clock;
  it->device = at::empty({layout.words()}, first.options().dtype(at::kLong));
  upload(it->device, words, 0, layout.words());
  it->words = std::move(words);
  ++c.stats.full_uploads;
  return view(*it);
}

TableStats table_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  TableStats s = c.stats;
  s.entries = static_cast<int64_t>(c.entries.size());
  return s;
}

void clear_table_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
}

}  // namespace cuda
}  // namespace fusedopt
