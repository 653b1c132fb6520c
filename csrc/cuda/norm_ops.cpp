// CUDA implementations of the clipping ops (schemas in csrc/cpu/norm.cpp, CPU kernels there):
//
//   fusedopt::total_norm(Tensor[] tensors, float norm_type, Tensor? prescale=None) -> Tensor
//       one partials launch per dtype present plus one finishing launch; deterministic (every
//       chunk's partial has its own slot, merged in a fixed order), no atomics, no host sync.
//       A `prescale` multiplies each element first (read like scale_'s scale: on the device
//       when it is a CUDA tensor).
//       The 0-dim result is float64 if any input is float64, else float32, on the tensors' device.
//   fusedopt::scale_(Tensor(a!)[] tensors, Tensor scale) -> ()
//       one launch per dtype. A CUDA `scale` is read by the kernel (whose threads return at once
//       when it is 1); a CPU `scale` is read here (no device sync) and 1 launches nothing.
//   fusedopt::clamp_(Tensor(a!)[] tensors, float min, float max) -> ()
//       one launch per dtype.
//
// Per call: validate every tensor (the CPU op's checks and messages), group by dtype in order of
// first appearance without the empty tensors (table_layout.h's plan_clip_groups), take each
// group's device table from the cache (tables.cpp, OpKind::kClip: shared by the three ops) and
// queue the launches of norm.cu on the current stream. A tensor that is not one dense block
// (a slice with gaps) is read from a contiguous copy; written ones are copied back after the
// launch: correct, two extra copy kernels for such tensors.
#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "fusedopt/norm.h"
#include "launch.h"
#include "list_overlap.h"
#include "prepare.h"
#include "table_layout.h"
#include "tables.h"

namespace fusedopt {
namespace cuda {
namespace {

using norm::Kind;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fusedopt::", op, " (CUDA): kernel launch failed: ",
              cudaGetErrorString(err));
}

// The CPU op's checks (csrc/cpu/norm.cpp), for one device: defined, strided (not sparse), on
// `device` (tensors[0]'s, a CUDA device), a supported dtype, and for written tensors no
// elements sharing memory.
DType check_tensor(const at::Tensor& t, const char* op, size_t i, const at::Device& device,
                   bool written) {
  TORCH_CHECK(t.defined(), "fusedopt::", op, ": tensors[", i, "] is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt::", op, ": tensors[", i, "] is ", t.layout(),
              "; sparse tensors are not supported");
  TORCH_CHECK(t.device().is_cuda(), "fusedopt::", op, ": tensors[", i, "] is on ", t.device(),
              "; this implementation needs CUDA tensors");
  TORCH_CHECK(t.device() == device, "fusedopt::", op, ": tensors[", i, "] is on ", t.device(),
              " but tensors[0] is on ", device, "; one call takes tensors of one device");
  const std::optional<DType> dtype = storage_dtype(t.scalar_type());
  TORCH_CHECK(dtype.has_value(), "fusedopt::", op, ": tensors[", i, "] has dtype ",
              t.scalar_type(),
              ", which is not supported (supported: float32, float64, bfloat16, float16)");
  if (written) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fusedopt::", op,
                ": tensors[", i, "] has elements that share memory and cannot be updated in place");
  }
  return *dtype;
}

// A validated call: its groups (one launch each) and the tensors they walk.
struct Call {
  at::Device device{at::kCUDA};
  std::vector<DType> dtypes;   // per tensor of the op's list
  std::vector<int64_t> numels; // per tensor
  bool any_double = false;     // some tensor (empty ones included) is float64
};

Call validate(const char* op, at::TensorList tensors, bool written) {
  Call call;
  TORCH_CHECK(tensors[0].defined(), "fusedopt::", op, ": tensors[0] is undefined (None)");
  call.device = tensors[0].device();
  call.dtypes.reserve(tensors.size());
  call.numels.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const DType dtype = check_tensor(tensors[i], op, i, call.device, written);
    call.dtypes.push_back(dtype);
    call.numels.push_back(tensors[i].numel());
    call.any_double = call.any_double || dtype == DType::kFloat64;
  }
  return call;
}

// The tensors of each group as the kernels walk them: the tensor itself when it is one dense
// block, else a contiguous copy (recorded in copy_back when the op writes it).
struct Groups {
  std::vector<ClipGroup> plan;
  std::vector<TensorLists> lists;                             // per group: one list
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;   // (original, working copy)
  int64_t slots = 0;                                          // chunks of all groups
};

