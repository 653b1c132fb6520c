// Switches the code generation target of the rest of the translation unit to AVX-512 (for
// kernels_avx512.cpp and norm_kernels_avx512.cpp, after their headers) and names the variant:
// isa_avx512, or isa_avx512bf16 where the file is compiled again with FUSEDOPT_AVX512_BF16
// defined (kernels_avx512bf16.cpp, norm_kernels_avx512bf16.cpp), which adds the AVX512_BF16
// instructions and converts bf16 in blocks (convert_blocks.h). The including file pops the
// target again at its end (#pragma clang attribute pop / GCC pop_options).
// Off x86-64 or without GCC/clang only the name is set (the file then compiles stubs of it).
// No include guard on purpose.
#if defined(FUSEDOPT_AVX512_BF16)
#define FUSEDOPT_ISA_NS isa_avx512bf16
#else
#define FUSEDOPT_ISA_NS isa_avx512
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(FUSEDOPT_AVX512_BF16)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,avx512bf16")
#endif
#define FUSEDOPT_BF16_BLOCKS 1  // convert_blocks.h: vcvtneps2bf16
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#endif
#endif
#define FUSEDOPT_F16C_WIDTH 16  // fp32 lanes of one F16C conversion
#endif
