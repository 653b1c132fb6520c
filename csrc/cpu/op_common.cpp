#include "op_common.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace fusedopt {
namespace cpu {

DType dtype_of(const at::Tensor& t, const char* op, const char* list, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default:
      TORCH_CHECK(false, "fusedopt::", op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                  ", which is not supported (supported: float32, float64, bfloat16, float16)");
  }
}

int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat: return 4;
    case DType::kDouble: return 8;
    default: return 2;
  }
}

static void check_dense_cpu(const at::Tensor& t, const char* op, const char* list, size_t i) {
  TORCH_CHECK(t.defined(), "fusedopt::", op, ": ", list, "[", i, "] is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt::", op, ": ", list, "[", i, "] is ",
              t.layout(), "; sparse tensors are not supported");
  TORCH_CHECK(t.device().is_cpu(), "fusedopt::", op, ": ", list, "[", i, "] is on ",
              t.device(), "; the cpu backend needs CPU tensors");
}

static void check_writable(const at::Tensor& t, const char* op, const char* list, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fusedopt::", op, ": ", list,
              "[", i, "] has elements that share memory (e.g. an expanded tensor) and cannot ",
              "be updated in place");
}

void check_param(const at::Tensor& param, const char* op, size_t i) {
  if (is_plain_dense_cpu(param)) {  // fast path: contiguous, so writable
    dtype_of(param, op, "params", i);
    return;
  }
  check_dense_cpu(param, op, "params", i);
  dtype_of(param, op, "params", i);
  check_writable(param, op, "params", i);
}

void check_like_param(const at::Tensor& t, const at::Tensor& param, const char* op,
                      const char* list, size_t i, bool written) {
  // Fast path, same verdict as the checks below: contiguous excludes internal overlap.
  if (is_plain_dense_cpu(t) && t.scalar_type() == param.scalar_type() &&
      t.sizes().equals(param.sizes())) {
    return;
  }
  check_dense_cpu(t, op, list, i);
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), "fusedopt::", op, ": ", list, "[", i,
              "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
              param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), "fusedopt::", op, ": ", list, "[", i, "] has shape ",
              t.sizes(), " but params[", i, "] has shape ", param.sizes());
  if (written) check_writable(t, op, list, i);
}

void check_list_length(at::TensorList list, size_t expected, const char* op,
                       const char* list_name) {
  TORCH_CHECK(list.size() == expected, "fusedopt::", op, ": ", list_name, " has ", list.size(),
              " tensors but params has ", expected);
}

std::optional<double> read_scalar(const std::optional<at::Tensor>& t, const char* op,
                                  const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, "fusedopt::", op, ": ", name,
              " must be a tensor with one element, got shape ", t->sizes());
  // .item() also accepts a tensor on another device (at the cost of a sync).
  return t->item<double>();
}

void check_step(const at::Tensor& step, const char* op, size_t i) {
  TORCH_CHECK(step.defined(), "fusedopt::", op, ": state_steps[", i, "] is undefined (None)");
  TORCH_CHECK(step.device().is_cpu(), "fusedopt::", op, ": state_steps[", i, "] is on ",
              step.device(), "; the cpu backend needs CPU step tensors");
  TORCH_CHECK(step.numel() == 1, "fusedopt::", op, ": state_steps[", i,
              "] must have one element, got shape ", step.sizes());
  TORCH_CHECK(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble,
              "fusedopt::", op, ": state_steps[", i, "] has dtype ", step.scalar_type(),
              "; expected float32 or float64");
}

double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kFloat) {
    float* p = static_cast<float*>(step.data_ptr());
    *p += 1.0f;
    return *p;
  }
  double* p = static_cast<double*>(step.data_ptr());
  *p += 1.0;
  return *p;
}

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

bool FlatViews::same_dense_layout(const at::Tensor* const* tensors, size_t n) {
  const at::Tensor& ref = *tensors[0];
  if (!ref.is_non_overlapping_and_dense()) return false;
  const auto sizes = ref.sizes();
  const auto ref_strides = ref.strides();
  for (size_t k = 1; k < n; ++k) {
    const at::Tensor& t = *tensors[k];
    if (!t.is_non_overlapping_and_dense()) return false;
    const auto strides = t.strides();
    // Strides of size-1 dimensions do not affect the memory order.
    for (size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] != 1 && strides[d] != ref_strides[d]) return false;
    }
  }
  return true;
}

void FlatViews::finish() {
  for (auto& [original, temporary] : copy_back_) original.copy_(temporary);
  copy_back_.clear();
  keep_alive_.clear();
}

}  // namespace cpu
}  // namespace fusedopt