Groups make_groups(at::TensorList tensors, const Call& call, bool written) {
  Groups g;
  g.plan = plan_clip_groups(static_cast<int64_t>(tensors.size()), call.dtypes.data(),
                            call.numels.data(), &g.slots);
  g.lists.resize(g.plan.size());
  for (size_t k = 0; k < g.plan.size(); ++k) {
    std::vector<at::Tensor> list;
    list.reserve(g.plan[k].tensors.size());
    for (int64_t i : g.plan[k].tensors) {
      const at::Tensor& t = tensors[i];
      if (t.is_non_overlapping_and_dense()) {
        list.push_back(t);
      } else {
        at::Tensor work = t.contiguous();
        if (written) g.copy_back.emplace_back(t, work);
        list.push_back(std::move(work));
      }
    }
    g.lists[k].push_back(std::move(list));
  }
  return g;
}

void finish_writes(Groups& g, at::TensorList tensors) {
  for (auto& [original, work] : g.copy_back) original.copy_(work);
  // In-place torch ops bump the autograd version counter of what they write; the dispatcher
  // does not do it for custom ops (the CPU op does the same).
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

// ---- ops ------------------------------------------------------------------------------------

// A one-element factor (scale_'s scale, total_norm's prescale) as the kernels read it: a CPU
// tensor is read here (host memory: no device sync), a CUDA one on the device, through
// `keep_alive` (converted to float64 first when it is neither float32 nor float64).
ScalarArg factor_arg(const at::Tensor& t, const at::Device& device, const char* op,
                     const char* name, at::Tensor& keep_alive) {
  TORCH_CHECK(t.defined() && t.numel() == 1, "fusedopt::", op, ": ", name,
              " must have one element, got shape ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!t.is_complex(), "fusedopt::", op, ": ", name, " must be real, got ",
              t.scalar_type());
  if (t.device().is_cpu()) return ScalarArg{nullptr, false, t.item<double>()};
  TORCH_CHECK(t.device() == device, "fusedopt::", op, ": ", name, " is on ", t.device(),
              " but the tensors are on ", device);
  keep_alive = t;
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) {
    keep_alive = t.to(at::kDouble);  // one small conversion kernel (fp16/bf16/integer)
  }
  return ScalarArg{keep_alive.data_ptr(), keep_alive.scalar_type() == at::kDouble, 0.0};
}

at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type,
                           const std::optional<at::Tensor>& prescale) {
  static constexpr const char* op = "total_norm";
  const Kind kind = norm::kind_of(norm_type);
  if (tensors.empty()) {  // not reached through the dispatcher (no tensor to dispatch on)
    return at::scalar_tensor(norm::finish(kind, norm::identity<double>(kind), norm_type),
                             at::TensorOptions().dtype(at::kFloat));
  }
  const Call call = validate(op, tensors, /*written=*/false);
  const c10::cuda::CUDAGuard guard(call.device);
  const Groups groups = make_groups(tensors, call, /*written=*/false);
  const int device = call.device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const at::TensorOptions on_device = at::TensorOptions().device(call.device);
  at::Tensor prescale_alive;  // keeps a converted device prescale alive until the launches
  const ScalarArg pre = prescale.has_value() && prescale->defined()
                            ? factor_arg(*prescale, call.device, op, "prescale", prescale_alive)
                            : ScalarArg{nullptr, false, 1.0};

  // Slots [0, slots): the partials; for p = 0 also [slots, 2 slots): the tensor-start marks.
  const int64_t words = std::max<int64_t>(1, kind == Kind::kL0 ? 2 * groups.slots : groups.slots);
  at::Tensor partials = at::empty({words}, on_device.dtype(at::kDouble));
  at::Tensor out = at::empty({}, on_device.dtype(call.any_double ? at::kDouble : at::kFloat));
  double* partials_ptr = partials.data_ptr<double>();
  double* starts_ptr = kind == Kind::kL0 ? partials_ptr + groups.slots : nullptr;

  const int sms = groups.plan.empty() ? 0 : sm_count(device);
  for (size_t k = 0; k < groups.plan.size(); ++k) {
    const ClipGroup& group = groups.plan[k];
    const WorkTable table = acquire_table(OpKind::kClip, group.dtype, groups.lists[k], 0);
    TORCH_CHECK(table.num_chunks == group.chunks, "fusedopt::total_norm (CUDA): table has ",
                table.num_chunks, " chunks, expected ", group.chunks);
    const NormPartialsArgs args{static_cast<int32_t>(kind), norm_type, partials_ptr, starts_ptr,
                                group.slot0, pre};
    check_launch(op, launch_norm_partials(group.dtype, table, args, sms, stream));
  }
  const NormFinishArgs finish{static_cast<int32_t>(kind), norm_type, partials_ptr, starts_ptr,
                              groups.slots, out.data_ptr(), call.any_double};
  check_launch(op, launch_norm_finish(finish, stream));
  return out;
}

