// Whether two tensors of an op's list may share memory, for the ops that rewrite a list in
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
