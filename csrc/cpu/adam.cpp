// CPU implementation of fusedopt::adam_ (Adam, AdamW, AMSGrad): one parallel region over
// all tensors of the call. The math is rules::adam_update (csrc/include/fusedopt/rules.h).
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "isa.h"
#include "ops_cpu.h"
#include "op_common.h"

namespace fusedopt {
namespace cpu {
namespace {

constexpr const char* kOp = "adam_";

void validate(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, bool amsgrad) {
  const size_t n = params.size();
  check_list_length(grads, n, kOp, "grads");
  check_list_length(exp_avgs, n, kOp, "exp_avgs");
  check_list_length(exp_avg_sqs, n, kOp, "exp_avg_sqs");
  check_list_length(state_steps, n, kOp, "state_steps");
  if (amsgrad) {
    check_list_length(max_exp_avg_sqs, n, kOp, "max_exp_avg_sqs (amsgrad=True)");
  }
  for (size_t i = 0; i < n; ++i) {
    check_param(params[i], kOp, i);
    check_like_param(grads[i], params[i], kOp, "grads", i, /*written=*/false);
    check_like_param(exp_avgs[i], params[i], kOp, "exp_avgs", i, /*written=*/true);
    check_like_param(exp_avg_sqs[i], params[i], kOp, "exp_avg_sqs", i, /*written=*/true);
    if (amsgrad) {
      check_like_param(max_exp_avg_sqs[i], params[i], kOp, "max_exp_avg_sqs", i,
                       /*written=*/true);
    }
    check_step(state_steps[i], kOp, i);
  }
}

}  // namespace

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
              double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  // Everything is checked before anything is written: a bad call changes nothing.
  validate(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad);
  const std::optional<double> lr_value = read_scalar(lr_tensor, kOp, "lr_tensor");
  const std::optional<double> scale = read_scalar(grad_scale, kOp, "grad_scale");
  const std::optional<double> inf = read_scalar(found_inf, kOp, "found_inf");
  if (inf.has_value() && *inf != 0.0) return;  // skipped step: nothing changes, not even steps
  if (lr_value.has_value()) lr = *lr_value;

  const AdamVariant variant{rules::weight_decay_mode(weight_decay, decoupled_weight_decay),
                            amsgrad, maximize, scale.has_value()};
  const AdamCall call{scale.value_or(1.0), active_streams()};

  const size_t n = params.size();
  std::vector<AdamItem> items;
  std::vector<int64_t> elem_sizes;
  items.reserve(n);
  elem_sizes.reserve(n);
  FlatViews views;
  AdamKernel kernels[kNumDTypes] = {};  // chosen once per dtype present in the lists
  // Copies of non-dense tensors and the copy-back must not go through autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Tensors of a group usually share their step: compute the bias corrections (two pow()
  // calls) once per distinct step rather than once per tensor.
  double scalars_step = -1.0;
  rules::AdamScalars<double> scalars{};
  for (size_t i = 0; i < n; ++i) {
    const double step = increment_step(state_steps[i]);
    if (step != scalars_step) {
      scalars = rules::make_adam_scalars(lr, beta1, beta2, eps, weight_decay, step);
      scalars_step = step;
    }
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const DType dtype = dtype_of(p, kOp, "params", i);
    const at::Tensor* tensors[5] = {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i],
                                    amsgrad ? &max_exp_avg_sqs[i] : &p};
    std::array<void*, 5> ptrs;
    if (amsgrad) {
      ptrs = views.flatten<5>({tensors[0], tensors[1], tensors[2], tensors[3], tensors[4]},
                              {true, false, true, true, true});
    } else {
      auto four = views.flatten<4>({tensors[0], tensors[1], tensors[2], tensors[3]},
                                   {true, false, true, true});
      ptrs = {four[0], four[1], four[2], four[3], nullptr};
    }
    AdamItem item;
    item.param = ptrs[0];
    item.grad = ptrs[1];
    item.exp_avg = ptrs[2];
    item.exp_avg_sq = ptrs[3];
    item.max_exp_avg_sq = ptrs[4];
    item.numel = p.numel();
    item.scalars = scalars;
    AdamKernel& kernel = kernels[static_cast<int>(dtype)];
    if (kernel == nullptr) kernel = select_adam_kernel(dtype, variant);
    item.kernel = kernel;
    items.push_back(item);
    elem_sizes.push_back(element_size(dtype));
  }

  parallel_over_items(items, elem_sizes, [&](const AdamItem& item, int64_t begin, int64_t end) {
    item.kernel(item, call, begin, end);
  });
  views.finish();
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  if (amsgrad) bump_versions(max_exp_avg_sqs);
  bump_versions(state_steps);
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("adam_", &adam_cpu); }
// Sparse CPU tensors reach the same function only to be rejected with a clear message.
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) { m.impl("adam_", &adam_cpu); }
TORCH_LIBRARY_IMPL(fusedopt, SparseCsrCPU, m) { m.impl("adam_", &adam_cpu); }

}  // namespace cpu
}  // namespace fusedopt
