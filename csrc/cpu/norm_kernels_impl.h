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

constexpr int64_t kRunElems = 1024;  // elements of one stream reduced in float before going to double
constexpr int kLanes = 16;           // independent accumulators per stream (SIMD lanes)
// A chunk is walked as kStreams equal sub-ranges side by side (one block of kLanes elements of
// each in turn): the hardware prefetcher follows each stream separately, and one stream per core
// keeps too few cache lines in flight. On the 2-core Xeon VM (benchmarks/stream_count.cpp,
// results/stream-count-*.txt) 8 streams read 25-27 GB/s where one reads 14-15, and scale in
// place at 46-51 GB/s where one does 30-32; 16 streams are slower again. (The optimizer kernels
// already read 4 arrays at once; splitting them further did not pay there.)
constexpr int kStreams = 8;
using norm::Kind;

// 16-bit blocks convert with the hardware instructions where the ISA has them (kBlocksOf,
// convert_blocks.h); the portable conversions of storage.h cost ~20 vector operations per fp16
// element pair and made fp16 clipping 3-4x slower than bf16. Every other storage type converts
// element by element, as GCC vectorises that.
#include "convert_blocks.h"

// out[j] = the math-type value of v[j], for the kLanes elements of one block.
template <class S>
__attribute__((always_inline)) inline void load_lanes(const typename S::raw* __restrict v,
                                                      typename S::math (&out)[kLanes]) {
  if constexpr (kBlocksOf<S>) {
    block_to_float<S, kLanes>(v, out);
  } else {
    for (int j = 0; j < kLanes; ++j) out[j] = S::load(v[j]);
  }
}

// v[j] = in[j] in the storage type, for the kLanes elements of one block.
template <class S>
__attribute__((always_inline)) inline void store_lanes(const typename S::math (&in)[kLanes],
                                                       typename S::raw* __restrict v) {
  if constexpr (kBlocksOf<S>) {
    float_to_block<S, kLanes>(in, v);
  } else {
    for (int j = 0; j < kLanes; ++j) v[j] = S::store(in[j]);
  }
}

// Elements of each of the kStreams sub-ranges of an n-element chunk: a multiple of kLanes, so
// that every block is whole; the last n - kStreams * per (< kStreams * kLanes) elements are
// the chunk's tail, done one by one.
inline int64_t stream_elems(int64_t n) { return n / kStreams / kLanes * kLanes; }

// Whether every element of a chunk, scaled in T, is finite: one vectorised pass (x - x is 0
// for a finite x, NaN for inf and NaN), so that a chunk whose sum is inf because an element is
// (a GradScaler overflow step) is not summed again in double for nothing.
template <class S>
bool all_finite(const typename S::raw* x, int64_t n, typename S::math m) {
  using T = typename S::math;
  int bad = 0;  // (an integer OR reduction: it vectorises without reassociating float sums)
  for (int64_t i = 0; i < n; ++i) {
    const T e = S::load(x[i]) * m;
    bad |= (e - e) != T(0);
  }
  return bad == 0;
}

// The sum of one chunk's terms, each taken in double from the element scaled in T (as
// GradScaler's unscale_ would write it): the slow path of chunk_norm when a sum in T overflows.
template <class S, Kind K>
double chunk_norm_in_double(const typename S::raw* x, int64_t n, double p, typename S::math m) {
  double total = norm::identity<double>(K);
  for (int64_t i = 0; i < n; ++i) {
    total = norm::accumulate<K>(total, static_cast<double>(S::load(x[i]) * m), p);
  }
  return total;
}

