// fp16 <-> fp32 conversion of whole blocks with the hardware instructions (F16C:
// vcvtph2ps / vcvtps2ph), for the per-ISA kernel bodies (kernels_impl.h, norm_kernels_impl.h).
//
// GCC vectorises Fp16's portable bit-twiddling conversions (storage.h), but they cost ~20 vector
// operations per load + store. vcvtph2ps is exact; vcvtps2ph rounds to nearest even, like
// Fp16::store (and ignores MXCSR.FTZ). Included inside an ISA's namespace by an impl header,
// after the translation unit has defined FUSEDOPT_F16C_WIDTH (fp32 lanes of one conversion:
// 16 with AVX-512, 8 with AVX2) and switched the target; the scalar variant leaves it undefined
// and kHalfBlocks false. No include guard on purpose, like the impl headers.

#if defined(FUSEDOPT_F16C_WIDTH)
constexpr bool kHalfBlocks = true;

// dst[0..N) = the fp32 values of the fp16 src[0..N); N a multiple of the conversion width.
template <int64_t N>
__attribute__((always_inline)) inline void half_block_to_float(const uint16_t* src, float* dst) {
  static_assert(N % FUSEDOPT_F16C_WIDTH == 0, "a block is whole F16C conversions");
  for (int64_t j = 0; j < N; j += FUSEDOPT_F16C_WIDTH) {
#if FUSEDOPT_F16C_WIDTH == 16
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + j))));
#else
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + j))));
#endif
  }
}

// dst[0..N) = src[0..N) rounded to fp16 (nearest even).
template <int64_t N>
__attribute__((always_inline)) inline void float_block_to_half(const float* src, uint16_t* dst) {
  static_assert(N % FUSEDOPT_F16C_WIDTH == 0, "a block is whole F16C conversions");
  for (int64_t j = 0; j < N; j += FUSEDOPT_F16C_WIDTH) {
#if FUSEDOPT_F16C_WIDTH == 16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + j),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  }
}
#else
constexpr bool kHalfBlocks = false;
#endif
