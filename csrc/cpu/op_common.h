// Shared plumbing of the CPU ops (adam.cpp, sgd.cpp): input validation with clear errors,
// reading 0-dim tensors on the host, flat views of each item's tensors, and the single
// parallel region over all items of a call.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "kernels.h"

namespace fusedopt {
namespace cpu {

// Storage dtype of a supported floating tensor; throws naming the op/list/index otherwise.
DType dtype_of(const at::Tensor& t, const char* op, const char* list, size_t i);
int64_t element_size(DType dtype);

// Cheap test for the usual tensor: defined, strided, CPU, contiguous (not nested). Only
// inline TensorImpl field reads. The full checks below are the fallback: callgrind on 1000
// one-element tensors put them at ~40% of the host instructions (has_internal_overlap goes
// through SymBool guards in libtorch), while a contiguous tensor cannot overlap itself.
inline bool is_plain_dense_cpu(const at::Tensor& t) {
  if (!t.defined()) return false;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return !impl->is_nested() && impl->layout() == at::kStrided &&
         impl->device_type() == c10::DeviceType::CPU && impl->is_contiguous();
}

// Checks a param: defined, dense (not sparse), on the CPU, supported dtype, writable
// (no element aliases another).
void check_param(const at::Tensor& param, const char* op, size_t i);
// Checks that a grad/state tensor matches its param: dense, CPU, same dtype and shape;
// `written` tensors must also be free of internal overlap.
void check_like_param(const at::Tensor& t, const at::Tensor& param, const char* op,
                      const char* list, size_t i, bool written);
void check_list_length(at::TensorList list, size_t expected, const char* op, const char* list_name);

// Value of an optional 0-dim (one-element) tensor such as lr_tensor / grad_scale / found_inf.
std::optional<double> read_scalar(const std::optional<at::Tensor>& t, const char* op,
                                  const char* name);
// Validates a step counter: one element, CPU, float32/float64.
void check_step(const at::Tensor& step, const char* op, size_t i);
// step += 1 in place; returns the new value. Call only after all validation passed.
double increment_step(const at::Tensor& step);

// Bumps the autograd version counter of every tensor in the list, as in-place torch ops do
// (the dispatcher does not do it for custom ops). Inference tensors have no counter.
void bump_versions(at::TensorList tensors);

// Provides flat element arrays for the tensors of one work item. When every tensor of the
// item is non-overlapping and dense with the param's strides (the usual case), the tensors'
// own memory is used: element k of every array is the same logical element. Otherwise all
// tensors of the item get contiguous temporaries; written ones are copied back by finish().
class FlatViews {
 public:
  // Returns data pointers for {param, others...} in the same order. `written[k]` says whether
  // tensor k is modified by the op (param always is).
  template <size_t N>
  std::array<void*, N> flatten(const std::array<const at::Tensor*, N>& tensors,
                               const std::array<bool, N>& written) {
    std::array<void*, N> ptrs{};
    // Usual case first: all contiguous (validation made the shapes equal), so the element
    // orders agree. is_contiguous() is a cached flag; same_dense_layout walks the strides.
    bool all_contiguous = true;
    for (size_t k = 0; k < N && all_contiguous; ++k) all_contiguous = tensors[k]->is_contiguous();
    const bool direct = all_contiguous || same_dense_layout(tensors.data(), N);
    for (size_t k = 0; k < N; ++k) {
      const at::Tensor& t = *tensors[k];
      if (direct || t.is_contiguous()) {
        ptrs[k] = t.data_ptr();
      } else {
        at::Tensor tmp = t.contiguous();
        ptrs[k] = tmp.data_ptr();
        if (written[k]) copy_back_.emplace_back(t, tmp);
        else keep_alive_.push_back(std::move(tmp));
      }
    }
    return ptrs;
  }
  // Copies the temporaries of written tensors back into them.
  void finish();

 private:
  static bool same_dense_layout(const at::Tensor* const* tensors, size_t n);
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;  // (original, temporary)
  std::vector<at::Tensor> keep_alive_;
};

// Below this many param bytes per thread a call is not worth waking another thread for.
constexpr int64_t kMinBytesPerThread = 64 * 1024;

// Runs fn(item, begin, end) over all elements of all items in ONE parallel region, with the
// elements split into equal byte ranges (of the param dtype) across at::get_num_threads()
// threads. Range boundaries fall on 64-byte multiples within each item so that no cache line
// is written by two threads and vector loops start aligned.
template <class Item, class Fn>
void parallel_over_items(const std::vector<Item>& items, const std::vector<int64_t>& elem_sizes,
                         Fn&& fn) {
  const size_t n = items.size();
  if (n == 0) return;
  // Item k occupies bytes [offsets[k], offsets[k] + numel*size) of one virtual byte space;
  // each item starts on a 64-byte boundary of that space.
  std::vector<int64_t> offsets(n + 1);
  int64_t total = 0;
  for (size_t k = 0; k < n; ++k) {
    offsets[k] = total;
    total += (items[k].numel * elem_sizes[k] + 63) / 64 * 64;
  }
  offsets[n] = total;
  if (total == 0) return;

  const int64_t max_threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t threads =
      std::min(max_threads, std::max<int64_t>(1, total / kMinBytesPerThread));
  const int64_t chunk = ((total + threads - 1) / threads + 63) / 64 * 64;

  auto run_range = [&](int64_t lo, int64_t hi) {
    // First item that ends after lo.
    size_t k = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (; k < n && offsets[k] < hi; ++k) {
      const int64_t size = elem_sizes[k];
      const int64_t bytes = items[k].numel * size;
      const int64_t b = std::max(lo, offsets[k]) - offsets[k];
      const int64_t e = std::min(hi - offsets[k], bytes);
      if (b < e) fn(items[k], b / size, e / size);
    }
  };
  if (threads == 1) {
    run_range(0, total);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      run_range(t * chunk, std::min(total, (t + 1) * chunk));
    }
  });
}

}  // namespace cpu
}  // namespace fusedopt
