// Device-side helpers shared by the optimizer kernels: storage <-> math conversion, vector
// loads and stores, the walk over a block's chunks, and the per-tensor step-counter handshake.
//
// Work split: the grid is persistent (kBlocksPerSm blocks per SM, fewer if there are fewer
// chunks). Block b takes the contiguous chunk range [b * C / B, (b + 1) * C / B) of the
// launch's C chunks, so consecutive chunks of a block usually belong to one tensor: per-tensor
// values (pointers, Adam's bias corrections) are computed once per tensor per block, not per
// chunk, and memory is walked in address order.
//
// Inside a chunk the block's threads take 16-byte vectors round-robin when every pointer of the
// tensor is 16-byte aligned (chunk boundaries are multiples of the vector width), then single
// elements for the tail; otherwise single elements throughout. All element indices are 64-bit.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(FUSEDOPT_CUDA_EMU)  // emu/cuda_shim.h stands in for these on the CPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "launch.h"

namespace fusedopt {
namespace cuda {

// ---- storage and math types ------------------------------------------------------------------
// Math is done in float for float/half/bfloat16 storage and in double for double storage.
template <typename S> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename S> using math_t = typename MathOf<S>::type;

__device__ __forceinline__ float to_math(float x) { return x; }
__device__ __forceinline__ double to_math(double x) { return x; }
__device__ __forceinline__ float to_math(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds to nearest even, like torch's .to(dtype).
template <typename S> __device__ __forceinline__ S from_math(math_t<S> x);
template <> __device__ __forceinline__ float from_math<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_math<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_math<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per 16-byte vector.
template <typename S> constexpr int kVecElems = 16 / static_cast<int>(sizeof(S));

// ---- loads and stores of N consecutive elements (N == kVecElems<S>: one 16-byte access) -------
// Elements stay in storage format (2 bytes for half types) until used: converting a whole
// vector to float up front would double the registers held per element.
template <typename S, int N>
struct Pack {
  S v[N];
};

// `base + e` must be 16-byte aligned when N > 1.
template <int N, typename S>
__device__ __forceinline__ Pack<S, N> load_pack(const S* base, int64_t e) {
  Pack<S, N> p;
  if constexpr (N == 1) {
    p.v[0] = base[e];
  } else {
    static_assert(N * sizeof(S) == 16, "vector accesses are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(base + e);
    memcpy(&p, &raw, 16);
  }
  return p;
}

template <int N, typename S>
__device__ __forceinline__ void store_pack(S* base, int64_t e, const Pack<S, N>& p) {
  if constexpr (N == 1) {
    base[e] = p.v[0];
  } else {
    uint4 raw;
    memcpy(&raw, &p, 16);
    *reinterpret_cast<uint4*>(base + e) = raw;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- scalars ----------------------------------------------------------------------------------
__device__ __forceinline__ double read_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr) : double(*static_cast<const float*>(s.ptr));
}

// True when GradScaler found an inf/NaN: the launch must not change anything.
__device__ __forceinline__ bool step_skipped(const void* found_inf, bool is_double) {
  if (found_inf == nullptr) return false;
  return is_double ? (*static_cast<const double*>(found_inf) != 0.0)
                   : (*static_cast<const float*>(found_inf) != 0.0f);
}

// ---- the chunk walk ---------------------------------------------------------------------------
// This block's chunk range [first, last).
__device__ __forceinline__ void block_chunk_range(int32_t num_chunks, int32_t& first, int32_t& last) {
  const int64_t n = num_chunks, blocks = gridDim.x, b = blockIdx.x;
  first = static_cast<int32_t>(n * b / blocks);
  last = static_cast<int32_t>(n * (b + 1) / blocks);
}

// Number of chunks of a tensor of `numel` elements (at least one).
__device__ __forceinline__ uint32_t chunks_of(int64_t numel) {
  return numel <= kChunkElems ? 1u : static_cast<uint32_t>((numel + kChunkElems - 1) / kChunkElems);
}

// Data pointer of `tensor` in list `list`.
template <typename T>
__device__ __forceinline__ T* table_ptr(const WorkTable& t, int list, int32_t tensor) {
  return static_cast<T*>(t.ptrs[static_cast<int64_t>(list) * t.num_tensors + tensor]);
}

// Applies op.template apply<N>(e) to the elements [begin, end) of a chunk: 16-byte vectors
// (N = V) when `vectorize`, then single elements (N = 1). Threads of the block interleave.
template <int V, typename Op>
__device__ __forceinline__ void for_each_element(int64_t begin, int64_t end, bool vectorize,
                                                 const Op& op) {
  int64_t tail = begin;
  if (vectorize) {
    const int64_t vec_end = begin + (end - begin) / V * V;
    for (int64_t e = begin + static_cast<int64_t>(threadIdx.x) * V; e < vec_end;
         e += static_cast<int64_t>(blockDim.x) * V) {
      op.template apply<V>(e);
    }
    tail = vec_end;
  }
  for (int64_t e = tail + threadIdx.x; e < end; e += blockDim.x) {
    op.template apply<1>(e);
  }
}

// ---- per-tensor step counters (Adam) ----------------------------------------------------------
// Every block that works on a tensor reads its old step at the start (thread 0) and uses
// old + 1 for the bias corrections. The new value may only be stored once no block can still
// read the old one: each block, after its last chunk of the tensor, adds how many chunks of it
// it finished to the tensor's `done` counter; the block that completes the count stores the
// step and resets the counter to zero for the next launch. A block that owns every chunk of
// a tensor stores directly. Called by thread 0 after a __syncthreads() that follows the
// block's last access to the tensor.
__device__ __forceinline__ void finish_tensor(unsigned int* done, int32_t tensor, uint32_t finished,
                                              uint32_t total, float* step, float new_step) {
  if (finished == total) {
    *step = new_step;
    return;
  }
  __threadfence();  // our reads of *step happen before the other blocks see our count
  const uint32_t before = atomicAdd(done + tensor, finished);
  if (before + finished == total) {
    *step = new_step;
    done[tensor] = 0u;
  }
}

}  // namespace cuda
}  // namespace fusedopt
