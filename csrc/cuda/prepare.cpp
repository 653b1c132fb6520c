// Host-side argument handling of the CUDA ops (see prepare.h).
#include "prepare.h"

#include <array>
#include <atomic>

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace fusedopt {
namespace cuda {
std::optional<DType> storage_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

namespace {

// True when `t` can be walked as a flat array of numel elements element-for-element with `ref`:
// both dense without overlap, same strides wherever the size is not 1.
bool same_flat_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (!t.is_non_overlapping_and_dense() || t.sizes() != ref.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != ref.stride(d)) return false;
  }
  return true;
}

}  // namespace

std::vector<DTypeGroup> group_by_dtype(const char* op, const std::vector<ListArg>& lists) {
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  std::vector<DTypeGroup> groups;
  if (n == 0) return groups;
  for (const ListArg& list : lists) {
    TORCH_CHECK(list.tensors.size() == n, op, ": ", list.name, " has ", list.tensors.size(),
                " tensors but params has ", n);
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": the CUDA kernel got params on ", device);

  std::array<int, 4> group_of{-1, -1, -1, -1};  // DType -> index in groups
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes one device");
    const std::optional<DType> dtype = storage_dtype(p.scalar_type());
    TORCH_CHECK(dtype.has_value(), op, ": params[", i, "] has dtype ", p.scalar_type(),
                "; the CUDA backend supports float32, float64, float16 and bfloat16");
    int& gi = group_of[static_cast<int>(*dtype)];
    if (gi < 0) {
      gi = static_cast<int>(groups.size());
      groups.push_back(DTypeGroup{*dtype, TensorLists(lists.size()), {}});
    }
    DTypeGroup& group = groups[gi];

    // The layout every tensor of this index must share: the param's if the kernel can walk it
    // as a flat array, else a contiguous working copy of the param (copied back after).
    at::Tensor ref = p;
    if (!p.is_non_overlapping_and_dense()) {
      ref = p.contiguous();
      group.copy_back.emplace_back(p, ref);
    }
    group.lists[0].push_back(ref);
    for (size_t l = 1; l < lists.size(); ++l) {
      const ListArg& list = lists[l];
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", list.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, op, ": ", list.name, "[", i, "] is on ", t.device(),
                  " but params[", i, "] is on ", device);
      if (list.is_step) {
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", list.name, "[",
                    i, "] must be a one-element float32 tensor on the param's device, got ",
                    t.scalar_type(), " with ", t.numel(), " elements");
        group.lists[l].push_back(t);
        continue;
      }
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", list.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but params[", i, "] has ", p.scalar_type());
      TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", list.name, "[", i, "] has shape ",
                  t.sizes(), " but params[", i, "] has ", p.sizes());
      if (same_flat_layout(t, ref)) {
        group.lists[l].push_back(t);
      } else {
        at::Tensor work = at::empty_like(ref);  // dense ref: empty_like keeps its strides
        work.copy_(t);
        if (list.written) group.copy_back.emplace_back(t, work);
        group.lists[l].push_back(std::move(work));
      }
    }
  }
  return groups;
}

void copy_back(std::vector<DTypeGroup>& groups) {
  for (DTypeGroup& group : groups) {
    for (auto& [original, work] : group.copy_back) original.copy_(work);
  }
}

ScalarArg scalar_arg(const char* op, const char* name, const at::Tensor& t,
                     const at::Device& device, std::vector<at::Tensor>& keep_alive) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got ", t.numel());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating point tensor, got ",
              t.scalar_type());
  if (t.device().is_cpu()) return ScalarArg{nullptr, false, t.item<double>()};
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but params are on ",
              device);
  at::Tensor s = t;
  if (s.scalar_type() != at::kFloat && s.scalar_type() != at::kDouble) {
    s = t.to(at::kFloat);
    keep_alive.push_back(s);
  }
  return ScalarArg{s.data_ptr(), s.scalar_type() == at::kDouble, 0.0};
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 256> cached{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cached.size()), "bad CUDA device ", device);
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    TORCH_CHECK(err == cudaSuccess, "fusedopt CUDA: cannot query the SM count of device ",
                device, ": ", cudaGetErrorString(err));
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace cuda
}  // namespace fusedopt