// The reduction of one chunk of n elements starting at x, as a double partial result.
// The loops have trip counts computed up front (so that they vectorise even under -fwrapv,
// which Python's build flags add). max/min lanes skip NaN (a plain compare-select, which
// vectorises); NaNs are counted in lanes of their own and make the result NaN at the end.
// The order of the additions depends on n only, never on the number of threads.
template <class S, Kind K>
double chunk_norm(const void* data, int64_t n, double p_double, double prescale) {
  using T = typename S::math;
  using R = typename S::raw;
  constexpr bool kMaxMin = K == Kind::kInf || K == Kind::kNegInf;
  const R* __restrict x = static_cast<const R*>(data);
  const T p = static_cast<T>(p_double);
  const T m = static_cast<T>(prescale);  // as GradScaler's unscale_: the multiplier in T
  const int64_t per = stream_elems(n);
  double total = norm::identity<double>(K);
  bool nan_seen = false;
  for (int64_t begin = 0; begin < per; begin += kRunElems) {
    const int64_t blocks = std::min(kRunElems, per - begin) / kLanes;
    T acc[kStreams][kLanes];
    T nans[kStreams][kLanes];
    for (int s = 0; s < kStreams; ++s) {
      for (int j = 0; j < kLanes; ++j) {
        acc[s][j] = norm::identity<T>(K);
        nans[s][j] = T(0);
      }
    }
    for (int64_t b = 0; b < blocks; ++b) {
      for (int s = 0; s < kStreams; ++s) {
        T e[kLanes];
        load_lanes<S>(x + s * per + begin + b * kLanes, e);
        for (int j = 0; j < kLanes; ++j) {
          e[j] *= m;
          acc[s][j] = norm::accumulate<K>(acc[s][j], e[j], p);
          if constexpr (kMaxMin) nans[s][j] += e[j] != e[j] ? T(1) : T(0);
        }
      }
    }
    // The streams fold into stream 0 (in T), then its lanes into the double total.
    for (int s = 1; s < kStreams; ++s) {
      for (int j = 0; j < kLanes; ++j) {
        acc[0][j] = norm::combine<K>(acc[0][j], acc[s][j]);
        if constexpr (kMaxMin) nans[0][j] += nans[s][j];
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      total = norm::combine<K>(total, static_cast<double>(acc[0][j]));
      if constexpr (kMaxMin) nan_seen = nan_seen || nans[0][j] != T(0);
    }
  }
  T tail = norm::identity<T>(K);
  for (int64_t i = kStreams * per; i < n; ++i) {
    const T e = S::load(x[i]) * m;
    tail = norm::accumulate<K>(tail, e, p);
    if constexpr (kMaxMin) nan_seen = nan_seen || e != e;
  }
  total = norm::combine<K>(total, static_cast<double>(tail));
  if constexpr (K == Kind::kL2 || K == Kind::kL1 || K == Kind::kLp) {
    // Sums in T overflow where the norm does not: one element above ~1.8e19 squares to inf in
    // float32. Such a chunk is summed again in double (torch's CPU norm accumulates float32
    // in double throughout); an inf or NaN element keeps its result.
    if (std::isinf(total) && all_finite<S>(x, n, m)) {
      total = chunk_norm_in_double<S, K>(x, n, p_double, m);
    }
  }
  return nan_seen ? std::numeric_limits<double>::quiet_NaN() : total;
}

// x = op(x) over the n elements of a chunk, walked as kStreams sub-ranges side by side.
template <class S, class Op>
inline void chunk_rewrite(void* data, int64_t n, Op op) {
  using T = typename S::math;
  using R = typename S::raw;
  R* __restrict x = static_cast<R*>(data);
  const int64_t per = stream_elems(n);
  const int64_t blocks = per / kLanes;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int s = 0; s < kStreams; ++s) {
      R* __restrict v = x + s * per + b * kLanes;
      T e[kLanes];
      load_lanes<S>(v, e);
      for (int j = 0; j < kLanes; ++j) e[j] = op(e[j]);
      store_lanes<S>(e, v);
    }
  }
  for (int64_t i = kStreams * per; i < n; ++i) x[i] = S::store(op(S::load(x[i])));
}

template <class S>
void chunk_scale(void* data, int64_t n, double scale) {
  using T = typename S::math;
  const T s = static_cast<T>(scale);  // as torch: the multiplier in the math type
  chunk_rewrite<S>(data, n, [s](T v) { return v * s; });
}

template <class S>
void chunk_clamp(void* data, int64_t n, double lo_double, double hi_double) {
  using T = typename S::math;
  const T lo = static_cast<T>(lo_double), hi = static_cast<T>(hi_double);
  chunk_rewrite<S>(data, n, [lo, hi](T v) { return norm::clamp(v, lo, hi); });  // NaN stays NaN
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
