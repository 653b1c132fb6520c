// Runs the CUDA kernels (adam_kernel.cuh, sgd_kernel.cuh, norm_kernel.cuh) on the CPU, for tests on machines
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
#include "norm_kernel.cuh"
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

// Calls f(S{}) with the storage type of `dtype`; false for a bad dtype.
template <typename F>
bool with_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kFloat64: f(double{}); return true;
    case DType::kFloat16: f(__half{}); return true;
    case DType::kBFloat16: f(__nv_bfloat16{}); return true;
  }
  return false;
}

// The groups of a clipping-op call, as the host op (csrc/cuda/norm_ops.cpp) makes them, each
// with its host table. Returns false for a bad dtype code.
struct ClipCall {
  std::vector<ClipGroup> plan;
  std::vector<HostTable> tables;
  int64_t slots = 0;
};

bool clip_call(int64_t n, const int* dtype_codes, void* const* ptrs, const int64_t* numels,
               ClipCall& call) {
  std::vector<DType> dtypes(n);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype_codes[i] < 0 || dtype_codes[i] > 3) return false;
    dtypes[i] = static_cast<DType>(dtype_codes[i]);
  }
  call.plan = plan_clip_groups(n, dtypes.data(), numels, &call.slots);
  for (const ClipGroup& g : call.plan) {
    std::vector<void*> group_ptrs;
    std::vector<int64_t> group_numels;
    for (int64_t i : g.tensors) {
      group_ptrs.push_back(ptrs[i]);
      group_numels.push_back(numels[i]);
    }
    call.tables.emplace_back(kClipLists, static_cast<int64_t>(g.tensors.size()), group_ptrs.data(),
                             group_numels.data());
  }
  return true;
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

// total_norm on host memory, as the CUDA op does it: the tensors grouped by dtype, one partials
// launch per group (grid x block, block order `order`), then the one-block finishing launch.
//   n tensors with dtypes[i] (DType codes), ptrs[i], numels[i]; norm_type: the order;
//   prescale: read "on the device" from prescale_ptr (a float, or a double when
//   prescale_is_double) or, when prescale_ptr is null, prescale_value (1: no prescaling);
//   out: a float (out_is_double == 0) or double the result is written to.
// Returns 0; -1 for a bad dtype or norm kind.
int fusedopt_emu_total_norm(int64_t n, const int* dtypes, void* const* ptrs, const int64_t* numels,
                            double norm_type, const void* prescale_ptr, int prescale_is_double,
                            double prescale_value, void* out, int out_is_double, int grid,
                            int block, int order) {
  using namespace emu;
  ClipCall call;
  if (!clip_call(n, dtypes, ptrs, numels, call)) return -1;
  const int32_t kind = static_cast<int32_t>(fusedopt::norm::kind_of(norm_type));
  const bool l0 = kind == static_cast<int32_t>(fusedopt::norm::Kind::kL0);
  // Poisoned: every slot must be written by the partials launches.
  std::vector<double> partials(std::max<int64_t>(1, call.slots), -12345.0);
  std::vector<double> starts(std::max<int64_t>(1, call.slots), -12345.0);
  for (size_t g = 0; g < call.plan.size(); ++g) {
    HostTable& table = call.tables[g];
    const NormPartialsArgs args{kind, norm_type, partials.data(), l0 ? starts.data() : nullptr,
                                call.plan[g].slot0,
                                ScalarArg{prescale_ptr, prescale_is_double != 0, prescale_value}};
    bool ok = false;
    with_storage(call.plan[g].dtype, [&](auto s) {
      const kernels::NormPartialsKernel k = kernels::norm_partials_kernel_for<decltype(s)>(kind);
      if (k == nullptr) return;
      launch(k, table.grid(grid), static_cast<unsigned>(block), order, table.view(), args);
      ok = true;
    });
    if (!ok) return -1;
  }
  for (int64_t s = 0; s < call.slots; ++s) {
    if (partials[s] == -12345.0 || (l0 && starts[s] == -12345.0)) return -2;
  }
  const NormFinishArgs finish{kind, norm_type, partials.data(), l0 ? starts.data() : nullptr,
                              call.slots, out, out_is_double != 0};
  launch(kernels::norm_finish_kernel, 1u, static_cast<unsigned>(block), 0, finish);
  return 0;
}

// scale_ on host memory: one launch per dtype group; the factor is read "on the device" from
// scale_ptr (a float, or a double when scale_is_double) or, when scale_ptr is null, is
// scale_value (the host op skips the launches when that is 1). Returns 0; -1 for a bad dtype.
int fusedopt_emu_scale(int64_t n, const int* dtypes, void* const* ptrs, const int64_t* numels,
                       const void* scale_ptr, int scale_is_double, double scale_value, int grid,
                       int block, int order) {
  using namespace emu;
  ClipCall call;
  if (!clip_call(n, dtypes, ptrs, numels, call)) return -1;
  const ScalarArg factor = scalar(scale_ptr, scale_is_double != 0, scale_value);
  for (size_t g = 0; g < call.plan.size(); ++g) {
    HostTable& table = call.tables[g];
    with_storage(call.plan[g].dtype, [&](auto s) {
      launch(kernels::scale_kernel<decltype(s)>, table.grid(grid), static_cast<unsigned>(block),
             order, table.view(), factor);
    });
  }
  return 0;
}

// clamp_ on host memory: one launch per dtype group. Returns 0; -1 for a bad dtype.
int fusedopt_emu_clamp(int64_t n, const int* dtypes, void* const* ptrs, const int64_t* numels,
                       double lo, double hi, int grid, int block, int order) {
  using namespace emu;
  ClipCall call;
  if (!clip_call(n, dtypes, ptrs, numels, call)) return -1;
  for (size_t g = 0; g < call.plan.size(); ++g) {
    HostTable& table = call.tables[g];
    with_storage(call.plan[g].dtype, [&](auto s) {
      launch(kernels::clamp_kernel<decltype(s)>, table.grid(grid), static_cast<unsigned>(block),
             order, table.view(), lo, hi);
    });
  }
  return 0;
}

}  // extern "C"
