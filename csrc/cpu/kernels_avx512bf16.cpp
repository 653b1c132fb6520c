// avx512bf16 variant of the CPU kernels (see kernels_impl.h): the AVX-512 variant, compiled
// again with the AVX512_BF16 instructions so that bf16 arrays convert in blocks
// (vcvtneps2bf16, convert_blocks.h). Chosen at run time where the CPU has them (isa.cpp).
#define FUSEDOPT_AVX512_BF16 1
#include "kernels_avx512.cpp"
