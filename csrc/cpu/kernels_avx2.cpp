// AVX2 variant of the CPU kernels (see kernels_impl.h). Needs avx2 and fma.
// Headers are included BEFORE switching the target so that only our own code is compiled
// for it; the ISA is selected at run time (isa.cpp), never with -march at build time.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"
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
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64 or not GCC/clang: this variant is not compiled
namespace fusedopt { namespace cpu { namespace isa_avx2 {
bool compiled() { return false; }
AdamKernel adam_kernel(DType, const AdamVariant&) { return nullptr; }
SgdKernel sgd_kernel(DType, const SgdVariant&) { return nullptr; }
}}}  // namespace fusedopt::cpu::isa_avx2
#endif
