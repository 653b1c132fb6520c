// Body of the CPU kernels, compiled once per ISA.
//
// Included by kernels_<isa>.cpp after it has set FUSEDOPT_ISA_NS and switched the code
// generation target (#pragma GCC target). Everything defined here lives in that ISA's
// namespace, so the per-ISA copies never meet in the linker. The loops are plain scalar
// code over raw pointers that GCC auto-vectorises with the ISA's widest vectors; the rules
// (rules.h) and conversions (storage.h) are always_inline and so are vectorised with them.
// No include guard on purpose: do not include this file anywhere else.

#ifndef FUSEDOPT_ISA_NS
#error "kernels_impl.h is included only by kernels_<isa>.cpp"
#endif

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

bool compiled() { return true; }

// A kernel walks its range [begin, end) as STREAMS equal sub-ranges side by side, kBlock
// elements of each in turn, then the tail. The hardware prefetcher follows each sequential
// stream separately, and how many streams per core it serves best is the machine's:
// - 2-core Intel Xeon VM: two sub-ranges (8 streams for Adam, 6 for SGD with momentum) keep
//   more cache lines in flight than one; GPT-2-sized AdamW / Nesterov steps took 110-121 /
//   86-92 ms with 2 against 130-137 / 95-105 ms with 1 (same session, builds swapped in turn),
//   and 4 were no better than 2.
// - 2-core AMD EPYC (Zen 4) VM: one is better on big tensors. stream_count.cpp's Adam-like
//   loop: 42-47 GB/s with 1, 40-42 with 2, 30-32 with 4 (three runs). The AdamW step, both
//   counts interleaved in one process (cpu_op_timing.py --streams 1,2), 9 runs: GPT-2 shapes
//   faster with 1 in all, by 1-2.5% when the VM's memory was slow (56-59 ms) and 7-10% when
//   it was fast (34.2 / 37.1 against 37.6 / 39.9 ms); 10 x 4M 2-4% faster with 1; 1000 x
//   4096 (L3-sized) either way, 2 ahead in 4 runs of 6. A build with 4 ran GPT-2 at half speed.
// So the count is chosen at run time (isa.h, active_streams(): 1 on AMD, 2 elsewhere,
// FUSEDOPT_CPU_STREAMS overrides) and carried in the call; results/stream-count-*.txt hold
// both machines' profiles.
constexpr int64_t kBlock = 16;  // elements per turn: one 64-byte line of fp32

template <int STREAMS, class Body>
__attribute__((always_inline)) inline void for_each_index_in(int64_t begin, int64_t end,
                                                             Body& body) {
  const int64_t per = (end - begin) / STREAMS / kBlock * kBlock;
  for (int64_t b = 0; b < per; b += kBlock) {
    for (int s = 0; s < STREAMS; ++s) {
      const int64_t base = begin + s * per + b;
#pragma GCC ivdep
      for (int64_t j = 0; j < kBlock; ++j) body(base + j);
    }
  }
#pragma GCC ivdep
  for (int64_t i = begin + STREAMS * per; i < end; ++i) body(i);
}

// Calls body(i) for every i in [begin, end), in the order above with `streams` (1 or 2)
// sub-ranges. Every index is visited exactly once, so the result does not depend on the order.
template <class Body>
__attribute__((always_inline)) inline void for_each_index(int64_t begin, int64_t end, int streams,
                                                          Body&& body) {
  if (streams == 1) {
    for_each_index_in<1>(begin, end, body);
  } else {
    for_each_index_in<2>(begin, end, body);
  }
}

// ---- 16-bit storage through the hardware conversions -----------------------------------------
// The portable conversions made the fp16 AdamW step 3.5x slower than torch's fused one on
// GPT-2 shapes, and bf16's rounding made its step ~25% slower than fp16's once fp16 converted in
// hardware. Where the ISA has the instructions (kBlocksOf: F16C for fp16, AVX512_BF16 for bf16),
// 16-bit kernels convert whole blocks of kBlock elements (convert_blocks.h) into float arrays,
// update those with the fp32 code, and convert back; the tail (< kBlock elements) goes through
// storage.h's conversions.
#include "convert_blocks.h"

