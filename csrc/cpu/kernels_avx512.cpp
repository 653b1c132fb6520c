// AVX-512 variants of the CPU kernels (see kernels_impl.h): isa_avx512, and isa_avx512bf16 when
// kernels_avx512bf16.cpp includes this file. Needs avx512f/bw/vl/dq (bw for the 16-bit
// conversions; avx512bf16 adds AVX512_BF16).
// Headers are included BEFORE switching the target so that only our own code is compiled
// for it; the ISA is selected at run time (isa.cpp), never with -march at build time.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "storage.h"

#include "avx512_target.h"  // FUSEDOPT_ISA_NS (isa_avx512 or isa_avx512bf16) and the target

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 reports the deliberately undefined pass-through operand of its own
// _mm512_cvtph_ps / _mm512_cvtps_ph (avx512fintrin.h) as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels_impl.h"
#pragma GCC diagnostic pop
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64 or not GCC/clang: this variant is not compiled
namespace fusedopt { namespace cpu { namespace FUSEDOPT_ISA_NS {
bool compiled() { return false; }
AdamKernel adam_kernel(DType, const AdamVariant&) { return nullptr; }
SgdKernel sgd_kernel(DType, const SgdVariant&) { return nullptr; }
}}}  // namespace fusedopt::cpu
#endif
