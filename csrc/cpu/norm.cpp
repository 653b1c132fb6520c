// CPU implementations of the gradient-clipping ops (schemas registered here, as a fragment of
// the fusedopt library, so that csrc/ops.cpp stays the optimizers' file):
//
//   fusedopt::total_norm(Tensor[] tensors, float norm_type, Tensor? prescale=None) -> Tensor
//       The norm_type-norm of all tensors seen as one vector (torch.nn.utils.get_total_norm),
//       as a 0-dim tensor: float64 if any input is float64, else float32. Every element is read
//       exactly once, in one parallel region over all tensors, whatever their dtypes. With
//       `prescale` (a one-element CPU tensor), the norm of prescale * x: each element is
//       multiplied in its math type before its term is taken, as GradScaler's unscale_ would
//       rewrite it (the optimizers pass 1 / scale: the norm of the unscaled gradients, in range
//       however large the scale).
//   fusedopt::scale_(Tensor(a!)[] tensors, Tensor scale) -> ()
//       tensors[i] *= scale for every tensor, in one parallel region; nothing at all when
//       scale == 1 (x * 1 == x bit for bit, so skipping is exact). `scale` is a 0-dim CPU tensor.
//   fusedopt::clamp_(Tensor(a!)[] tensors, float min, float max) -> ()
//       tensors[i].clamp_(min, max) for every tensor, in one parallel region (NaN stays NaN).
//
// Work split: every tensor is cut into chunks of kChunkElems elements, and the threads take
// contiguous ranges of the chunk list. total_norm keeps one partial result per chunk and
// combines them in chunk order on one thread, so its result does not depend on the number of
// threads. The per-chunk kernels (norm_kernels_impl.h) are compiled per ISA and chosen at run
// time (isa.h), like the optimizer kernels.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "fusedopt/norm.h"
#include "isa.h"
#include "list_overlap.h"
#include "norm_kernels.h"
#include "op_common.h"
#include "ops_cpu.h"

namespace fusedopt {
namespace cpu {
namespace {

constexpr int64_t kChunkElems = 16384;  // elements per chunk (per partial result)
constexpr int64_t kSerialBytes = 256 * 1024;  // below this a call runs on the calling thread

using norm::Kind;

// ---- the kernels of the ISA chosen at run time ----------------------------------------------

NormChunkFn norm_kernel(DType dtype, Kind kind) {
  switch (active_isa()) {
    case Isa::kAvx512Bf16: return isa_avx512bf16::norm_chunk_kernel(dtype, kind);
    case Isa::kAvx512: return isa_avx512::norm_chunk_kernel(dtype, kind);
    case Isa::kAvx2: return isa_avx2::norm_chunk_kernel(dtype, kind);
    default: return isa_scalar::norm_chunk_kernel(dtype, kind);
  }
}

ScaleChunkFn scale_kernel(DType dtype) {
  switch (active_isa()) {
    case Isa::kAvx512Bf16: return isa_avx512bf16::scale_chunk_kernel(dtype);
    case Isa::kAvx512: return isa_avx512::scale_chunk_kernel(dtype);
    case Isa::kAvx2: return isa_avx2::scale_chunk_kernel(dtype);
    default: return isa_scalar::scale_chunk_kernel(dtype);
  }
}

ClampChunkFn clamp_kernel(DType dtype) {
  switch (active_isa()) {
    case Isa::kAvx512Bf16: return isa_avx512bf16::clamp_chunk_kernel(dtype);
    case Isa::kAvx512: return isa_avx512::clamp_chunk_kernel(dtype);
    case Isa::kAvx2: return isa_avx2::clamp_chunk_kernel(dtype);
    default: return isa_scalar::clamp_chunk_kernel(dtype);
  }
}

// Merges the partial results of two chunks (a NaN partial makes a max/min NaN, as in torch).
double combine_runtime(Kind k, double a, double b) { return norm::merge(k, a, b); }

// ---- work list ----------------------------------------------------------------------------

struct Chunk {
  char* data;      // first element of the chunk
  int64_t numel;
  DType dtype;
  int64_t tensor;  // index of its tensor in the op's list
};

// Cuts every tensor into chunks. Tensors whose elements are not one dense block (e.g. a
// slice) are read from a contiguous copy kept in `temporaries`; callers that write must not
// pass such tensors (they handle them separately).
class ChunkList {
 public:
  void add(const at::Tensor& t, DType dtype, int64_t index) {
    const int64_t n = t.numel();
    if (n == 0) return;
    at::Tensor src = t;
    if (!t.is_non_overlapping_and_dense()) {
      src = t.contiguous();
      temporaries_.push_back(src);
    }
    char* base = static_cast<char*>(src.data_ptr());
    const int64_t size = element_size(dtype);
    for (int64_t begin = 0; begin < n; begin += kChunkElems) {
      chunks_.push_back({base + begin * size, std::min(kChunkElems, n - begin), dtype, index});
    }
    bytes_ += n * size;
  }
  const std::vector<Chunk>& chunks() const { return chunks_; }

