// 16-bit <-> fp32 conversion of whole blocks with the hardware instructions, for the per-ISA
// kernel bodies (kernels_impl.h, norm_kernels_impl.h): fp16 with F16C (vcvtph2ps / vcvtps2ph),
// bf16 with AVX512_BF16 (vcvtneps2bf16). Both give exactly what storage.h's portable
// conversions give, which GCC vectorises too but at a cost: ~20 vector operations per fp16 load
// + store, ~7 per bf16 store (the rounding), against one instruction here.
//
// Included inside an ISA's namespace by an impl header, after the translation unit has switched
// the target and defined FUSEDOPT_F16C_WIDTH (fp32 lanes of one F16C conversion: 16 with
// AVX-512, 8 with AVX2; the scalar variant leaves it undefined) and, in the avx512bf16 variant
// only, FUSEDOPT_BF16_BLOCKS. No include guard on purpose, like the impl headers.
//
// fp16: vcvtph2ps is exact; vcvtps2ph rounds to nearest even, like Fp16::store (and ignores
// MXCSR.FTZ).

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

// bf16: the load is a shift (exact). vcvtneps2bf16 rounds to nearest even like Bf16::store,
// except on two kinds of input, which go through Bf16::store's arithmetic instead (a rare
// branch: one vfpclassps per 16 values finds them): denormals, which the instruction flushes
// to zero (torch rounds their bits like any other), and NaNs, which it keeps with their sign
// and payload where torch stores the canonical 0x7fc0.
#if defined(FUSEDOPT_BF16_BLOCKS)
constexpr bool kBf16Blocks = true;

// dst[0..N) = the fp32 values of the bf16 src[0..N); N a multiple of 16.
template <int64_t N>
__attribute__((always_inline)) inline void bf16_block_to_float(const uint16_t* src, float* dst) {
  static_assert(N % 16 == 0, "a block is whole 16-lane conversions");
  for (int64_t j = 0; j < N; j += 16) {
    const __m512i wide =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)));
    _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
}

// dst[0..N) = src[0..N) rounded to bf16 (nearest even; NaN -> 0x7fc0).
template <int64_t N>
__attribute__((always_inline)) inline void float_block_to_bf16(const float* src, uint16_t* dst) {
  static_assert(N % 16 == 0, "a block is whole 16-lane conversions");
  constexpr int kNan = 0x01 | 0x80;  // vfpclassps categories: quiet NaN, signalling NaN
  constexpr int kDenormal = 0x20;
  for (int64_t j = 0; j < N; j += 16) {
    const __m512 x = _mm512_loadu_ps(src + j);
    __m256i out = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    const __mmask16 odd = _mm512_fpclass_ps_mask(x, kNan | kDenormal);
    if (__builtin_expect(odd != 0, 0)) {
      alignas(64) float lanes[16];
      alignas(32) uint16_t fixed[16];
      _mm512_store_ps(lanes, x);
      for (int k = 0; k < 16; ++k) fixed[k] = Bf16::store(lanes[k]);
      out = _mm256_mask_mov_epi16(out, odd, _mm256_load_si256(reinterpret_cast<const __m256i*>(fixed)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), out);
  }
}
#else
constexpr bool kBf16Blocks = false;
#endif

// Whether this ISA converts storage type S in blocks (with the functions below).
template <class S>
constexpr bool kBlocksOf = (std::is_same_v<S, Fp16> && kHalfBlocks) ||
                           (std::is_same_v<S, Bf16> && kBf16Blocks);

// dst[0..N) = the fp32 values of src[0..N) in storage type S (kBlocksOf<S> only).
template <class S, int64_t N>
__attribute__((always_inline)) inline void block_to_float(const uint16_t* src, float* dst) {
  static_assert(kBlocksOf<S>, "S has no block conversions with this ISA");
#if defined(FUSEDOPT_BF16_BLOCKS)
  if constexpr (std::is_same_v<S, Bf16>) bf16_block_to_float<N>(src, dst);
#endif
#if defined(FUSEDOPT_F16C_WIDTH)
  if constexpr (std::is_same_v<S, Fp16>) half_block_to_float<N>(src, dst);
#endif
  (void)src, (void)dst;
}

// dst[0..N) = src[0..N) rounded to storage type S (kBlocksOf<S> only).
template <class S, int64_t N>
__attribute__((always_inline)) inline void float_to_block(const float* src, uint16_t* dst) {
  static_assert(kBlocksOf<S>, "S has no block conversions with this ISA");
#if defined(FUSEDOPT_BF16_BLOCKS)
  if constexpr (std::is_same_v<S, Bf16>) float_block_to_bf16<N>(src, dst);
#endif
#if defined(FUSEDOPT_F16C_WIDTH)
  if constexpr (std::is_same_v<S, Fp16>) float_block_to_half<N>(src, dst);
#endif
  (void)src, (void)dst;
}
