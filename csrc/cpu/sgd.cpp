// CPU implementation of fusedopt::sgd_ (SGD with momentum, dampening, Nesterov): one
// parallel region over all tensors of the call. The math is rules::sgd_update
// (csrc/include/fusedopt/rules.h).
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "isa.h"
#include "ops_cpu.h"
#include "op_common.h"

namespace fusedopt {
namespace cpu {
namespace {

constexpr const char* kOp = "sgd_";

void validate(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              bool uses_buffers) {
  const size_t n = params.size();
  check_list_length(grads, n, kOp, "grads");
  if (uses_buffers) check_list_length(momentum_buffers, n, kOp, "momentum_buffers (momentum != 0)");
  for (size_t i = 0; i < n; ++i) {
    check_param(params[i], kOp, i);
    check_like_param(grads[i], params[i], kOp, "grads", i, /*written=*/false);
    if (uses_buffers) {
      check_like_param(momentum_buffers[i], params[i], kOp, "momentum_buffers", i,
                       /*written=*/true);
    }
  }
}

}  // namespace

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  const bool uses_buffers = momentum != 0.0;
  validate(params, grads, momentum_buffers, uses_buffers);
  const std::optional<double> lr_value = read_scalar(lr_tensor, kOp, "lr_tensor");
  const std::optional<double> scale = read_scalar(grad_scale, kOp, "grad_scale");
  const std::optional<double> inf = read_scalar(found_inf, kOp, "found_inf");
  if (inf.has_value() && *inf != 0.0) return;  // skipped step: nothing changes
  if (lr_value.has_value()) lr = *lr_value;

  const SgdVariant variant{weight_decay != 0.0, rules::momentum_mode(momentum, is_first_step),
                           nesterov, maximize, scale.has_value()};
  const SgdCall call{rules::make_sgd_scalars(lr, momentum, dampening, weight_decay),
                     scale.value_or(1.0), active_streams()};

  const size_t n = params.size();
  std::vector<SgdItem> items;
  std::vector<int64_t> elem_sizes;
  items.reserve(n);
  elem_sizes.reserve(n);
  FlatViews views;
  SgdKernel kernels[kNumDTypes] = {};  // chosen once per dtype present in the lists
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const DType dtype = dtype_of(p, kOp, "params", i);
    SgdItem item;
    if (uses_buffers) {
      auto ptrs = views.flatten<3>({&p, &grads[i], &momentum_buffers[i]}, {true, false, true});
      item.param = ptrs[0];
      item.grad = ptrs[1];
      item.momentum_buffer = ptrs[2];
    } else {
      auto ptrs = views.flatten<2>({&p, &grads[i]}, {true, false});
      item.param = ptrs[0];
      item.grad = ptrs[1];
      item.momentum_buffer = nullptr;
    }
    item.numel = p.numel();
    SgdKernel& kernel = kernels[static_cast<int>(dtype)];
    if (kernel == nullptr) kernel = select_sgd_kernel(dtype, variant);
    item.kernel = kernel;
    items.push_back(item);
    elem_sizes.push_back(element_size(dtype));
  }

  parallel_over_items(items, elem_sizes, [&](const SgdItem& item, int64_t begin, int64_t end) {
    item.kernel(item, call, begin, end);
  });
  views.finish();
  bump_versions(params);
  if (uses_buffers) bump_versions(momentum_buffers);
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("sgd_", &sgd_cpu); }
// Sparse CPU tensors reach the same function only to be rejected with a clear message.
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) { m.impl("sgd_", &sgd_cpu); }
TORCH_LIBRARY_IMPL(fusedopt, SparseCsrCPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace cpu
}  // namespace fusedopt
