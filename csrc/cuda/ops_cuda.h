// The CUDA implementations of the optimizer ops (registered for the CUDA dispatch key in
// ops_cuda.cpp), declared so that python_direct.cpp can call them directly, as it calls the CPU
// ones (cpu/ops_cpu.h). Host code only: no CUDA header is needed to include it.
#pragma once

#include "op_types.h"

namespace fusedopt {
namespace cuda {

AdamOp adam_cuda;
SgdOp sgd_cuda;

}  // namespace cuda
}  // namespace fusedopt
