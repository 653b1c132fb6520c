// The CUDA implementations of the optimizer ops (registered for the CUDA dispatch key in
// ops_cuda.cpp). Declared here so that python_direct.cpp can also call them directly, as it
// calls the CPU ones (cpu/ops_cpu.h). Host code only: no CUDA header is needed to include it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedopt {
namespace cuda {

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf);

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf);

}  // namespace cuda
}  // namespace fusedopt
