// SGD: the launcher. One launch updates every tensor of one storage dtype of a call;
// the kernel itself is in sgd_kernel.cuh (also compiled for the CPU emulator, emu/).
#include "sgd_kernel.cuh"

namespace fusedopt {
namespace cuda {
namespace {

using namespace kernels;

template <typename S, bool kMomentum>
cudaError_t launch_typed(const WorkTable& table, const SgdArgs& args, int num_sms,
                         cudaStream_t stream) {
  const int blocks_max = num_sms * kBlocksPerSm;
  const int blocks = table.num_chunks < blocks_max ? table.num_chunks : blocks_max;
  sgd_kernel<S, kMomentum><<<blocks, kBlockThreads, 0, stream>>>(table, args);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dtype(const WorkTable& table, const SgdArgs& args, int num_sms,
                         cudaStream_t stream) {
  return args.momentum != 0.0 ? launch_typed<S, true>(table, args, num_sms, stream)
                              : launch_typed<S, false>(table, args, num_sms, stream);
}

}  // namespace

cudaError_t launch_sgd(DType dtype, const WorkTable& table, const SgdArgs& args, int num_sms,
                       cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_dtype<float>(table, args, num_sms, stream);
    case DType::kFloat64: return launch_dtype<double>(table, args, num_sms, stream);
    case DType::kFloat16: return launch_dtype<__half>(table, args, num_sms, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(table, args, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedopt
