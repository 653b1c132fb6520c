// CUDA implementations of the fusedopt ops (schemas in csrc/ops.cpp), plus two internal ops
// that expose the table cache to tests.
//
// Per call: check and group the tensors by dtype (prepare.cpp), fetch each group's device
// table (tables.cpp), queue one kernel per group on the current stream (adam.cu, sgd.cu),
// and copy back any working copies of tensors the kernels could not walk in place. Nothing
// here waits for the device: lr / grad_scale / found_inf tensors on the GPU are read by the
// kernel; ones on the CPU are read here (no device sync involved).
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedopt/rules.h"
#include "launch.h"
#include "ops_cuda.h"
#include "prepare.h"
#include "tables.h"

namespace fusedopt {
namespace cuda {
namespace {

// Reads the optional found_inf. Returns false when the step must be skipped right away (a CPU
// flag that is set); otherwise fills `ptr`/`is_double` (nullptr: no flag or a CPU flag of 0).
bool read_found_inf(const char* op, const std::optional<at::Tensor>& found_inf,
                    const at::Device& device, std::vector<at::Tensor>& keep_alive,
                    const void*& ptr, bool& is_double) {
  ptr = nullptr;
  is_double = false;
  if (!found_inf.has_value() || !found_inf->defined()) return true;
  const ScalarArg f = scalar_arg(op, "found_inf", *found_inf, device, keep_alive);
  if (f.ptr == nullptr) return f.value == 0.0;
  ptr = f.ptr;
  is_double = f.is_double;
  return true;
}

ScalarArg lr_arg(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor,
                 const at::Device& device, std::vector<at::Tensor>& keep_alive) {
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    return scalar_arg(op, "lr_tensor", *lr_tensor, device, keep_alive);
  }
  return ScalarArg{nullptr, false, lr};
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// In-place torch ops bump the autograd version counter of what they write, and torch's fused
// optimizers do too; the dispatcher does not do it for custom ops. Without it, a param saved
// for a backward that runs after the step would give wrong gradients instead of autograd's
// "modified by an inplace operation" error. Host-side field increments, no device work.
void bump_written_versions(const std::vector<ListArg>& lists) {
  for (const ListArg& list : lists) {
    if (!list.written) continue;
    for (const at::Tensor& t : list.tensors) {
      if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  static constexpr const char* op = "fusedopt::adam_ (CUDA)";
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;

  AdamArgs args{};
  if (!read_found_inf(op, found_inf, device, keep_alive, args.found_inf, args.found_inf_is_double)) {
    return;
  }
  args.lr = lr_arg(op, lr, lr_tensor, device, keep_alive);
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.weight_decay_mode =
      static_cast<int32_t>(rules::weight_decay_mode(weight_decay, decoupled_weight_decay));
  args.maximize = maximize;
  args.has_grad_scale = has(grad_scale);
  if (args.has_grad_scale) args.grad_scale = scalar_arg(op, "grad_scale", *grad_scale, device, keep_alive);

  std::vector<ListArg> lists{{params, "params", true, false},
                             {grads, "grads", false, false},
                             {exp_avgs, "exp_avgs", true, false},
                             {exp_avg_sqs, "exp_avg_sqs", true, false},
                             {state_steps, "state_steps", true, true}};
  if (amsgrad) lists.push_back({max_exp_avg_sqs, "max_exp_avg_sqs", true, false});
  std::vector<DTypeGroup> groups = group_by_dtype(op, lists);

  const int sms = sm_count(device.index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const DTypeGroup& group : groups) {
    const WorkTable table = acquire_table(OpKind::kAdam, group.dtype, group.lists, kAdamGrad);
    check_launch(op, launch_adam(group.dtype, amsgrad, table, args, sms, stream));
  }
  copy_back(groups);
  bump_written_versions(lists);
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  static constexpr const char* op = "fusedopt::sgd_ (CUDA)";
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;

  SgdArgs args{};
  if (!read_found_inf(op, found_inf, device, keep_alive, args.found_inf, args.found_inf_is_double)) {
    return;
  }
  args.lr = lr_arg(op, lr, lr_tensor, device, keep_alive);
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.is_first_step = is_first_step;
  args.has_grad_scale = has(grad_scale);
  if (args.has_grad_scale) args.grad_scale = scalar_arg(op, "grad_scale", *grad_scale, device, keep_alive);

  std::vector<ListArg> lists{{params, "params", true, false}, {grads, "grads", false, false}};
  if (momentum != 0.0) lists.push_back({momentum_buffers, "momentum_buffers", true, false});
  std::vector<DTypeGroup> groups = group_by_dtype(op, lists);

  const int sms = sm_count(device.index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const DTypeGroup& group : groups) {
    const WorkTable table = acquire_table(OpKind::kSgd, group.dtype, group.lists, kSgdGrad);
    check_launch(op, launch_sgd(group.dtype, table, args, sms, stream));
  }
  copy_back(groups);
  bump_written_versions(lists);
}

namespace {

// [full uploads, gradient-only uploads, reuses, tables cached]
std::vector<int64_t> cuda_table_stats() {
  const TableStats s = table_stats();
  return {s.full_uploads, s.grad_uploads, s.hits, s.entries};
}

void cuda_clear_table_cache() { clear_table_cache(); }

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_", &fusedopt::cuda::adam_cuda);
  m.impl("sgd_", &fusedopt::cuda::sgd_cuda);
}

// Internal, CUDA builds only: the work-table cache, for tests and diagnostics.
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("_cuda_table_stats() -> int[]", &fusedopt::cuda::cuda_table_stats);
  m.def("_cuda_clear_table_cache() -> ()", &fusedopt::cuda::cuda_clear_table_cache);
}