// x[j] = x[j] / d, exactly rounded like the division, for one block. The 16-bit kernels are
// compute-bound here and a vector division is the slowest instruction they issue (an Adam step
// already divides twice per element), so the quotient comes from the reciprocal y = 1/d instead:
// q0 = x*y, r = x - q0*d (exact, by one FMA), q = q0 + r*y (one FMA). By Markstein's theorem
// (y correctly rounded, q0 within an ulp) q is the correctly rounded x/d, as long as nothing
// under- or overflows: blocks with an element outside [2^-100, 2^100] or a quotient estimate
// outside it (zeros, huge or tiny values, inf, NaN, d = 0 or inf) are divided for real.
// tests/native/reciprocal_division.cpp checks the identity bit for bit on all 2^23 significands
// of x per divisor (1000 divisors when written: no mismatch); test_grad_scale_division_exact
// checks these kernels against torch's division.
// With the clip folded into the step (grad_scale = 1 / clip coefficient), 33.5M params on the
// 2-core Xeon VM, builds alternated: fp16 AdamW 18.3-19.1 -> 15.0-15.6 ms, bf16 19.2-19.4 ->
// 17.3-17.4 ms (the step without a grad scale: 13-15 ms). The fp32 kernels keep the division:
// they wait on memory, not on it.
#if FUSEDOPT_F16C_WIDTH == 16
constexpr int64_t kDivideLanes = 16;
// x[0..16) = x[0..16) / d, given y = 1/d (see divide_block).
__attribute__((always_inline)) inline void divide_lanes(float* x, float d, float y) {
  const __m512 a = _mm512_loadu_ps(x), dv = _mm512_set1_ps(d), yv = _mm512_set1_ps(y);
  const __m512 lo = _mm512_set1_ps(0x1p-100f), hi = _mm512_set1_ps(0x1p100f);
  const __m512 q0 = _mm512_mul_ps(a, yv);
  const __m512 abs_a = _mm512_abs_ps(a), abs_q0 = _mm512_abs_ps(q0);
  __mmask16 ok = _mm512_cmp_ps_mask(abs_a, lo, _CMP_GE_OQ);  // ordered: NaN is not ok
  ok = _mm512_mask_cmp_ps_mask(ok, abs_a, hi, _CMP_LE_OQ);
  ok = _mm512_mask_cmp_ps_mask(ok, abs_q0, lo, _CMP_GE_OQ);
  ok = _mm512_mask_cmp_ps_mask(ok, abs_q0, hi, _CMP_LE_OQ);
  _mm512_storeu_ps(x, __builtin_expect(ok == 0xffff, 1)
                          ? _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, dv, a), yv, q0)
                          : _mm512_div_ps(a, dv));
}
#elif FUSEDOPT_F16C_WIDTH == 8
constexpr int64_t kDivideLanes = 8;
__attribute__((always_inline)) inline void divide_lanes(float* x, float d, float y) {
  const __m256 a = _mm256_loadu_ps(x), dv = _mm256_set1_ps(d), yv = _mm256_set1_ps(y);
  const __m256 lo = _mm256_set1_ps(0x1p-100f), hi = _mm256_set1_ps(0x1p100f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 q0 = _mm256_mul_ps(a, yv);
  const __m256 abs_a = _mm256_andnot_ps(sign, a), abs_q0 = _mm256_andnot_ps(sign, q0);
  const __m256 ok = _mm256_and_ps(  // ordered compares: NaN is not ok
      _mm256_and_ps(_mm256_cmp_ps(abs_a, lo, _CMP_GE_OQ), _mm256_cmp_ps(abs_a, hi, _CMP_LE_OQ)),
      _mm256_and_ps(_mm256_cmp_ps(abs_q0, lo, _CMP_GE_OQ), _mm256_cmp_ps(abs_q0, hi, _CMP_LE_OQ)));
  _mm256_storeu_ps(x, __builtin_expect(_mm256_movemask_ps(ok) == 0xff, 1)
                          ? _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, dv, a), yv, q0)
                          : _mm256_div_ps(a, dv));
}
#else  // the scalar variant (which has no block paths)
constexpr int64_t kDivideLanes = 1;
inline void divide_lanes(float* x, float d, float) { *x = *x / d; }
#endif

