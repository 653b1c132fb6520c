// The clipping ops' kernels: total_norm (partials + finish), scale_, clamp_ (launched by norm.cu;
// also compiled for the CPU by emu/).
//
// total_norm, two launches for one dtype (k + 1 for k dtypes), deterministic, no atomics:
//   1. norm_partials_kernel, one launch per dtype over that dtype's work table: each chunk is
//      reduced by the one block that owns it (block_chunk_range); every thread folds its
//      elements (each multiplied by args.prescale first, 1 unless given) in its fixed order (16-byte packs when aligned, then single elements) with
//      norm::term / norm::combine in the math type (float for fp32/fp16/bf16, double for
//      fp64), the block merges the threads' results in a fixed tree in double (norm::merge),
//      and thread 0 stores the chunk's partial in its own slot. A chunk's partial therefore
//      depends only on its elements and the block size, not on the grid or the block order.
//   2. norm_finish_kernel, one block: thread t merges slots t, t + B, t + 2B, ... in order,
//      the block merges the threads in a fixed tree, thread 0 applies norm::finish in double
//      and stores the result, rounded once to float32 (float64 when an input is fp64).
// max/min: norm::combine skips NaN, so threads count NaNs on the side and a NaN makes the
// partial NaN; norm::merge propagates it (torch's inf-norm of data with a NaN is NaN).
// p = 0 counts tensors with a nonzero (or NaN) element, as torch: a chunk's partial is its
// count of such elements; the partials launch also marks each tensor's first chunk
// (tensor_starts), and the finishing block counts the tensors whose chunks are not all 0.
//
// scale_ and clamp_: one launch per dtype, each element read and written once in the math type.
// scale_ reads its factor from device memory (no host sync); when it is 1 every thread returns
// at once, since x * 1 == x bit for bit.
#pragma once

#include <type_traits>

#include "fusedopt/norm.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace kernels {

using norm::Kind;

// Merges v of every thread of the block, in a fixed tree over thread indices (deterministic);
// the result is valid in thread 0 only. `scratch`: shared memory of blockDim.x entries. Every
// thread of the block must call it. Only thread 0 reads scratch after the last barrier, and it
// is also the only writer of scratch[0], so calls may follow each other without another barrier.
template <typename T>
__device__ __forceinline__ T block_merge(Kind k, T v, T* scratch) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  scratch[t] = v;
  __syncthreads();
  unsigned width = 1;
  while (width < n) width <<= 1;
  for (unsigned s = width / 2; s > 0; s >>= 1) {
    if (t < s && t + s < n) scratch[t] = norm::merge(k, scratch[t], scratch[t + s]);
    __syncthreads();
  }
  return scratch[0];
}

// The reduction of one thread's elements of a chunk; `apply<N>(e)` folds elements [e, e + N).
template <typename S, Kind K>
struct NormElements {
  using M = math_t<S>;
  static constexpr bool kMaxMin = K == Kind::kInf || K == Kind::kNegInf;
  const S* x = nullptr;  // the tensor
  M p;                   // the norm order (kLp)
  M prescale;            // each element is multiplied by it first (GradScaler's 1 / scale)
  mutable M acc;         // this thread's combine() of its terms
  mutable bool nan_seen; // max/min: a NaN was skipped by combine()

  template <int N>
  __device__ __forceinline__ void apply(int64_t e) const {
    const Pack<S, N> v = load_pack<N>(x, e);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const M xk = to_math(v.v[k]) * prescale;
      acc = norm::accumulate<K>(acc, xk, p);
      if constexpr (kMaxMin) nan_seen = nan_seen || xk != xk;
    }
  }
};

// Walks the chunks this block owns (block_chunk_range), in order: points `op.x` at the chunk's
// tensor (list 0 of the table; `op.x` may be `const S*`), calls before(c, chunk), folds the
// chunk's elements with for_each_element (16-byte packs when the tensor is aligned), then calls
// after(c, chunk). Every thread of the block makes the same calls (hooks may hold barriers).
struct NoChunkHook {
  __device__ __forceinline__ void operator()(int32_t, const ChunkRef&) const {}
};

template <typename S, typename Op, typename Before = NoChunkHook, typename After = NoChunkHook>
__device__ __forceinline__ void for_each_chunk(const WorkTable& table, Op& op,
                                               Before before = {}, After after = {}) {
  using Ptr = decltype(op.x);
  int32_t first, last;
  block_chunk_range(table.num_chunks, first, last);
  constexpr int V = kVecElems<S>;
  int32_t current = -1;
  bool vectorize = false;
  int64_t numel = 0;
  for (int32_t c = first; c < last; ++c) {
    const ChunkRef chunk = table.chunks[c];
    if (chunk.tensor != current) {
      current = chunk.tensor;
      op.x = table_ptr<std::remove_pointer_t<Ptr>>(table, 0, current);
      numel = table.numels[current];
      vectorize = aligned16(op.x);
    }
    const int64_t begin = static_cast<int64_t>(chunk.index) * kChunkElems;
    const int64_t end = begin + kChunkElems < numel ? begin + kChunkElems : numel;
    before(c, chunk);
    for_each_element<V>(begin, end, vectorize, op);
    after(c, chunk);
  }
}

