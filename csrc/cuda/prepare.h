// Host-side argument handling of the CUDA ops: checks, grouping by dtype, layouts, scalars.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "launch.h"
#include "tables.h"

namespace fusedopt {
namespace cuda {

// One list argument of an op, as the kernel table needs it.
struct ListArg {
  at::TensorList tensors;  // the op's argument
  const char* name;        // its name, for error messages
  bool written;            // the kernel writes it (params and state; not grads)
  bool is_step;            // Adam's step counters: float32 scalars used as they are
};

// The tensors of one storage dtype, ready for one launch.
struct DTypeGroup {
  DType dtype;
  TensorLists lists;  // lists[l][i]: what the kernel reads and writes
  // (original, working copy) pairs: a tensor whose layout the kernel cannot walk as a flat
  // array is replaced by a dense copy with its param's layout; written ones are copied back.
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
};

// The kernel storage type of a torch dtype; nullopt when the CUDA kernels do not support it.
std::optional<DType> storage_dtype(at::ScalarType t);

// Checks the lists (lengths, device, dtypes, shapes) and splits them by param dtype, in order of
// first appearance. lists[0] must be the params. `op` names the op in error messages.
std::vector<DTypeGroup> group_by_dtype(const char* op, const std::vector<ListArg>& lists);

// Copies the working copies of written tensors back into the originals.
void copy_back(std::vector<DTypeGroup>& groups);

// A scalar argument: on the host it is read now (a CPU tensor read is no device sync); on the
// device the kernel reads it. fp16/bf16 device scalars are converted to fp32 first (one small
// extra kernel); the converted tensor is kept in `keep_alive` until the launch is queued.
ScalarArg scalar_arg(const char* op, const char* name, const at::Tensor& t,
                     const at::Device& device, std::vector<at::Tensor>& keep_alive);

// Number of SMs of a device (cached).
int sm_count(int device);

}  // namespace cuda
}  // namespace fusedopt
