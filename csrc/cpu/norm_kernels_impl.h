// Bodies of the clipping kernels (norm_kernels.h), compiled once per ISA.
//
// Included by norm_kernels_<isa>.cpp after it has set FUSEDOPT_ISA_NS and switched the code
// generation target. Plain loops over raw pointers that GCC auto-vectorises with the ISA's
// widest vectors; storage.h's conversions are always_inline and vectorise with them.
// No include guard on purpose: do not include this file anywhere else.

#ifndef FUSEDOPT_ISA_NS
#error "norm_kernels_impl.h is included only by norm_kernels_<isa>.cpp"
#endif

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {
namespace {

constexpr int64_t kRunElems = 1024;  // elements reduced in float before going to double
constexpr int kLanes = 16;           // independent accumulators (SIMD lanes)
using norm::Kind;

// The reduction of one chunk of n elements starting at x, as a double partial result.
// The loops have trip counts computed up front (so that they vectorise even under -fwrapv,
// which Python's build flags add). max/min lanes skip NaN (a plain compare-select, which
// vectorises); NaNs are counted in lanes of their own and make the result NaN at the end.
template <class S, Kind K>
double chunk_norm(const void* data, int64_t n, double p_double) {
  using T = typename S::math;
  using R = typename S::raw;
  constexpr bool kMaxMin = K == Kind::kInf || K == Kind::kNegInf;
  const R* __restrict x = static_cast<const R*>(data);
  const T p = static_cast<T>(p_double);
  double total = norm::identity<double>(K);
  bool nan_seen = false;
  for (int64_t begin = 0; begin < n; begin += kRunElems) {
    const int64_t len = std::min(kRunElems, n - begin);
    const int64_t blocks = len / kLanes;
    const R* __restrict run = x + begin;
    T acc[kLanes];
    T nans[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      acc[j] = norm::identity<T>(K);
      nans[j] = T(0);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const R* __restrict v = run + b * kLanes;
      for (int j = 0; j < kLanes; ++j) {
        const T e = S::load(v[j]);
        acc[j] = norm::combine<K>(acc[j], norm::term<K>(e, p));
        if (kMaxMin) nans[j] += e != e ? T(1) : T(0);
      }
    }
    for (int64_t i = blocks * kLanes; i < len; ++i) {
      const T e = S::load(run[i]);
      acc[0] = norm::combine<K>(acc[0], norm::term<K>(e, p));
      if (kMaxMin) nans[0] += e != e ? T(1) : T(0);
    }
    for (int j = 0; j < kLanes; ++j) {
      total = norm::combine<K>(total, static_cast<double>(acc[j]));
      nan_seen = nan_seen || nans[j] != T(0);
    }
  }
  return nan_seen ? std::numeric_limits<double>::quiet_NaN() : total;
}

template <class S>
void chunk_scale(void* data, int64_t n, double scale) {
  using T = typename S::math;
  using R = typename S::raw;
  R* __restrict x = static_cast<R*>(data);
  const T s = static_cast<T>(scale);  // as torch: the multiplier in the math type
  for (int64_t i = 0; i < n; ++i) x[i] = S::store(S::load(x[i]) * s);
}

template <class S>
void chunk_clamp(void* data, int64_t n, double lo_double, double hi_double) {
  using T = typename S::math;
  using R = typename S::raw;
  R* __restrict x = static_cast<R*>(data);
  const T lo = static_cast<T>(lo_double), hi = static_cast<T>(hi_double);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = S::store(norm::clamp(S::load(x[i]), lo, hi));  // NaN stays NaN
  }
}

template <class S>
NormChunkFn norm_kernel_for(Kind k) {
  switch (k) {
    case Kind::kL2: return &chunk_norm<S, Kind::kL2>;
    case Kind::kL1: return &chunk_norm<S, Kind::kL1>;
    case Kind::kInf: return &chunk_norm<S, Kind::kInf>;
    case Kind::kNegInf: return &chunk_norm<S, Kind::kNegInf>;
    case Kind::kL0: return &chunk_norm<S, Kind::kL0>;
    case Kind::kLp: return &chunk_norm<S, Kind::kLp>;
  }
  return nullptr;
}

template <class F>
auto dispatch_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kDouble: return f(Fp64{});
    case DType::kBFloat16: return f(Bf16{});
    case DType::kHalf: return f(Fp16{});
    default: return f(Fp32{});
  }
}

}  // namespace

bool norm_compiled() { return true; }

NormChunkFn norm_chunk_kernel(DType dtype, Kind kind) {
  return dispatch_storage(dtype, [&](auto s) { return norm_kernel_for<decltype(s)>(kind); });
}

ScaleChunkFn scale_chunk_kernel(DType dtype) {
  return dispatch_storage(dtype, [](auto s) { return static_cast<ScaleChunkFn>(&chunk_scale<decltype(s)>); });
}

ClampChunkFn clamp_chunk_kernel(DType dtype) {
  return dispatch_storage(dtype, [](auto s) { return static_cast<ClampChunkFn>(&chunk_clamp<decltype(s)>); });
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