// One partial per chunk of `table` (all of storage type S): see the file comment.
template <typename S, Kind K>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
norm_partials_kernel(const WorkTable table, const NormPartialsArgs args) {
  using M = math_t<S>;
  __shared__ double scratch[kBlockThreads];
  NormElements<S, K> op;
  op.p = static_cast<M>(args.p);
  op.prescale = static_cast<M>(read_scalar(args.prescale));
  auto start_chunk = [&](int32_t, const ChunkRef&) {
    op.acc = norm::identity<M>(K);
    op.nan_seen = false;
  };
  auto store_partial = [&](int32_t c, const ChunkRef& chunk) {
    double mine = static_cast<double>(op.acc);
    if (op.nan_seen) mine = norm::quiet_nan<double>();
    const double partial = block_merge(K, mine, scratch);
    if (threadIdx.x == 0) {
      args.partials[args.slot0 + c] = partial;
      if constexpr (K == Kind::kL0) args.tensor_starts[args.slot0 + c] = chunk.index == 0 ? 1.0 : 0.0;
    }
  };
  for_each_chunk<S>(table, op, start_chunk, store_partial);
}

// The norm from the partials of every dtype's launch: see the file comment. One block.
__global__ void __launch_bounds__(kBlockThreads)
norm_finish_kernel(const NormFinishArgs args) {
  __shared__ double scratch[kBlockThreads];
  const Kind k = static_cast<Kind>(args.kind);
  const int64_t n = args.num_partials;
  double acc = norm::identity<double>(k);
  if (k == Kind::kL0) {
    // A tensor's chunks are consecutive slots, the first marked in tensor_starts.
    for (int64_t s = threadIdx.x; s < n; s += blockDim.x) {
      if (args.tensor_starts[s] == 0.0) continue;
      bool nonzero = args.partials[s] != 0.0;
      for (int64_t j = s + 1; j < n && args.tensor_starts[j] == 0.0 && !nonzero; ++j) {
        nonzero = args.partials[j] != 0.0;
      }
      acc += nonzero ? 1.0 : 0.0;
    }
  } else {
    for (int64_t s = threadIdx.x; s < n; s += blockDim.x) acc = norm::merge(k, acc, args.partials[s]);
  }
  const double total = block_merge(k, acc, scratch);
  if (threadIdx.x == 0) {
    const double value = norm::finish(k, total, args.p);
    if (args.out_is_double) {
      *static_cast<double*>(args.out) = value;
    } else {
      *static_cast<float*>(args.out) = static_cast<float>(value);
    }
  }
}

// Scales elements of one tensor in place.
template <typename S>
struct ScaleElements {
  using M = math_t<S>;
  S* x = nullptr;
  M factor;  // the scale in the math type, as torch (and the CPU op) multiply

  template <int N>
  __device__ __forceinline__ void apply(int64_t e) const {
    Pack<S, N> v = load_pack<N>(x, e);
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = from_math<S>(to_math(v.v[k]) * factor);
    store_pack<N>(x, e, v);
  }
};

// Clamps elements of one tensor in place.
template <typename S>
struct ClampElements {
  using M = math_t<S>;
  S* x = nullptr;
  M lo, hi;

  template <int N>
  __device__ __forceinline__ void apply(int64_t e) const {
    Pack<S, N> v = load_pack<N>(x, e);
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = from_math<S>(norm::clamp(to_math(v.v[k]), lo, hi));
    store_pack<N>(x, e, v);
  }
};

// x *= scale over every tensor of `table`.
template <typename S>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
scale_kernel(const WorkTable table, const ScalarArg scale) {
  const double value = read_scalar(scale);
  if (value == 1.0) return;  // nothing would change
  ScaleElements<S> op;
  op.factor = static_cast<math_t<S>>(value);
  for_each_chunk<S>(table, op);
}

// x = clamp(x, lo, hi) over every tensor of `table`.
template <typename S>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
clamp_kernel(const WorkTable table, const double lo, const double hi) {
  ClampElements<S> op;
  op.lo = static_cast<math_t<S>>(lo);
  op.hi = static_cast<math_t<S>>(hi);
  for_each_chunk<S>(table, op);
}

// The partials kernel of a norm kind, for launchers (norm.cu, emu/).
using NormPartialsKernel = void (*)(const WorkTable, const NormPartialsArgs);

template <typename S>
inline NormPartialsKernel norm_partials_kernel_for(int32_t kind) {
  switch (static_cast<Kind>(kind)) {
    case Kind::kL2: return &norm_partials_kernel<S, Kind::kL2>;
    case Kind::kL1: return &norm_partials_kernel<S, Kind::kL1>;
    case Kind::kInf: return &norm_partials_kernel<S, Kind::kInf>;
    case Kind::kNegInf: return &norm_partials_kernel<S, Kind::kNegInf>;
    case Kind::kL0: return &norm_partials_kernel<S, Kind::kL0>;
    case Kind::kLp: return &norm_partials_kernel<S, Kind::kLp>;
  }
  return nullptr;
}

}  // namespace kernels
}  // namespace cuda
}  // namespace fusedopt