  // Runs fn(chunk_index) for every chunk: on this thread for small calls, else in one
  // parallel region, each thread taking a contiguous range of chunks.
  template <class Fn>
  void for_each(Fn&& fn) const {
    const int64_t n = static_cast<int64_t>(chunks_.size());
    if (n == 0) return;
    if (bytes_ < kSerialBytes) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) fn(c);
    });
  }

 private:
  std::vector<Chunk> chunks_;
  std::vector<at::Tensor> temporaries_;
  int64_t bytes_ = 0;
};

void check_tensor(const at::Tensor& t, const char* op, size_t i, bool written) {
  TORCH_CHECK(t.defined(), "fusedopt::", op, ": tensors[", i, "] is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt::", op, ": tensors[", i, "] is ",
              t.layout(), "; sparse tensors are not supported");
  TORCH_CHECK(t.device().is_cpu(), "fusedopt::", op, ": tensors[", i, "] is on ", t.device(),
              "; this implementation needs CPU tensors");
  if (written) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fusedopt::", op,
                ": tensors[", i, "] has elements that share memory and cannot be updated in place");
  }
}

// ---- ops ----------------------------------------------------------------------------------

}  // namespace

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type,
                          const std::optional<at::Tensor>& prescale) {
  const Kind kind = norm::kind_of(norm_type);
  const double factor = read_scalar(prescale, "total_norm", "prescale").value_or(1.0);
  bool any_double = false;
  ChunkList list;
  std::vector<NormChunkFn> fns;  // per chunk
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], "total_norm", i, /*written=*/false);
    const DType dtype = dtype_of(tensors[i], "total_norm", "tensors", i);
    any_double = any_double || dtype == DType::kDouble;
    list.add(tensors[i], dtype, static_cast<int64_t>(i));
  }
  const std::vector<Chunk>& chunks = list.chunks();
  fns.reserve(chunks.size());
  for (const Chunk& c : chunks) {
    fns.push_back(norm_kernel(c.dtype, kind));
  }
  std::vector<double> partials(chunks.size());
  list.for_each([&](int64_t c) {
    partials[c] = fns[c](chunks[c].data, chunks[c].numel, norm_type, factor);
  });

  double total = norm::identity<double>(kind);
  if (kind == Kind::kL0) {
    // torch takes the norm of the per-tensor norms: for p = 0 that counts the tensors with a
    // nonzero (or NaN) element, not the elements.
    std::vector<double> per_tensor(tensors.size(), 0.0);
    for (size_t c = 0; c < chunks.size(); ++c) per_tensor[chunks[c].tensor] += partials[c];
    for (double v : per_tensor) total += v != 0.0 ? 1.0 : 0.0;
  } else {
    for (double v : partials) total = combine_runtime(kind, total, v);
  }
  const double value = norm::finish(kind, total, norm_type);
  if (any_double) return at::scalar_tensor(value, at::TensorOptions().dtype(at::kDouble));
  // Rounded to float32 here: a total beyond the float32 range (the partials are combined in
  // double, so it can exceed it while every partial did not) becomes inf, as torch's norm,
  // where at::scalar_tensor would refuse the double.
  return at::scalar_tensor(static_cast<float>(value), at::TensorOptions().dtype(at::kFloat));
}

