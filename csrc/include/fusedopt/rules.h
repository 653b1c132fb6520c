// fusedopt update rules: the math of SGD and Adam/AdamW, written once.
//
// Every backend (the CPU kernels in csrc/cpu, the CUDA kernels in csrc/cuda) applies these
// functions element by element. They work on scalars of a "math type" T (float or double):
// bf16/fp16 storage is loaded into float, updated here, and rounded once on store.
//
// Semantics follow torch.optim's single-tensor (foreach=False) path:
//   torch/optim/adam.py::_single_tensor_adam, torch/optim/sgd.py::_single_tensor_sgd.
// The per-tensor scalars (bias corrections, step size, decay factor) are computed in double,
// as torch does with Python floats, by the make_*_scalars() helpers below, and only then
// converted to T. Each element update does the roundings torch's CPU ops do, in their order:
// an FMA (fma_) exactly where ATen's vectorised kernel of that op has one (add with alpha, lerp,
// addcmul) and separate operations elsewhere (addcdiv, mul, sqrt, div; checked against torch
// 2.14's ops element by element). The CPU kernels are
// built with -ffp-contract=off so that the compiler fuses nothing else: fp32/fp64 steps then
// equal torch.optim's for-loop (foreach=False) bit for bit except at the few elements ATen
// itself computes with its scalar code (the tail of each chunk of its TensorIterator loops).
//
// Flags (amsgrad, nesterov, ...) are ordinary bool/enum arguments: the launchers pass
// compile-time constants, so after inlining the untaken branches disappear.
#pragma once

