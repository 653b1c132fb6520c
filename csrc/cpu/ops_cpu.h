// The CPU implementations of the fusedopt ops (registered for the CPU dispatch key in
// adam.cpp / sgd.cpp / norm.cpp). Declared here so that python_direct.cpp can also call them
// directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedopt {
namespace cpu {

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
              double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf);

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf);

// fusedopt::total_norm and fusedopt::scale_ (norm.cpp).
at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type);
void scale_cpu(at::TensorList tensors, const at::Tensor& scale);

}  // namespace cpu
}  // namespace fusedopt
