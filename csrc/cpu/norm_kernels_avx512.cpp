// AVX-512 variants of the clipping kernels (see norm_kernels_impl.h): isa_avx512, and
// isa_avx512bf16 when norm_kernels_avx512bf16.cpp includes this file; chosen at run time (isa.h).
// Headers are included BEFORE switching the target so that only our own code is compiled for it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "norm_kernels.h"
#include "storage.h"

#include "avx512_target.h"  // FUSEDOPT_ISA_NS (isa_avx512 or isa_avx512bf16) and the target

#if defined(__x86_64__) && defined(__GNUC__)
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
namespace fusedopt { namespace cpu { namespace FUSEDOPT_ISA_NS {
bool norm_compiled() { return false; }
NormChunkFn norm_chunk_kernel(DType, norm::Kind) { return nullptr; }
ScaleChunkFn scale_chunk_kernel(DType) { return nullptr; }
ClampChunkFn clamp_chunk_kernel(DType) { return nullptr; }
}}}  // namespace fusedopt::cpu
#endif
