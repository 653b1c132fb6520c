// Adam / AMSGrad / AdamW: the kernel (launched by adam.cu; also compiled for the CPU by emu/).
//
// The per-element math is rules::adam_update (csrc/include/fusedopt/rules.h); the per-tensor
// scalars (bias corrections, step size) come from rules::make_adam_scalars, evaluated in double
// on the device by thread 0 of each block, once per tensor the block touches, from that
// tensor's step counter (incremented here, see finish_tensor in multi_tensor.cuh) and the lr
// (a float, or read from device memory).
#pragma once

#include "fusedopt/rules.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {
namespace kernels {

// Updates elements of one tensor; `apply<N>(e)` handles elements [e, e + N).
template <typename S, bool kAmsgrad>
struct AdamElements {
  using M = math_t<S>;
  S* param = nullptr;            // parameter (updated)
  const S* grad = nullptr;       // gradient (read only)
  S* exp_avg = nullptr;          // first moment (updated)
  S* exp_avg_sq = nullptr;       // second moment (updated)
  S* max_exp_avg_sq = nullptr;   // running max of the second moment (AMSGrad only)
  rules::AdamScalars<M> s;    // this tensor's scalars for this step
  M grad_scale;               // divisor of the gradient when has_grad_scale
  M grad_post;                // then a factor (rules::grad_divisor: 1 unless beyond M's range)
  bool has_grad_scale;        // a GradScaler scale is folded in
  bool maximize;              // negate the gradient
  rules::WeightDecay wd;      // kind of weight decay

  template <int N>
  __device__ __forceinline__ void apply(int64_t e) const {
    Pack<S, N> p = load_pack<N>(param, e);
    const Pack<S, N> g = load_pack<N>(grad, e);
    Pack<S, N> m = load_pack<N>(exp_avg, e);
    Pack<S, N> v = load_pack<N>(exp_avg_sq, e);
    Pack<S, N> vmax;
    if constexpr (kAmsgrad) vmax = load_pack<N>(max_exp_avg_sq, e);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      M pk = to_math(p.v[k]), mk = to_math(m.v[k]), vk = to_math(v.v[k]);
      M vmaxk = kAmsgrad ? to_math(vmax.v[k]) : M(0);
      const M gk = rules::prepare_grad(to_math(g.v[k]), has_grad_scale, grad_scale, maximize,
                                       grad_post);
      rules::adam_update(pk, gk, mk, vk, vmaxk, s, wd, kAmsgrad);
      p.v[k] = from_math<S>(pk);
      m.v[k] = from_math<S>(mk);
      v.v[k] = from_math<S>(vk);
      if constexpr (kAmsgrad) vmax.v[k] = from_math<S>(vmaxk);
    }
    store_pack<N>(param, e, p);
    store_pack<N>(exp_avg, e, m);
    store_pack<N>(exp_avg_sq, e, v);
    if constexpr (kAmsgrad) store_pack<N>(max_exp_avg_sq, e, vmax);
  }
};

// Thread 0's per-tensor setup. Not inlined: the double-precision pow() needs many registers,
// and inlined they would count against the element loop's register budget.
template <typename M>
__device__ __noinline__ void compute_scalars(const AdamArgs& args, float step,
                                             rules::AdamScalars<M>* out) {
  *out = rules::cast_scalars<M>(rules::make_adam_scalars(read_scalar(args.lr), args.beta1,
                                                         args.beta2, args.eps,
                                                         args.weight_decay, step));
}

// One Adam step over every tensor of `table`.
//   table: device work table with lists param, grad, exp_avg, exp_avg_sq, step
//          (+ max_exp_avg_sq when kAmsgrad); steps are float32 scalars.
//   args:  hyperparameters, lr / grad scale / found_inf sources (launch.h).
template <typename S, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
adam_kernel(const WorkTable table, const AdamArgs args) {
  using M = math_t<S>;
  if (step_skipped(args.found_inf, args.found_inf_is_double)) return;
  int32_t first, last;
  block_chunk_range(table.num_chunks, first, last);
  if (first >= last) return;

  __shared__ rules::AdamScalars<M> tensor_scalars;  // written by thread 0 per tensor
  AdamElements<S, kAmsgrad> op;
  op.has_grad_scale = args.has_grad_scale;
  const rules::GradDivisor<M> scale =
      rules::grad_divisor<M>(args.has_grad_scale ? read_scalar(args.grad_scale) : 1.0);
  op.grad_scale = scale.divisor;
  op.grad_post = scale.post;
  op.maximize = args.maximize;
  op.wd = static_cast<rules::WeightDecay>(args.weight_decay_mode);
  constexpr int V = kVecElems<S>;

  // Thread 0's bookkeeping for the tensor being worked on.
  int32_t current = -1;   // tensor index
  uint32_t finished = 0;  // chunks of it this block finished
  float new_step = 0.f;   // its step after this launch
  bool vectorize = false;
  int64_t numel = 0;

  for (int32_t c = first; c < last; ++c) {
    const ChunkRef chunk = table.chunks[c];
    if (chunk.tensor != current) {
      __syncthreads();  // the whole block is done with the previous tensor
      if (threadIdx.x == 0) {
        if (current >= 0) {
          finish_tensor(table.done, current, finished, chunks_of(table.numels[current]),
                        table_ptr<float>(table, kAdamStep, current), new_step);
        }
        new_step = __ldcg(table_ptr<float>(table, kAdamStep, chunk.tensor)) + 1.0f;
        compute_scalars(args, new_step, &tensor_scalars);
      }
      current = chunk.tensor;
      finished = 0;
      op.param = table_ptr<S>(table, kAdamParam, current);
      op.grad = table_ptr<const S>(table, kAdamGrad, current);
      op.exp_avg = table_ptr<S>(table, kAdamExpAvg, current);
      op.exp_avg_sq = table_ptr<S>(table, kAdamExpAvgSq, current);
      op.max_exp_avg_sq = kAmsgrad ? table_ptr<S>(table, kAdamMaxExpAvgSq, current) : nullptr;
      numel = table.numels[current];
      vectorize = aligned16(op.param) && aligned16(op.grad) && aligned16(op.exp_avg) &&
                  aligned16(op.exp_avg_sq) && (!kAmsgrad || aligned16(op.max_exp_avg_sq));
      __syncthreads();  // tensor_scalars is ready
      op.s = tensor_scalars;
    }
    const int64_t begin = static_cast<int64_t>(chunk.index) * kChunkElems;
    const int64_t end = begin + kChunkElems < numel ? begin + kChunkElems : numel;
    for_each_element<V>(begin, end, vectorize, op);
    ++finished;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    finish_tensor(table.done, current, finished, chunks_of(numel),
                  table_ptr<float>(table, kAdamStep, current), new_step);
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace fusedopt
