// Work items and per-ISA kernel tables of the CPU backend.
//
// A work item is one tensor of the op's lists, seen as a flat array of `numel` elements
// (either the tensor itself, when every tensor of the item is dense with the same strides,
// or a contiguous temporary). A kernel updates the elements [begin, end) of one item.
// There is one kernel per (ISA, storage dtype, variant flags); the op picks the kernel of
// each item once, when it builds the work list, so the hot loops have no flag branches.
#pragma once

#include <cstdint>

#include "fusedopt/rules.h"

namespace fusedopt {
namespace cpu {

enum class DType : uint8_t { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
constexpr int kNumDTypes = 4;

// Instruction sets with a compiled kernel variant, in increasing order.
enum class Isa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
// Every variant, best first.
constexpr Isa kIsasBestFirst[] = {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kScalar};

struct AdamItem;
struct SgdItem;

// Values shared by all items of one op call.
struct AdamCall {
  double grad_scale;  // used only by the kernels of the grad-scale variant
  int streams;        // sub-ranges walked side by side (active_streams(), isa.h)
};
struct SgdCall {
  rules::SgdScalars<double> scalars;
  double grad_scale;
  int streams;
};

using AdamKernel = void (*)(const AdamItem& item, const AdamCall& call, int64_t begin,
                            int64_t end);
using SgdKernel = void (*)(const SgdItem& item, const SgdCall& call, int64_t begin,
                           int64_t end);

struct AdamItem {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  int64_t numel;
  rules::AdamScalars<double> scalars;  // depend on this tensor's step
  AdamKernel kernel;
};

struct SgdItem {
  void* param;
  const void* grad;
  void* momentum_buffer;  // nullptr when momentum == 0
  int64_t numel;
  SgdKernel kernel;
};

// Flags that select a kernel variant.
struct AdamVariant {
  rules::WeightDecay weight_decay;
  bool amsgrad;
  bool maximize;
  bool has_grad_scale;
};
struct SgdVariant {
  bool l2;  // weight_decay != 0
  rules::Momentum momentum;
  bool nesterov;
  bool maximize;
  bool has_grad_scale;
};

// The kernel tables of each ISA (kernels_<isa>.cpp). A variant that was not compiled
// (e.g. AVX-512 with a compiler that cannot target it) returns nullptr.
#define FUSEDOPT_DECLARE_ISA(ns)                                     \
  namespace ns {                                                     \
  bool compiled();                                                   \
  AdamKernel adam_kernel(DType dtype, const AdamVariant& variant);   \
  SgdKernel sgd_kernel(DType dtype, const SgdVariant& variant);      \
  }
FUSEDOPT_DECLARE_ISA(isa_scalar)
FUSEDOPT_DECLARE_ISA(isa_avx2)
FUSEDOPT_DECLARE_ISA(isa_avx512)
FUSEDOPT_DECLARE_ISA(isa_avx512bf16)
#undef FUSEDOPT_DECLARE_ISA

// Kernel for the ISA chosen at run time (see isa.h).
AdamKernel select_adam_kernel(DType dtype, const AdamVariant& variant);
SgdKernel select_sgd_kernel(DType dtype, const SgdVariant& variant);

}  // namespace cpu
}  // namespace fusedopt