#include <cstdint>
#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <cmath>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline matters on the CPU: the kernels are compiled once per ISA (AVX-512, AVX2,
// baseline); a rule inlined into an ISA-specific loop is vectorised with that ISA, and no
// out-of-line copy (compiled for one ISA, shared by all through the linker) is ever called.
#define FUSEDOPT_HD inline __attribute__((always_inline))
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {
namespace rules {

template <typename T>
FUSEDOPT_HD T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c rounded once (an FMA instruction where the ISA has one).
template <typename T>
FUSEDOPT_HD T fma_(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

template <typename T>
FUSEDOPT_HD T max_(T a, T b) {
  // torch.maximum propagates NaN; so does this (a NaN in either operand wins).
  return (a != a) ? a : ((b != b) ? b : (a < b ? b : a));
}

// How weight decay enters the update.
enum class WeightDecay : int {
  kNone = 0,       // weight_decay == 0: no term at all (not "+ 0*p", which would turn inf into NaN)
  kL2 = 1,         // Adam / SGD: g = g + wd * p
  kDecoupled = 2,  // AdamW:      p = p * (1 - lr * wd) before the update
};

FUSEDOPT_HD WeightDecay weight_decay_mode(double weight_decay, bool decoupled) {
  return weight_decay == 0.0 ? WeightDecay::kNone
                             : (decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2);
}

// ----------------------------------------------------------------------------------------------
// Gradient preprocessing shared by all algorithms.
//   g = grad / grad_scale   (only when a grad scale is given; the stored grad is never written)
//   g = -g                  (maximize)
// A grad scale beyond the range of the math type T (a float64 grad_scale of a float32 step:
// GradScaler's scale near its float32 ceiling divided by a clip coefficient, see
// fusedopt/clip/_step.py) would round to inf and zero every gradient; it is divided as
// (grad / (grad_scale * 2^-64)) * 2^-64 instead: the same quotient, the second factor being an
// exact power of two. grad_divisor gives {divisor, post}; within range post is 1 (x * 1 == x).
// ----------------------------------------------------------------------------------------------
template <typename T>
struct GradDivisor {
  T divisor;
  T post;
};

template <typename T>
FUSEDOPT_HD GradDivisor<T> grad_divisor(double grad_scale) {
  constexpr double kFloatMax = 3.4028234663852886e38;  // FLT_MAX
  constexpr double kTwoToMinus64 = 5.421010862427522e-20;
  if (sizeof(T) < sizeof(double) && (grad_scale > kFloatMax || grad_scale < -kFloatMax)) {
    return {static_cast<T>(grad_scale * kTwoToMinus64), static_cast<T>(kTwoToMinus64)};
  }
  return {static_cast<T>(grad_scale), T(1)};
}

template <typename T>
FUSEDOPT_HD T prepare_grad(T grad, bool has_grad_scale, T grad_scale, bool maximize,
                           T post = T(1)) {
  T g = has_grad_scale ? grad / grad_scale * post : grad;
  return maximize ? -g : g;
}

// ----------------------------------------------------------------------------------------------
// Adam / AdamW
// ----------------------------------------------------------------------------------------------

// Scalars of one Adam step of one tensor (step t = the step count AFTER the increment).
template <typename T>
struct AdamScalars {
  T lerp_weight;      // 1 - beta1: exp_avg.lerp_(g, 1 - beta1)
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;     // L2 coefficient (kL2)
  T decay_factor;     // 1 - lr * weight_decay (kDecoupled)
  T step_size;        // lr / (1 - beta1^t)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

// Computed in double like torch's Python-float arithmetic; convert with cast_scalars<T>().
FUSEDOPT_HD AdamScalars<double> make_adam_scalars(double lr, double beta1, double beta2,
                                                  double eps, double weight_decay, double step) {
  AdamScalars<double> s;
  s.lerp_weight = 1.0 - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0 - beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.decay_factor = 1.0 - lr * weight_decay;
  const double bias_correction1 = 1.0 - pow(beta1, step);
  const double bias_correction2 = 1.0 - pow(beta2, step);
  s.step_size = lr / bias_correction1;
  s.bias_correction2_sqrt = sqrt_(bias_correction2);
  return s;
}

template <typename T>
FUSEDOPT_HD AdamScalars<T> cast_scalars(const AdamScalars<double>& d) {
  AdamScalars<T> s;
  s.lerp_weight = static_cast<T>(d.lerp_weight);
  s.beta2 = static_cast<T>(d.beta2);
  s.one_minus_beta2 = static_cast<T>(d.one_minus_beta2);
  s.eps = static_cast<T>(d.eps);
  s.weight_decay = static_cast<T>(d.weight_decay);
  s.decay_factor = static_cast<T>(d.decay_factor);
  s.step_size = static_cast<T>(d.step_size);
  s.bias_correction2_sqrt = static_cast<T>(d.bias_correction2_sqrt);
  return s;
}

// torch's lerp, as ATen's vectorised kernel computes it: one FMA, from the end nearer the
// weight, so that weight 0 and 1 are exact.
template <typename T>
FUSEDOPT_HD T lerp_(T from, T to, T weight) {
  const T diff = to - from;
  return (weight < T(0.5)) ? fma_(weight, diff, from) : fma_(weight - T(1), diff, to);
}

// One Adam/AdamW element update, in two halves (adam_update below is the whole of it; the CPU
// 16-bit kernels call the halves themselves, to divide a block of sqrt(v_hat) at once):
//
// adam_moments: the moments, from the prepared gradient g (prepare_grad) plus the L2 term of
// the param p. Updates exp_avg, exp_avg_sq (and max_exp_avg_sq when amsgrad) in place and
// returns sqrt(v_hat).
template <typename T>
FUSEDOPT_HD T adam_moments(T p, T g, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                           const AdamScalars<T>& s, WeightDecay wd, bool amsgrad) {
  if (wd == WeightDecay::kL2) g = fma_(p, s.weight_decay, g);  // grad.add(param, alpha=wd)
  exp_avg = lerp_(exp_avg, g, s.lerp_weight);
  // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2): ATen's addcmul is fma(c * g, g, v)
  exp_avg_sq = fma_(s.one_minus_beta2 * g, g, exp_avg_sq * s.beta2);
  T v_hat = exp_avg_sq;
  if (amsgrad) {
    v_hat = max_(max_exp_avg_sq, exp_avg_sq);
    max_exp_avg_sq = v_hat;
  }
  return sqrt_(v_hat);
}

// adam_finish: the param update, with decoupled weight decay, from the new exp_avg m and the
// quotient sqrt(v_hat) / bias_correction2_sqrt:
//   param = param * decay_factor - step_size * m / (corrected_root + eps)
template <typename T>
FUSEDOPT_HD void adam_finish(T& param, T m, T corrected_root, const AdamScalars<T>& s,
                             WeightDecay wd) {
  T p = param;
  if (wd == WeightDecay::kDecoupled) p = p * s.decay_factor;
  const T denom = corrected_root + s.eps;
  // param.addcdiv_(m, denom, value=-step_size): ATen's addcdiv is p + (value * m) / denom
  param = p + ((-s.step_size) * m) / denom;
}

template <typename T>
FUSEDOPT_HD void adam_update(T& param, T g, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                             const AdamScalars<T>& s, WeightDecay wd, bool amsgrad) {
  const T root = adam_moments(param, g, exp_avg, exp_avg_sq, max_exp_avg_sq, s, wd, amsgrad);
  adam_finish(param, exp_avg, root / s.bias_correction2_sqrt, s, wd);
}

// ----------------------------------------------------------------------------------------------
// SGD (with momentum, dampening, Nesterov)
// ----------------------------------------------------------------------------------------------

template <typename T>
struct SgdScalars {
  T lr;
  T momentum;
  T one_minus_dampening;  // 1 - dampening
  T weight_decay;
};

FUSEDOPT_HD SgdScalars<double> make_sgd_scalars(double lr, double momentum, double dampening,
                                                double weight_decay) {
  SgdScalars<double> s;
  s.lr = lr;
  s.momentum = momentum;
  s.one_minus_dampening = 1.0 - dampening;
  s.weight_decay = weight_decay;
  return s;
}

template <typename T>
FUSEDOPT_HD SgdScalars<T> cast_scalars(const SgdScalars<double>& d) {
  SgdScalars<T> s;
  s.lr = static_cast<T>(d.lr);
  s.momentum = static_cast<T>(d.momentum);
  s.one_minus_dampening = static_cast<T>(d.one_minus_dampening);
  s.weight_decay = static_cast<T>(d.weight_decay);
  return s;
}

// How the momentum buffer is used in this step.
enum class Momentum : int {
  kNone = 0,   // momentum == 0: no buffer at all
  kFirst = 1,  // first step: buf = g (torch clones the grad; dampening is not applied)
  kRun = 2,    // buf = momentum * buf + (1 - dampening) * g
};

FUSEDOPT_HD Momentum momentum_mode(double momentum, bool is_first_step) {
  return momentum == 0.0 ? Momentum::kNone : (is_first_step ? Momentum::kFirst : Momentum::kRun);
}

// One SGD element update. g is the prepared gradient (prepare_grad).
// momentum_buffer is read/written only when mom != kNone (and only written when kFirst).
// l2 is true when weight_decay != 0 (SGD decay is always the L2 kind).
template <typename T>
FUSEDOPT_HD void sgd_update(T& param, T g, T& momentum_buffer, const SgdScalars<T>& s,
                            bool l2, Momentum mom, bool nesterov) {
  // torch's ops, each an add with alpha (one FMA in ATen's vectorised kernel) after a mul:
  //   g = g.add(p, alpha=wd); buf.mul_(momentum).add_(g, alpha=1 - dampening);
  //   g = g.add(buf, alpha=momentum) (Nesterov) or buf; p.add_(g, alpha=-lr)
  const T p = param;
  if (l2) {
    g = fma_(p, s.weight_decay, g);
  }
  if (mom != Momentum::kNone) {
    const T buf = (mom == Momentum::kFirst)
                      ? g
                      : fma_(g, s.one_minus_dampening, momentum_buffer * s.momentum);
    momentum_buffer = buf;
    g = nesterov ? fma_(buf, s.momentum, g) : buf;
  }
  param = fma_(g, -s.lr, p);
}

}  // namespace rules
}  // namespace fusedopt
