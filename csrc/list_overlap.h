// Whether tensors of an op's lists may share memory: for the ops that rewrite a list in
// place (scale_, clamp_). Host code, shared by the CPU and CUDA implementations.
//
// torch's per-tensor and foreach ops rewrite the tensors of a list one after the other, so a
// tensor listed twice (the same parameter in two places) or two overlapping views of one buffer
// are scaled twice. A single parallel region (CPU) or launch (CUDA) over all of them would have
// two threads read-modify-write the same elements at once: some elements scaled once, some
// twice. The ops therefore rewrite such lists one tensor at a time, in list order, as torch does.
//
// The test is conservative: it compares the address ranges [lowest, highest element] of the
// tensors, so two interleaved views (x[::2] and x[1::2]) count as sharing memory (they are then
// rewritten one after the other: the same result, only slower). Views of one buffer that do not
// overlap (DDP's gradient_as_bucket_view, flat-parameter layouts) keep the single region.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace fusedopt {

// Byte range [begin, end) spanned by the elements of t (t.numel() > 0; torch strides are >= 0).
inline std::pair<uintptr_t, uintptr_t> element_span(const at::Tensor& t) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;  // offset of the last element, in elements
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// True when the element spans of two non-empty tensors of `tensors` intersect.
inline bool any_two_share_memory(at::TensorList tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  spans.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t.numel() > 0) spans.push_back(element_span(t));
  }
  if (spans.size() < 2) return false;
  // Lists usually come in allocation order, increasing or decreasing: check those in O(n) first.
  auto disjoint_in_order = [&](bool increasing) {
    for (size_t i = 1; i < spans.size(); ++i) {
      const auto& lo = increasing ? spans[i - 1] : spans[i];
      const auto& hi = increasing ? spans[i] : spans[i - 1];
      if (lo.second > hi.first) return false;
    }
    return true;
  };
  if (disjoint_in_order(true) || disjoint_in_order(false)) return false;
  std::sort(spans.begin(), spans.end());
  uintptr_t reach = spans[0].second;
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < reach) return true;
    reach = std::max(reach, spans[i].second);
  }
  return false;
}

}  // namespace fusedopt

namespace fusedopt {

// Whether a tensor that an optimizer op writes shares memory with another tensor of the call:
// with one written by the op (a param listed twice, a state tensor that is a param's view,
// two state lists holding one tensor) or read by it (a grad aliasing a param or a state).
// One parallel region (CPU) or launch (CUDA) would then have threads read-modify-write the
// same elements in an unspecified order: numbers that depend on the thread count and the ISA.
// Tensors that are only read (the grads) may share memory among themselves.
//
// Spans are compared within a storage, by byte offsets (never data_ptr(): fake and meta
// tensors have no data, and on some devices the pointer is a handle, not an address); tensors
// without storage (DTensor wrappers: pass their local shards) and sparse ones are passed over.
// Like element_span, the test is conservative: two interleaved views of one buffer
// (W[:, :3] and W[:, 3:]) count as sharing. Cost O(N log N) (~120 us for 1000 params' 4000
// tensors, as much as an Adam step of 1000 small tensors): so it is not run at every step.
// The optimizers run it when they build their cached lists (fusedopt.optim.base),
// fusedopt.functional at every call; torch.ops.fusedopt.* trust their caller, as torch's
// _fused_adam_ does.
inline bool written_memory_shared(const std::vector<at::TensorList>& written,
                                  const std::vector<at::TensorList>& read) {
  struct Span {
    const void* storage;
    int64_t begin, end;  // bytes from the storage's start
    bool written;
    bool operator<(const Span& o) const {
      return storage != o.storage ? std::less<const void*>()(storage, o.storage) : begin < o.begin;
    }
  };
  std::vector<Span> spans;
  auto add_list = [&](at::TensorList list, bool is_written) {
    for (const at::Tensor& t : list) {
      if (!t.defined() || t.numel() == 0 || t.layout() != at::kStrided || !t.has_storage()) continue;
      int64_t last = 0;  // offset of the last element, in elements
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const int64_t size = static_cast<int64_t>(t.element_size());
      const int64_t begin = t.storage_offset() * size;
      spans.push_back({t.storage().unsafeGetStorageImpl(), begin, begin + (last + 1) * size,
                       is_written});
    }
  };
  for (at::TensorList list : written) add_list(list, true);
  for (at::TensorList list : read) add_list(list, false);
  if (spans.size() < 2) return false;
  std::sort(spans.begin(), spans.end());
  // Sorted by (storage, begin): a span meets an earlier one of its storage iff it starts before
  // that one's end.
  const void* storage = nullptr;
  int64_t written_reach = 0, read_reach = 0;
  for (const Span& s : spans) {
    if (s.storage != storage) {
      storage = s.storage;
      written_reach = read_reach = std::numeric_limits<int64_t>::min();
    }
    if (s.begin < written_reach) return true;
    if (s.written && s.begin < read_reach) return true;
    int64_t& reach = s.written ? written_reach : read_reach;
    reach = std::max(reach, s.end);
  }
  return false;
}

}  // namespace fusedopt