// A divisor with its correctly rounded reciprocal, made once per kernel call, not per block.
struct Divisor {
  float d, y;
  explicit Divisor(float divisor) : d(divisor), y(1.0f / divisor) {}
};

template <int64_t N>
__attribute__((always_inline)) inline void divide_block(float (&x)[N], const Divisor& by) {
  static_assert(N % kDivideLanes == 0, "a block is whole vectors");
  for (int64_t j = 0; j < N; j += kDivideLanes) divide_lanes(x + j, by.d, by.y);
}

// For kBlocksOf<S>: runs update_block(w, g) over the whole blocks of [begin, end), where g
// holds the float values of a block of the read-only `grad` (divided by grad_scale if SCALED,
// then multiplied by post if POST: a grad scale beyond float's range, rules::grad_divisor) and
// w[0..4) those of up to four arrays written back (`written`; null entries are neither read
// nor written), all in storage type S. Returns the first index not done (the tail, for the
// caller's generic loop).
// (Blocks of 32 for the 16-bit paths, tried on the AMD EPYC VM to give the out-of-order core two
// independent division chains per turn, made the bf16 AdamW step on GPT-2 shapes slower: 1.23-1.29x
// torch's fused step against 1.31-1.41x with 16, builds alternated, three runs each.)
using Block = float[kBlock];
template <class S, bool SCALED, bool POST, class UpdateBlock>
__attribute__((always_inline)) inline int64_t for_each_block16(
    int64_t begin, int64_t end, const uint16_t* grad, const Divisor& grad_scale, float post,
    uint16_t* const (&written)[4], UpdateBlock&& update_block) {
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    Block g, w[4];
    block_to_float<S, kBlock>(grad + i, g);
    if constexpr (SCALED) divide_block(g, grad_scale);
    if constexpr (POST) {
      for (int64_t j = 0; j < kBlock; ++j) g[j] *= post;
    }
    // Unrolled, so that the null entries (known after inlining) drop out and the blocks stay
    // in registers instead of going through the stack.
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      if (written[k] != nullptr) block_to_float<S, kBlock>(written[k] + i, w[k]);
    }
    update_block(w, g);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      if (written[k] != nullptr) float_to_block<S, kBlock>(w[k], written[k] + i);
    }
  }
  return i;
}

