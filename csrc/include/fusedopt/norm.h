// The math of the global gradient norm, written once for the CPU and CUDA kernels.
//
// The p-norm of a list of tensors seen as one vector x (torch.nn.utils.get_total_norm):
//
//   p = 2        sqrt(sum x_i^2)
//   p = 1        sum |x_i|
//   p = inf      max |x_i|
//   p = -inf     min |x_i|
//   p = 0        number of tensors with an element != 0 (torch takes the norm of the
//                per-tensor norms; for p = 0 that counts tensors, not elements)
//   other p      (sum |x_i|^p)^(1/p)
//
// A kernel reduces with these steps: term() maps one element to its contribution, combine()
// adds it to an accumulator (sum, or a max/min compare-select that skips NaN: kernels count
// NaNs on the side), merge() merges partial results (NaN-propagating, as torch), and finish()
// turns the total into the norm. Partial results of fp16/bf16/fp32 data are accumulated in
// float over short runs and in double across runs; fp64 data in double throughout.
// clamp() is the element operation of the clamp_ op (clip_grad_value_).
#pragma once

#include <cstdint>
#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <cmath>
#include <limits>
#endif

#include "fusedopt/rules.h"  // FUSEDOPT_HD

namespace fusedopt {
namespace norm {

enum class Kind : int32_t { kL2 = 0, kL1 = 1, kInf = 2, kNegInf = 3, kL0 = 4, kLp = 5 };

// The kernel variant of a norm order.
inline Kind kind_of(double p) {
  if (p == 2.0) return Kind::kL2;
  if (p == 1.0) return Kind::kL1;
  if (p == 0.0) return Kind::kL0;
  if (p > 0.0 && p * 0.5 == p) return Kind::kInf;   // +inf
  if (p < 0.0 && p * 0.5 == p) return Kind::kNegInf;  // -inf
  return Kind::kLp;
}

// Neutral element of combine(): 0 for sums, 0 for max |x|, +inf for min |x|.
template <typename T>
FUSEDOPT_HD T identity(Kind k) {
  return k == Kind::kNegInf ? T(1) / T(0) : T(0);
}

// A quiet NaN (0 / 0 gives the default one; no <limits> in device code).
template <typename T>
FUSEDOPT_HD T quiet_nan() {
  return T(0) / T(0);
}

template <typename T>
FUSEDOPT_HD T pow_(T x, T y) {
#if defined(__CUDA_ARCH__)
  return ::pow(x, y);
#else
  return std::pow(x, y);
#endif
}

template <typename T>
FUSEDOPT_HD T abs_(T x) {
  return x < T(0) ? -x : x;  // NaN stays NaN
}

// Contribution of one element (p is only used by kLp).
template <Kind K, typename T>
FUSEDOPT_HD T term(T x, T p) {
  if (K == Kind::kL2) return x * x;
  if (K == Kind::kL0) return x != T(0) ? T(1) : T(0);  // per element; NaN counts, as in torch
  if (K == Kind::kLp) return pow_(abs_(x), p);
  return abs_(x);  // kL1, kInf, kNegInf
}

// Merges two partial results. For max/min this is a plain compare-select that skips a NaN
// `v` (so that loops vectorise): kernels must track NaNs separately, since a NaN anywhere makes
// torch's inf-norm NaN. Sums propagate NaN by themselves.
template <Kind K, typename T>
FUSEDOPT_HD T combine(T acc, T v) {
  if (K == Kind::kInf) return v > acc ? v : acc;
  if (K == Kind::kNegInf) return v < acc ? v : acc;
  return acc + v;
}

// acc merged with the contribution of x: combine(acc, term(x)), with one FMA for the 2-norm's
// sum of squares (the kernels are built without automatic contraction: see rules.h).
template <Kind K, typename T>
FUSEDOPT_HD T accumulate(T acc, T x, T p) {
  if (K == Kind::kL2) return rules::fma_(x, x, acc);
  return combine<K>(acc, term<K>(x, p));
}

// Merges two partial results of a kernel's reduction (chunk partials, per-thread or per-block
// results): like combine(), except that a NaN on either side makes a max/min NaN, as a NaN
// anywhere makes torch's inf-norm NaN. Sums propagate NaN by themselves. For kL0 the partials
// are counts and add up.
template <typename T>
FUSEDOPT_HD T merge(Kind k, T a, T b) {
  if (k == Kind::kInf || k == Kind::kNegInf) {
    if (a != a) return a;
    if (b != b) return b;
    return k == Kind::kInf ? combine<Kind::kInf>(a, b) : combine<Kind::kNegInf>(a, b);
  }
  return a + b;
}

// The norm from the combined total.
template <typename T>
FUSEDOPT_HD T finish(Kind k, T total, T p) {
  if (k == Kind::kL2) return rules::sqrt_(total);
  if (k == Kind::kLp) return pow_(total, T(1) / p);
  return total;
}

// clip_grad_value_'s clamp of one element (clamp_ op): NaN compares false and stays NaN.
template <typename T>
FUSEDOPT_HD T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace norm
}  // namespace fusedopt