namespace {

// Applies fn(chunk) to every element chunk of tensors [begin, end) (of dtypes[i]) in one
// parallel region. Tensors that are not one dense block are rewritten through a contiguous
// copy, copied back after the region, so that every element goes through the same kernel (the
// same rounding).
template <class ChunkFn>
void update_range(at::TensorList tensors, const std::vector<DType>& dtypes, size_t begin,
                  size_t end, ChunkFn& fn) {
  ChunkList list;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, contiguous copy)
  for (size_t i = begin; i < end; ++i) {
    const DType dtype = dtypes[i];
    if (tensors[i].is_non_overlapping_and_dense()) {
      list.add(tensors[i], dtype, static_cast<int64_t>(i));
    } else {
      copy_back.emplace_back(tensors[i], tensors[i].contiguous());
      list.add(copy_back.back().second, dtype, static_cast<int64_t>(i));
    }
  }
  const std::vector<Chunk>& chunks = list.chunks();
  list.for_each([&](int64_t c) { fn(chunks[c]); });
  for (auto& [original, work] : copy_back) const_cast<at::Tensor&>(original).copy_(work);
}

// Applies fn(chunk) to every element of `tensors`: in one parallel region, or, when two of the
// tensors share memory (list_overlap.h), one tensor after the other in list order, as torch's
// ops do (an element listed twice is rewritten twice, never by two threads at once).
template <class ChunkFn>
void update_in_place(at::TensorList tensors, const char* op, ChunkFn&& fn) {
  std::vector<DType> dtypes;
  dtypes.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], op, i, /*written=*/true);
    dtypes.push_back(dtype_of(tensors[i], op, "tensors", i));
  }
  if (!any_two_share_memory(tensors)) {
    update_range(tensors, dtypes, 0, tensors.size(), fn);
    return;
  }
  for (size_t i = 0; i < tensors.size(); ++i) update_range(tensors, dtypes, i, i + 1, fn);
}

}  // namespace

void scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "fusedopt::scale_: scale must have one element, got shape ",
              scale.sizes());
  TORCH_CHECK(scale.device().is_cpu(), "fusedopt::scale_: scale is on ", scale.device(),
              "; the CPU implementation reads it on the host and needs a CPU tensor");
  const double value = scale.item<double>();
  if (value == 1.0) {  // exact no-op; still validate so that bad input fails the same way
    for (size_t i = 0; i < tensors.size(); ++i) {
      check_tensor(tensors[i], "scale_", i, true);
      dtype_of(tensors[i], "scale_", "tensors", i);
    }
    return;
  }
  update_in_place(tensors, "scale_",
                  [&](const Chunk& c) { scale_kernel(c.dtype)(c.data, c.numel, value); });
  bump_versions(tensors);
}

namespace {

void clamp_cpu(at::TensorList tensors, double min, double max) {
  update_in_place(tensors, "clamp_",
                  [&](const Chunk& c) { clamp_kernel(c.dtype)(c.data, c.numel, min, max); });
  bump_versions(tensors);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("total_norm(Tensor[] tensors, float norm_type, Tensor? prescale=None) -> Tensor");
  m.def("scale_(Tensor(a!)[] tensors, Tensor scale) -> ()");
  m.def("clamp_(Tensor(a!)[] tensors, float min, float max) -> ()");
}

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clamp_", &clamp_cpu);
}

// Sparse tensors reach the kernels only to be refused with a clear error (check_tensor), instead
// of the dispatcher's "Could not run 'fusedopt::total_norm' with arguments from the 'SparseCPU'
// backend" (the optimizer ops do the same).
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clamp_", &clamp_cpu);
}

TORCH_LIBRARY_IMPL(fusedopt, SparseCsrCPU, m) {
  m.impl("total_norm", &total_norm_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clamp_", &clamp_cpu);
}

}  // namespace cpu
}  // namespace fusedopt
