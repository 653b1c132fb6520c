// Runs the CUDA kernels (adam_kernel.cuh, sgd_kernel.cuh) on the CPU, for tests on machines
// without a GPU (tests/test_backends_cuda.py builds this file into a small shared library and
// calls it through ctypes on CPU tensors). See cuda_shim.h for what is and is not emulated.
//
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -Wno-unknown-pragmas -DFUSEDOPT_CUDA_EMU
//       -I csrc/include -I csrc/cuda -I $CUDA_HOME/include csrc/cuda/emu/emulator.cpp
//       -o libfusedopt_cuda_emu.so
#include "cuda_shim.h"  // first: the CUDA built-ins the kernels use

#include <algorithm>
#include <thread>
#include <vector>

#include "adam_kernel.cuh"
#include "sgd_kernel.cuh"
#include "table_layout.h"

thread_local fusedopt::cuda::emu::Dim threadIdx;
thread_local fusedopt::cuda::emu::Dim blockIdx;
fusedopt::cuda::emu::Dim blockDim;
fusedopt::cuda::emu::Dim gridDim;
std::barrier<>* fusedopt::cuda::emu::block_barrier = nullptr;

namespace fusedopt {
namespace cuda {
namespace emu {
namespace {

// Flag bits of the C entry points.
constexpr int kMaximize = 1, kHasGradScale = 2, kLrIsDouble = 4, kGradScaleIsDouble = 8,
              kFoundInfIsDouble = 16, kNesterov = 32, kIsFirstStep = 64;

// Block execution orders: the kernels must not depend on which block runs first.
std::vector<unsigned> block_order(unsigned grid, int order) {
  std::vector<unsigned> blocks(grid);
  for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
  if (order == 1) std::reverse(blocks.begin(), blocks.end());
  if (order == 2) std::stable_partition(blocks.begin(), blocks.end(), [](unsigned b) { return b % 2; });
  return blocks;
}

// Runs kernel(args...) on a grid of `grid` x `block` threads, block after block.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid, unsigned block, int order, const Args&... args) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b : block_order(grid, order)) {
    std::barrier<> barrier(block);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        kernel(args...);
      });
    }
    for (std::thread& th : threads) th.join();
    block_barrier = nullptr;
  }
}

ScalarArg scalar(const void* ptr, bool is_double, double value) {
  return ScalarArg{ptr, is_double, value};
}

// The table image on the host; also checks that the kernel left the counters at zero.
struct HostTable {
  TableLayout layout;
  std::vector<int64_t> words;
  HostTable(int64_t num_lists, int64_t n, void* const* ptrs, const int64_t* numels)
      : layout(table_layout(num_lists, n, numels)), words(table_words(layout, ptrs, numels)) {}
  WorkTable view() { return table_view(words.data(), layout); }
  bool counters_zero() const {
    return std::all_of(words.begin() + layout.done(), words.end(), [](int64_t w) { return w == 0; });
  }
  unsigned grid(int requested) const {
    return static_cast<unsigned>(std::min<int64_t>(layout.num_chunks, requested));
  }
};

template <typename S>
void adam_typed(bool amsgrad, const WorkTable& t, const AdamArgs& a, unsigned grid, unsigned block,
                int order) {
  if (amsgrad) {
    launch(kernels::adam_kernel<S, true>, grid, block, order, t, a);
  } else {
    launch(kernels::adam_kernel<S, false>, grid, block, order, t, a);
  }
}

template <typename S>
void sgd_typed(bool momentum, const WorkTable& t, const SgdArgs& a, unsigned grid, unsigned block,
               int order) {
  if (momentum) {
    launch(kernels::sgd_kernel<S, true>, grid, block, order, t, a);
  } else {
    launch(kernels::sgd_kernel<S, false>, grid, block, order, t, a);
  }
}

template <template <typename> class F, typename... Args>
bool by_dtype(int dtype, Args&&... args) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: F<float>{}(args...); return true;
    case DType::kFloat64: F<double>{}(args...); return true;
    case DType::kFloat16: F<__half>{}(args...); return true;
    case DType::kBFloat16: F<__nv_bfloat16>{}(args...); return true;
  }
  return false;
}

