// The plain interface between the host side of the CUDA backend (tables.cpp, ops_cuda.cpp,
// norm_ops.cpp: at::Tensor, the dispatcher) and its kernels (adam.cu, sgd.cu, norm.cu).
//
// No torch header is included here, so the .cu files compile in seconds rather than minutes.
//
// One launch updates every tensor of one storage dtype of an op call. Its work is described by
// a WorkTable that lives in device memory (built and cached by tables.cpp):
//   * per tensor: one data pointer per list (param, grad, state...), its element count, and a
//     finished-chunk counter (Adam's step increment, see multi_tensor.cuh);
//   * per chunk: which tensor and which kChunkElems-element slice of it. Every tensor has at
//     least one chunk, even an empty one, so that its step counter is still incremented.
// A persistent grid (a few blocks per SM) splits the chunk list into contiguous ranges.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedopt {
namespace cuda {

// Elements per chunk. A multiple of every vector width (16 bytes / element size), so a chunk
// of a 16-byte-aligned tensor starts 16-byte aligned.
constexpr int64_t kChunkElems = 16384;

// Storage dtype of the tensors of one launch.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One chunk of the work list.
struct ChunkRef {
  int32_t tensor;  // index of the tensor in the table
  int32_t index;   // which slice: elements [index * kChunkElems, min(numel, (index+1) * kChunkElems))
};

// Device-resident description of one launch's tensors (all pointers are device memory).
struct WorkTable {
  void* const* ptrs;      // [num_lists * num_tensors]: ptrs[list * num_tensors + tensor]
  const int64_t* numels;  // [num_tensors]: element count of each tensor (64-bit)
  const ChunkRef* chunks; // [num_chunks]: the work list, tensor by tensor, in order
  unsigned int* done;     // [num_tensors]: chunks finished so far in this launch; zero between launches
  int32_t num_tensors;    // tensors in this launch
  int32_t num_chunks;     // entries of `chunks`
};

// A scalar read either on the host (ptr == nullptr: `value`) or by the kernel from device memory.
struct ScalarArg {
  const void* ptr;  // device address of a 1-element float32 or float64 tensor, or nullptr
  bool is_double;   // *ptr is a double (else a float)
  double value;     // the value when ptr == nullptr
};

// Lists of an Adam table, in this order.
enum AdamList : int { kAdamParam = 0, kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, kAdamStep,
                      kAdamMaxExpAvgSq, kAdamListsAmsgrad };
constexpr int kAdamLists = kAdamMaxExpAvgSq;  // without max_exp_avg_sq

// Lists of an SGD table, in this order.
enum SgdList : int { kSgdParam = 0, kSgdGrad, kSgdMomentumBuffer, kSgdListsMomentum };
constexpr int kSgdLists = kSgdMomentumBuffer;  // without momentum buffers

// Hyperparameters of one Adam/AdamW launch.
struct AdamArgs {
  ScalarArg lr;             // learning rate (a Python float or the optimizer's lr tensor)
  double beta1;             // first-moment decay
  double beta2;             // second-moment decay
  double eps;               // denominator epsilon
  double weight_decay;      // L2 (Adam) or decoupled (AdamW) coefficient
  int32_t weight_decay_mode;// rules::WeightDecay as int (kNone / kL2 / kDecoupled)
  bool maximize;            // ascend instead of descend
  bool has_grad_scale;      // divide gradients by grad_scale
  ScalarArg grad_scale;     // GradScaler's scale (only read when has_grad_scale)
  const void* found_inf;    // device flag (float32/float64): nonzero => the launch changes nothing; may be nullptr
  bool found_inf_is_double; // *found_inf is a double
};

// Hyperparameters of one SGD launch.
struct SgdArgs {
  ScalarArg lr;             // learning rate
  double momentum;          // momentum factor (0: no buffers)
  double dampening;         // momentum dampening
  double weight_decay;      // L2 coefficient
  bool nesterov;            // Nesterov momentum
  bool maximize;            // ascend instead of descend
  bool is_first_step;       // buffers are overwritten with the gradient (torch's first step)
  bool has_grad_scale;      // divide gradients by grad_scale
  ScalarArg grad_scale;     // GradScaler's scale (only read when has_grad_scale)
  const void* found_inf;    // device flag: nonzero => the launch changes nothing; may be nullptr
  bool found_inf_is_double; // *found_inf is a double
};

// Launch one Adam/AdamW step over every tensor of `table` (all of storage dtype `dtype`) on
// `stream`, with a grid of at most `num_sms` x (blocks per SM). Returns the launch status.
cudaError_t launch_adam(DType dtype, bool amsgrad, const WorkTable& table, const AdamArgs& args,
                        int num_sms, cudaStream_t stream);

// Launch one SGD step over every tensor of `table`; `table` has momentum buffers iff
// args.momentum != 0.
cudaError_t launch_sgd(DType dtype, const WorkTable& table, const SgdArgs& args, int num_sms,
                       cudaStream_t stream);

// ---- the clipping ops (norm.cu): total_norm, scale_, clamp_ ----------------------------------
// Their tables have one list: the tensors (of one dtype; empty tensors are left out).
constexpr int kClipLists = 1;

// One partials launch of total_norm: every chunk c of `table` is reduced by one block (its
// threads in a fixed order, then a fixed tree), and the result is stored at
// partials[slot0 + c]: one slot per chunk, written once, no atomics.
struct NormPartialsArgs {
  int32_t kind;            // norm::Kind (csrc/include/fusedopt/norm.h)
  double p;                // the norm order (used by kind kLp)
  double* partials;        // [slots of the call]: this launch writes [slot0, slot0 + num_chunks)
  double* tensor_starts;   // kL0 only, else nullptr: 1 at the slot of a tensor's first chunk, else 0
  int64_t slot0;           // first slot of this launch
  ScalarArg prescale;      // elements are multiplied by it before their term (1: as they are)
};

// The finishing launch of total_norm: one block merges the partials of every dtype's launch
// (in a fixed order: deterministic), applies norm::finish and writes the 0-dim result.
struct NormFinishArgs {
  int32_t kind;                 // norm::Kind
  double p;                     // the norm order
  const double* partials;       // [num_partials]
  const double* tensor_starts;  // kL0 only: which slots start a tensor (see NormPartialsArgs)
  int64_t num_partials;         // slots written by the partials launches (0: no element at all)
  void* out;                    // device address of the 0-dim result
  bool out_is_double;           // *out is a double (else a float)
};

// Partials of one dtype's tensors (a table of kClipLists lists).
cudaError_t launch_norm_partials(DType dtype, const WorkTable& table, const NormPartialsArgs& args,
                                 int num_sms, cudaStream_t stream);
// The finishing launch (always one block; also when num_partials == 0).
cudaError_t launch_norm_finish(const NormFinishArgs& args, cudaStream_t stream);
// x *= scale for every tensor of `table`; when `scale` lives in device memory and equals 1 the
// threads return at once (x * 1 == x bit for bit).
cudaError_t launch_scale(DType dtype, const WorkTable& table, const ScalarArg& scale, int num_sms,
                         cudaStream_t stream);
// x = clamp(x, lo, hi) for every tensor of `table` (NaN stays NaN).
cudaError_t launch_clamp(DType dtype, const WorkTable& table, double lo, double hi, int num_sms,
                         cudaStream_t stream);

// Threads per block and grid blocks per SM of every kernel (the register budget follows).
constexpr int kBlockThreads = 256;
constexpr int kBlocksPerSm = 4;

}  // namespace cuda
}  // namespace fusedopt
