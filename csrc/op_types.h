// The C++ function types of the optimizer ops, written once: each device's implementation
// (cpu/ops_cpu.h, cuda/ops_cuda.h) is declared with them, and python_direct.cpp takes them as
// template arguments. The schemas the dispatcher sees are in ops.cpp, in the same order.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedopt {

// adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
//       eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale,
//       found_inf)
using AdamOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, at::TensorList, double, double, double, double, double, bool,
                    bool, bool, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

// sgd_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
//      maximize, is_first_step, lr_tensor, grad_scale, found_inf)
using SgdOp = void(at::TensorList, at::TensorList, at::TensorList, double, double, double, double,
                   bool, bool, bool, const std::optional<at::Tensor>&,
                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

}  // namespace fusedopt