template <class S, rules::WeightDecay WD, bool AMSGRAD, bool MAXIMIZE, bool SCALED>
void adam_kernel_impl(const AdamItem& item, const AdamCall& call, int64_t begin, int64_t end) {
  using T = typename S::math;
  using R = typename S::raw;
  const rules::AdamScalars<T> s = rules::cast_scalars<T>(item.scalars);
  const rules::GradDivisor<T> scale = rules::grad_divisor<T>(call.grad_scale);
  const T grad_scale = scale.divisor, grad_post = scale.post;
  R* __restrict param = static_cast<R*>(item.param);
  const R* __restrict grad = static_cast<const R*>(item.grad);
  R* __restrict exp_avg = static_cast<R*>(item.exp_avg);
  R* __restrict exp_avg_sq = static_cast<R*>(item.exp_avg_sq);
  R* __restrict max_exp_avg_sq = static_cast<R*>(item.max_exp_avg_sq);
  int64_t first = begin;
  if constexpr (kBlocksOf<S>) {
    uint16_t* const written[4] = {param, exp_avg, exp_avg_sq, AMSGRAD ? max_exp_avg_sq : nullptr};
    const Divisor bias_correction2(s.bias_correction2_sqrt);
    // The update in two halves around one division of the block's sqrt(v_hat) by the
    // tensor's bias_correction2_sqrt (divide_block: exact, without the division unit, which
    // bounds these steps). g is divided by grad_scale already.
    auto update = [&](Block (&w)[4], const Block& g) {
      Block root;
#pragma GCC ivdep
      for (int64_t j = 0; j < kBlock; ++j) {
        root[j] = rules::adam_moments(w[0][j], rules::prepare_grad(g[j], false, 1.0f, MAXIMIZE),
                                      w[1][j], w[2][j], w[3][j], s, WD, AMSGRAD);
      }
      divide_block(root, bias_correction2);
#pragma GCC ivdep
      for (int64_t j = 0; j < kBlock; ++j) rules::adam_finish(w[0][j], w[1][j], root[j], s, WD);
    };
    // The extra factor only in its own instantiation: a branch in the block loop cost the
    // bf16 AdamW step with a folded clip ~5% (53.0 -> 56.0 ms, GPT-2 shapes, 2-core EPYC VM).
    first = (SCALED && grad_post != 1.0f)
                ? for_each_block16<S, SCALED, true>(begin, end, grad, Divisor(grad_scale),
                                                    grad_post, written, update)
                : for_each_block16<S, SCALED, false>(begin, end, grad, Divisor(grad_scale),
                                                     grad_post, written, update);
  }
  for_each_index(first, end, call.streams, [&](int64_t i) __attribute__((always_inline)) {
    T p = S::load(param[i]);
    T m = S::load(exp_avg[i]);
    T v = S::load(exp_avg_sq[i]);
    T vmax = AMSGRAD ? S::load(max_exp_avg_sq[i]) : T(0);
    const T g = rules::prepare_grad(S::load(grad[i]), SCALED, grad_scale, MAXIMIZE, grad_post);
    rules::adam_update(p, g, m, v, vmax, s, WD, AMSGRAD);
    param[i] = S::store(p);
    exp_avg[i] = S::store(m);
    exp_avg_sq[i] = S::store(v);
    if (AMSGRAD) max_exp_avg_sq[i] = S::store(vmax);
  });
}

template <class S, bool L2, rules::Momentum MOM, bool NESTEROV, bool MAXIMIZE, bool SCALED>
void sgd_kernel_impl(const SgdItem& item, const SgdCall& call, int64_t begin, int64_t end) {
  using T = typename S::math;
  using R = typename S::raw;
  const rules::SgdScalars<T> s = rules::cast_scalars<T>(call.scalars);
  const rules::GradDivisor<T> scale = rules::grad_divisor<T>(call.grad_scale);
  const T grad_scale = scale.divisor, grad_post = scale.post;
  R* __restrict param = static_cast<R*>(item.param);
  const R* __restrict grad = static_cast<const R*>(item.grad);
  R* __restrict buffer = static_cast<R*>(item.momentum_buffer);
  int64_t first = begin;
  if constexpr (kBlocksOf<S>) {
    uint16_t* const written[4] = {param, MOM == rules::Momentum::kNone ? nullptr : buffer,
                                  nullptr, nullptr};
    auto update = [&](Block (&w)[4], const Block& g) {
#pragma GCC ivdep
      for (int64_t j = 0; j < kBlock; ++j) {
        // The first step overwrites the buffer without using it (it may hold garbage).
        T b = (MOM == rules::Momentum::kRun) ? w[1][j] : T(0);
        // (g is divided by grad_scale already)
        rules::sgd_update(w[0][j], rules::prepare_grad(g[j], false, 1.0f, MAXIMIZE), b, s, L2,
                          MOM, NESTEROV);
        w[1][j] = b;
      }
    };
    first = (SCALED && grad_post != 1.0f)
                ? for_each_block16<S, SCALED, true>(begin, end, grad, Divisor(grad_scale),
                                                    grad_post, written, update)
                : for_each_block16<S, SCALED, false>(begin, end, grad, Divisor(grad_scale),
                                                     grad_post, written, update);
  }
  for_each_index(first, end, call.streams, [&](int64_t i) __attribute__((always_inline)) {
    T p = S::load(param[i]);
    // The first step overwrites the buffer without reading it (it may hold garbage).
    T buf = (MOM == rules::Momentum::kRun) ? S::load(buffer[i]) : T(0);
    const T g = rules::prepare_grad(S::load(grad[i]), SCALED, grad_scale, MAXIMIZE, grad_post);
    rules::sgd_update(p, g, buf, s, L2, MOM, NESTEROV);
    param[i] = S::store(p);
    if (MOM != rules::Momentum::kNone) buffer[i] = S::store(buf);
  });
}

