// AVX2 variant of the clipping kernels (see norm_kernels_impl.h), chosen at run time (isa.h).
// Headers are included BEFORE switching the target so that only our own code is compiled for it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "norm_kernels.h"
#include "storage.h"

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
#define FUSEDOPT_F16C_WIDTH 8  // fp32 lanes of one F16C conversion
#define FUSEDOPT_ISA_NS isa_avx2
#include "norm_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64 or not GCC/clang: this variant is not compiled (isa.h never selects it)
namespace fusedopt { namespace cpu { namespace isa_avx2 {
bool norm_compiled() { return false; }
NormChunkFn norm_chunk_kernel(DType, norm::Kind) { return nullptr; }
ScaleChunkFn scale_chunk_kernel(DType) { return nullptr; }
ClampChunkFn clamp_chunk_kernel(DType) { return nullptr; }
}}}  // namespace fusedopt::cpu::isa_avx2
#endif