template <typename S> struct AdamRun {
  template <typename... A> void operator()(A&&... a) const { adam_typed<S>(a...); }
};
template <typename S> struct SgdRun {
  template <typename... A> void operator()(A&&... a) const { sgd_typed<S>(a...); }
};

}  // namespace
}  // namespace emu
}  // namespace cuda
}  // namespace fusedopt

using namespace fusedopt::cuda;

extern "C" {

// One Adam launch on host memory.
//   dtype: DType (launch.h); amsgrad: 0/1; n: tensors;
//   ptrs: [lists * n] data pointers in AdamList order (5 lists, 6 with amsgrad);
//   numels: [n]; scalars: lr, beta1, beta2, eps, weight_decay, grad_scale;
//   lr_ptr / grad_scale_ptr / found_inf_ptr: host scalars read "on the device", or null;
//   flags: kMaximize | kHasGradScale | k*IsDouble bits; wd_mode: rules::WeightDecay;
//   grid, block: launch shape (grid capped at the chunk count); order: 0, 1, 2 (block_order).
// Returns 0; -1 for a bad dtype; -2 when the step counters were not reset to zero.
int fusedopt_emu_adam(int dtype, int amsgrad, int64_t n, void* const* ptrs, const int64_t* numels,
                      const double* scalars, const void* lr_ptr, const void* grad_scale_ptr,
                      const void* found_inf_ptr, int flags, int wd_mode, int grid, int block,
                      int order) {
  using namespace emu;
  HostTable table(amsgrad ? kAdamListsAmsgrad : kAdamLists, n, ptrs, numels);
  AdamArgs a{};
  a.lr = scalar(lr_ptr, flags & kLrIsDouble, scalars[0]);
  a.beta1 = scalars[1];
  a.beta2 = scalars[2];
  a.eps = scalars[3];
  a.weight_decay = scalars[4];
  a.weight_decay_mode = wd_mode;
  a.maximize = flags & kMaximize;
  a.has_grad_scale = flags & kHasGradScale;
  a.grad_scale = scalar(grad_scale_ptr, flags & kGradScaleIsDouble, scalars[5]);
  a.found_inf = found_inf_ptr;
  a.found_inf_is_double = flags & kFoundInfIsDouble;
  if (!by_dtype<AdamRun>(dtype, amsgrad != 0, table.view(), a, table.grid(grid),
                         static_cast<unsigned>(block), order)) {
    return -1;
  }
  return table.counters_zero() ? 0 : -2;
}

// One SGD launch on host memory. As above; ptrs in SgdList order (3 lists when momentum != 0);
// scalars: lr, momentum, dampening, weight_decay, grad_scale; flags also kNesterov, kIsFirstStep.
int fusedopt_emu_sgd(int dtype, int64_t n, void* const* ptrs, const int64_t* numels,
                     const double* scalars, const void* lr_ptr, const void* grad_scale_ptr,
                     const void* found_inf_ptr, int flags, int grid, int block, int order) {
  using namespace emu;
  const bool momentum = scalars[1] != 0.0;
  HostTable table(momentum ? kSgdListsMomentum : kSgdLists, n, ptrs, numels);
  SgdArgs a{};
  a.lr = scalar(lr_ptr, flags & kLrIsDouble, scalars[0]);
  a.momentum = scalars[1];
  a.dampening = scalars[2];
  a.weight_decay = scalars[3];
  a.nesterov = flags & kNesterov;
  a.maximize = flags & kMaximize;
  a.is_first_step = flags & kIsFirstStep;
  a.has_grad_scale = flags & kHasGradScale;
  a.grad_scale = scalar(grad_scale_ptr, flags & kGradScaleIsDouble, scalars[4]);
  a.found_inf = found_inf_ptr;
  a.found_inf_is_double = flags & kFoundInfIsDouble;
  if (!by_dtype<SgdRun>(dtype, momentum, table.view(), a, table.grid(grid),
                        static_cast<unsigned>(block), order)) {
    return -1;
  }
  return 0;
}

}  // extern "C"