// ---- tables: turn runtime flags into template arguments, one level at a time ----------------

template <bool B>
using Bool = std::integral_constant<bool, B>;

template <class F>
auto dispatch_bool(bool b, F&& f) {
  return b ? f(Bool<true>{}) : f(Bool<false>{});
}

template <class F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(Fp32{});
    case DType::kDouble: return f(Fp64{});
    case DType::kBFloat16: return f(Bf16{});
    case DType::kHalf: return f(Fp16{});
  }
  return f(Fp32{});
}

template <class F>
auto dispatch_weight_decay(rules::WeightDecay wd, F&& f) {
  using WD = rules::WeightDecay;
  switch (wd) {
    case WD::kL2: return f(std::integral_constant<WD, WD::kL2>{});
    case WD::kDecoupled: return f(std::integral_constant<WD, WD::kDecoupled>{});
    default: return f(std::integral_constant<WD, WD::kNone>{});
  }
}

template <class F>
auto dispatch_momentum(rules::Momentum mom, F&& f) {
  using M = rules::Momentum;
  switch (mom) {
    case M::kFirst: return f(std::integral_constant<M, M::kFirst>{});
    case M::kRun: return f(std::integral_constant<M, M::kRun>{});
    default: return f(std::integral_constant<M, M::kNone>{});
  }
}

AdamKernel adam_kernel(DType dtype, const AdamVariant& v) {
  return dispatch_dtype(dtype, [&](auto s) {
    return dispatch_weight_decay(v.weight_decay, [&](auto wd) {
      return dispatch_bool(v.amsgrad, [&](auto ams) {
        return dispatch_bool(v.maximize, [&](auto maximize) {
          return dispatch_bool(v.has_grad_scale, [&](auto scaled) {
            return static_cast<AdamKernel>(
                &adam_kernel_impl<decltype(s), decltype(wd)::value, decltype(ams)::value,
                                  decltype(maximize)::value, decltype(scaled)::value>);
          });
        });
      });
    });
  });
}

SgdKernel sgd_kernel(DType dtype, const SgdVariant& v) {
  return dispatch_dtype(dtype, [&](auto s) {
    return dispatch_bool(v.l2, [&](auto l2) {
      return dispatch_momentum(v.momentum, [&](auto mom) {
        // Nesterov only matters with momentum (torch ignores it otherwise).
        return dispatch_bool(v.nesterov && v.momentum != rules::Momentum::kNone, [&](auto nes) {
          return dispatch_bool(v.maximize, [&](auto maximize) {
            return dispatch_bool(v.has_grad_scale, [&](auto scaled) {
              return static_cast<SgdKernel>(
                  &sgd_kernel_impl<decltype(s), decltype(l2)::value, decltype(mom)::value,
                                   decltype(nes)::value, decltype(maximize)::value,
                                   decltype(scaled)::value>);
            });
          });
        });
      });
    });
  });
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
