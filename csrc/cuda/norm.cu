// The clipping ops' launchers: total_norm (one partials launch per dtype, one finishing launch),
// scale_ and clamp_ (one launch per dtype). The kernels are in norm_kernel.cuh (also compiled
// for the CPU emulator, emu/); the host side is norm_ops.cpp.
#include "norm_kernel.cuh"

namespace fusedopt {
namespace cuda {
namespace {

using namespace kernels;

int grid_for(const WorkTable& table, int num_sms) {
  const int blocks_max = num_sms * kBlocksPerSm;
  return table.num_chunks < blocks_max ? table.num_chunks : blocks_max;
}

template <typename S>
cudaError_t partials_typed(const WorkTable& table, const NormPartialsArgs& args, int num_sms,
                           cudaStream_t stream) {
  const NormPartialsKernel kernel = norm_partials_kernel_for<S>(args.kind);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  kernel<<<grid_for(table, num_sms), kBlockThreads, 0, stream>>>(table, args);
  return cudaGetLastError();
}

template <typename S>
cudaError_t scale_typed(const WorkTable& table, const ScalarArg& scale, int num_sms,
                        cudaStream_t stream) {
  scale_kernel<S><<<grid_for(table, num_sms), kBlockThreads, 0, stream>>>(table, scale);
  return cudaGetLastError();
}

template <typename S>
cudaError_t clamp_typed(const WorkTable& table, double lo, double hi, int num_sms,
                        cudaStream_t stream) {
  clamp_kernel<S><<<grid_for(table, num_sms), kBlockThreads, 0, stream>>>(table, lo, hi);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_partials(DType dtype, const WorkTable& table, const NormPartialsArgs& args,
                                 int num_sms, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return partials_typed<float>(table, args, num_sms, stream);
    case DType::kFloat64: return partials_typed<double>(table, args, num_sms, stream);
    case DType::kFloat16: return partials_typed<__half>(table, args, num_sms, stream);
    case DType::kBFloat16: return partials_typed<__nv_bfloat16>(table, args, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_norm_finish(const NormFinishArgs& args, cudaStream_t stream) {
  norm_finish_kernel<<<1, kBlockThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_scale(DType dtype, const WorkTable& table, const ScalarArg& scale, int num_sms,
                         cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return scale_typed<float>(table, scale, num_sms, stream);
    case DType::kFloat64: return scale_typed<double>(table, scale, num_sms, stream);
    case DType::kFloat16: return scale_typed<__half>(table, scale, num_sms, stream);
    case DType::kBFloat16: return scale_typed<__nv_bfloat16>(table, scale, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_clamp(DType dtype, const WorkTable& table, double lo, double hi, int num_sms,
                         cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return clamp_typed<float>(table, lo, hi, num_sms, stream);
    case DType::kFloat64: return clamp_typed<double>(table, lo, hi, num_sms, stream);
    case DType::kFloat16: return clamp_typed<__half>(table, lo, hi, num_sms, stream);
    case DType::kBFloat16: return clamp_typed<__nv_bfloat16>(table, lo, hi, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedopt
