// The CPU implementations of the fusedopt ops (registered for the CPU dispatch key in
// adam.cpp / sgd.cpp / norm.cpp). Declared here so that python_direct.cpp can also call them
// directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "op_types.h"

namespace fusedopt {
namespace cpu {

AdamOp adam_cpu;
SgdOp sgd_cpu;

// fusedopt::total_norm and fusedopt::scale_ (norm.cpp).
at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type,
                          const std::optional<at::Tensor>& prescale = std::nullopt);
void scale_cpu(at::TensorList tensors, const at::Tensor& scale);

}  // namespace cpu
}  // namespace fusedopt
