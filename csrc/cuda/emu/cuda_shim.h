// CPU stand-ins for the CUDA built-ins the kernels use, so that adam_kernel.cuh and
// sgd_kernel.cuh compile with the host compiler and run on the CPU (emulator.cpp).
//
// The emulator runs the blocks of a grid one after another (in an order the caller picks) and
// the threads of a block concurrently, one std::thread each; __syncthreads() is a std::barrier.
// `__shared__` variables become function statics, which is right because only one block runs
// at a time. Device memory is host memory. This checks the kernels' logic (chunk walk, vector
// and tail paths, the step-counter handshake between blocks, flags) without a GPU; it says
// nothing about performance or about the GPU memory model.
#pragma once

// Everything that may use these identifiers itself comes first, before the macros below.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t (launch.h)
#include <cuda_bf16.h>  // host-compatible: __half / __nv_bfloat16 and their conversions
#include <cuda_fp16.h>
#include <vector_types.h>  // uint4

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)

namespace fusedopt {
namespace cuda {
namespace emu {
struct Dim {
  unsigned int x;
};
extern std::barrier<>* block_barrier;  // the running block's barrier
}  // namespace emu
}  // namespace cuda
}  // namespace fusedopt

extern thread_local fusedopt::cuda::emu::Dim threadIdx;
extern thread_local fusedopt::cuda::emu::Dim blockIdx;
extern fusedopt::cuda::emu::Dim blockDim;
extern fusedopt::cuda::emu::Dim gridDim;

inline void __syncthreads() { fusedopt::cuda::emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T __ldcg(const T* address) {
  T value;
  __atomic_load(address, &value, __ATOMIC_SEQ_CST);
  return value;
}
