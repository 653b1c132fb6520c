// SGD with momentum, dampening, Nesterov, weight decay, maximize: one launch updates every
// tensor of one storage dtype. The per-element math is rules::sgd_update
// (csrc/include/fusedopt/rules.h). SGD has no per-tensor scalars, so every thread computes
// the scalars once at the start, reading the lr from device memory when it lives there.
#pragma once

#include "fusedopt/rules.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace kernels {

// Updates elements of one tensor; `apply<N>(e)` handles elements [e, e + N).
template <typename S, bool kMomentum>
struct SgdElements {
  using M = math_t<S>;
  S* param = nullptr;            // parameter (updated)
  const S* grad = nullptr;       // gradient (read only)
  S* momentum_buffer = nullptr;  // momentum buffer (kMomentum only; written, read unless first step)
  rules::SgdScalars<M> s;   // lr, momentum, 1 - dampening, weight decay
  M grad_scale;             // divisor of the gradient when has_grad_scale
  M grad_post;              // then a factor (rules::grad_divisor: 1 unless beyond M's range)
  bool has_grad_scale;      // a GradScaler scale is folded in
  bool maximize;            // negate the gradient
  bool l2;                  // weight_decay != 0
  bool nesterov;            // Nesterov momentum
  rules::Momentum mom;      // kNone / kFirst (buffer = grad) / kRun

  template <int N>
  __device__ __forceinline__ void apply(int64_t e) const {
    Pack<S, N> p = load_pack<N>(param, e);
    const Pack<S, N> g = load_pack<N>(grad, e);
    Pack<S, N> b;
    if constexpr (kMomentum) {
      if (mom == rules::Momentum::kRun) b = load_pack<N>(momentum_buffer, e);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      M pk = to_math(p.v[k]);
      M bk = (kMomentum && mom == rules::Momentum::kRun) ? to_math(b.v[k]) : M(0);
      const M gk = rules::prepare_grad(to_math(g.v[k]), has_grad_scale, grad_scale, maximize,
                                       grad_post);
      rules::sgd_update(pk, gk, bk, s, l2, kMomentum ? mom : rules::Momentum::kNone, nesterov);
      p.v[k] = from_math<S>(pk);
      if constexpr (kMomentum) b.v[k] = from_math<S>(bk);
    }
    store_pack<N>(param, e, p);
    if constexpr (kMomentum) store_pack<N>(momentum_buffer, e, b);
  }
};

// One SGD step over every tensor of `table`.
//   table: device work table with lists param, grad (+ momentum_buffer when kMomentum).
//   args:  hyperparameters, lr / grad scale / found_inf sources (launch.h).
template <typename S, bool kMomentum>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
sgd_kernel(const WorkTable table, const SgdArgs args) {
  using M = math_t<S>;
  if (step_skipped(args.found_inf, args.found_inf_is_double)) return;
  int32_t first, last;
  block_chunk_range(table.num_chunks, first, last);
  if (first >= last) return;

  SgdElements<S, kMomentum> op;
  op.s = rules::cast_scalars<M>(rules::make_sgd_scalars(read_scalar(args.lr), args.momentum,
                                                        args.dampening, args.weight_decay));
  op.has_grad_scale = args.has_grad_scale;
  const rules::GradDivisor<M> scale =
      rules::grad_divisor<M>(args.has_grad_scale ? read_scalar(args.grad_scale) : 1.0);
  op.grad_scale = scale.divisor;
  op.grad_post = scale.post;
  op.maximize = args.maximize;
  op.l2 = args.weight_decay != 0.0;
  op.nesterov = args.nesterov;
  op.mom = rules::momentum_mode(args.momentum, args.is_first_step);
  constexpr int V = kVecElems<S>;

  int32_t current = -1;
  bool vectorize = false;
  int64_t numel = 0;
  for (int32_t c = first; c < last; ++c) {
    const ChunkRef chunk = table.chunks[c];
    if (chunk.tensor != current) {
      current = chunk.tensor;
      op.param = table_ptr<S>(table, kSgdParam, current);
      op.grad = table_ptr<const S>(table, kSgdGrad, current);
      op.momentum_buffer = kMomentum ? table_ptr<S>(table, kSgdMomentumBuffer, current) : nullptr;
      numel = table.numels[current];
      vectorize = aligned16(op.param) && aligned16(op.grad) &&
                  (!kMomentum || aligned16(op.momentum_buffer));
    }
    const int64_t begin = static_cast<int64_t>(chunk.index) * kChunkElems;
    const int64_t end = begin + kChunkElems < numel ? begin + kChunkElems : numel;
    for_each_element<V>(begin, end, vectorize, op);
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace fusedopt
