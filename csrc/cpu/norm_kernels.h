// Kernels of the clipping ops (norm.cpp), compiled once per ISA like the optimizer kernels:
// norm_kernels_<isa>.cpp include norm_kernels_impl.h after switching the code-generation target,
// and norm.cpp picks the variant of isa::active_isa() (isa.h) at run time. The wider ISAs matter
// most for fp16/bf16 data, whose conversions vectorise well only with AVX2 and up.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedopt/norm.h"
#include "kernels.h"  // DType, Isa

namespace fusedopt {
namespace cpu {

// The reduction (norm.h's term/combine) of prescale * x over the n elements x at data, as a
// double partial result (NaN when a max/min saw a NaN). p is used only by norm::Kind::kLp.
// Each element is multiplied in the math type before its term is taken (x * 1 == x).
using NormChunkFn = double (*)(const void* data, int64_t n, double p, double prescale);
// x *= scale over n elements (in the math type of the storage dtype, as torch does).
using ScaleChunkFn = void (*)(void* data, int64_t n, double scale);
// x = clamp(x, lo, hi) over n elements; NaN stays NaN.
using ClampChunkFn = void (*)(void* data, int64_t n, double lo, double hi);

#define FUSEDOPT_DECLARE_NORM_ISA(ns)                              \
  namespace ns {                                                   \
  bool norm_compiled();                                            \
  NormChunkFn norm_chunk_kernel(DType dtype, norm::Kind kind);     \
  ScaleChunkFn scale_chunk_kernel(DType dtype);                    \
  ClampChunkFn clamp_chunk_kernel(DType dtype);                    \
  }
FUSEDOPT_DECLARE_NORM_ISA(isa_scalar)
FUSEDOPT_DECLARE_NORM_ISA(isa_avx2)
FUSEDOPT_DECLARE_NORM_ISA(isa_avx512)
FUSEDOPT_DECLARE_NORM_ISA(isa_avx512bf16)
#undef FUSEDOPT_DECLARE_NORM_ISA

}  // namespace cpu
}  // namespace fusedopt
