// Device work tables (launch.h), cached across optimizer steps.
//
// An optimizer calls the op with the same tensors step after step, so the table of a launch
// (data pointers, sizes, chunk list) is kept on the device and only re-uploaded when it
// changes. The check is cheap: the host rebuilds the table's words (a few per tensor, no
// device access) and compares them with the cached copy. When only the gradient pointers
// changed (zero_grad(set_to_none=True) lets the allocator move them), only that segment is
// uploaded. Uploads go through a pinned staging buffer with an asynchronous copy on the
// current stream: no host synchronisation.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "launch.h"

namespace fusedopt {
namespace cuda {

// lists[l][i]: tensor i of list l, lists in the order of launch.h's AdamList / SgdList (one list
// for the clipping ops). Every tensor is dense with the same layout as its param (steps: one
// element), on one device.
using TensorLists = std::vector<std::vector<at::Tensor>>;

// Which op a table belongs to (part of the cache key). The clipping ops total_norm, scale_ and
// clamp_ share kClip: their tables are the same single list (kClipLists), so clip_grad_norm_'s
// norm and scale of the same gradients hit one cached table.
enum class OpKind : int32_t { kAdam = 0, kSgd = 1, kClip = 2 };

// The device table of `lists`, from the cache when nothing changed. `grad_list` is the index
// of the gradient list (uploaded on its own when only it changed). The table stays valid
// until the next call with the same key on this thread's current stream.
WorkTable acquire_table(OpKind kind, DType dtype, const TensorLists& lists, int grad_list);

// Counters for tests and `python -m fusedopt info`.
struct TableStats {
  int64_t full_uploads;  // tables built and uploaded entirely
  int64_t grad_uploads;  // only the gradient pointers re-uploaded
  int64_t hits;          // table reused unchanged
  int64_t entries;       // tables cached now
};
TableStats table_stats();

// Drop every cached table (their device memory returns to torch's caching allocator).
void clear_table_cache();

}  // namespace cuda
}  // namespace fusedopt