// The element-wise ops (scale_, clamp_): one launch per dtype present, `launch(dtype, table,
// sms, stream)` returning the launch's cudaError_t, then working copies written back and
// version counters bumped. When two tensors share memory (list_overlap.h), one tensor at a
// time in list order instead (stream-ordered, as torch's ops: an element listed twice is
// rewritten twice, never by two blocks at once).
template <class Launch>
void rewrite_in_place(const char* op, at::TensorList tensors, const Call& call, Launch&& launch) {
  if (tensors.size() > 1 && any_two_share_memory(tensors)) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      Call one;
      one.device = call.device;
      one.dtypes = {call.dtypes[i]};
      one.numels = {call.numels[i]};
      one.any_double = call.dtypes[i] == DType::kFloat64;
      rewrite_in_place(op, tensors.slice(i, 1), one, launch);
    }
    return;
  }
  Groups groups = make_groups(tensors, call, /*written=*/true);
  const int device = call.device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int sms = groups.plan.empty() ? 0 : sm_count(device);
  for (size_t k = 0; k < groups.plan.size(); ++k) {
    const WorkTable table = acquire_table(OpKind::kClip, groups.plan[k].dtype, groups.lists[k], 0);
    check_launch(op, launch(groups.plan[k].dtype, table, sms, stream));
  }
  finish_writes(groups, tensors);
}

void scale_cuda(at::TensorList tensors, const at::Tensor& scale) {
  static constexpr const char* op = "scale_";
  TORCH_CHECK(scale.defined() && scale.numel() == 1,
              "fusedopt::scale_: scale must have one element, got shape ",
              scale.defined() ? scale.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!scale.is_complex(), "fusedopt::scale_: scale must be real, got ", scale.scalar_type());
  if (tensors.empty()) return;
  const Call call = validate(op, tensors, /*written=*/true);
  const c10::cuda::CUDAGuard guard(call.device);

  at::Tensor on_device;  // keeps a converted device scale alive until the launches are queued
  const ScalarArg factor = factor_arg(scale, call.device, op, "scale", on_device);
  if (factor.ptr == nullptr && factor.value == 1.0) return;  // exact no-op (as the CPU op)

  rewrite_in_place(op, tensors, call, [&](DType dtype, const WorkTable& table, int sms,
                                          cudaStream_t stream) {
    return launch_scale(dtype, table, factor, sms, stream);
  });
}

void clamp_cuda(at::TensorList tensors, double min, double max) {
  static constexpr const char* op = "clamp_";
  if (tensors.empty()) return;
  const Call call = validate(op, tensors, /*written=*/true);
  const c10::cuda::CUDAGuard guard(call.device);
  rewrite_in_place(op, tensors, call, [&](DType dtype, const WorkTable& table, int sms,
                                          cudaStream_t stream) {
    return launch_clamp(dtype, table, min, max, sms, stream);
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("total_norm", &fusedopt::cuda::total_norm_cuda);
  m.impl("scale_", &fusedopt::cuda::scale_cuda);
  m.impl("clamp_", &fusedopt::cuda::clamp_cuda);
}

// Sparse CUDA tensors reach the ops only to be refused with a clear error (check_tensor), instead
// of the dispatcher's "Could not run ... with arguments from the 'SparseCUDA' backend".
TORCH_LIBRARY_IMPL(fusedopt, SparseCUDA, m) {
  m.impl("total_norm", &fusedopt::cuda::total_norm_cuda);
  m.impl("scale_", &fusedopt::cuda::scale_cuda);
  m.impl("clamp_", &fusedopt::cuda::clamp_cuda);
}

TORCH_LIBRARY_IMPL(fusedopt, SparseCsrCUDA, m) {
  m.impl("total_norm", &fusedopt::cuda::total_norm_cuda);
  m.impl("scale_", &fusedopt::cuda::scale_cuda);
  m.impl("clamp_", &fusedopt::cuda::clamp_cuda);
}
