// AVX-512 variant of the clipping kernels (see norm_kernels_impl.h), chosen at run time (isa.h).
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#endif
#define FUSEDOPT_F16C_WIDTH 16  // fp32 lanes of one F16C conversion
#define FUSEDOPT_ISA_NS isa_avx512
// GCC 12 reports the deliberately undefined pass-through operand of its own
// _mm512_cvtph_ps / _mm512_cvtps_ph (avx512fintrin.h) as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "norm_kernels_impl.h"
#pragma GCC diagnostic pop
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64 or not GCC/clang: this variant is not compiled (isa.h never selects it)
namespace fusedopt { namespace cpu { namespace isa_avx512 {
bool norm_compiled() { return false; }
NormChunkFn norm_chunk_kernel(DType, norm::Kind) { return nullptr; }
ScaleChunkFn scale_chunk_kernel(DType) { return nullptr; }
ClampChunkFn clamp_chunk_kernel(DType) { return nullptr; }
}}}  // namespace fusedopt::cpu::isa_avx512
#endif
