#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fusedopt {
namespace cpu {
namespace {

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if defined(__x86_64__) && defined(__GNUC__)
    // __builtin_cpu_supports also checks that the OS saves the ymm/zmm state (XCR0).
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512Bf16:
      return cpu_supports(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
#endif
    default:
      return false;
  }
}

Isa initial_isa() {
  Isa isa = best_supported_isa();
  if (const char* env = std::getenv("FUSEDOPT_CPU_ISA")) {
    if (*env != '\0') {
      // An unknown name or an unsupported ISA is ignored rather than fatal at import time.
      try {
        const Isa wanted = parse_isa(env);
        if (wanted < isa) isa = wanted;
      } catch (const std::exception&) {
      }
    }
  }
  return isa;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

int initial_streams() {
  if (const char* env = std::getenv("FUSEDOPT_CPU_STREAMS")) {
    const std::string value(env);
    if (value == "1" || value == "2") return value[0] - '0';
  }
  return default_streams();
}

std::atomic<int>& streams_slot() {
  static std::atomic<int> slot{initial_streams()};
  return slot;
}

}  // namespace

int default_streams() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();  // idempotent; needed if this runs before the constructors
  if (__builtin_cpu_is("amd")) return 1;
#endif
  return 2;
}

int active_streams() { return streams_slot().load(std::memory_order_relaxed); }

int set_active_streams(int streams) {
  if (streams != 1 && streams != 2) {
    throw std::invalid_argument("CPU kernel streams must be 1 or 2, got " +
                                std::to_string(streams));
  }
  return streams_slot().exchange(streams);
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return isa_scalar::compiled();
    case Isa::kAvx2: return isa_avx2::compiled();
    case Isa::kAvx512: return isa_avx512::compiled();
    case Isa::kAvx512Bf16: return isa_avx512bf16::compiled();
  }
  return false;
}

Isa best_supported_isa() {
  for (Isa isa : kIsasBestFirst) {
    if (isa_compiled(isa) && cpu_supports(isa)) return isa;
  }
  return Isa::kScalar;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : kIsasBestFirst) {
    if (name == isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown CPU ISA '" + name +
                              "' (expected 'avx512bf16', 'avx512', 'avx2' or 'scalar')");
}

Isa set_active_isa(Isa isa) {
  if (!isa_compiled(isa) || !cpu_supports(isa)) {
    throw std::invalid_argument(std::string("CPU ISA '") + isa_name(isa) +
                                "' is not available on this machine/build");
  }
  return static_cast<Isa>(active_slot().exchange(static_cast<int>(isa)));
}

AdamKernel select_adam_kernel(DType dtype, const AdamVariant& variant) {
  switch (active_isa()) {
    case Isa::kAvx512Bf16: return isa_avx512bf16::adam_kernel(dtype, variant);
    case Isa::kAvx512: return isa_avx512::adam_kernel(dtype, variant);
    case Isa::kAvx2: return isa_avx2::adam_kernel(dtype, variant);
    default: return isa_scalar::adam_kernel(dtype, variant);
  }
}

SgdKernel select_sgd_kernel(DType dtype, const SgdVariant& variant) {
  switch (active_isa()) {
    case Isa::kAvx512Bf16: return isa_avx512bf16::sgd_kernel(dtype, variant);
    case Isa::kAvx512: return isa_avx512::sgd_kernel(dtype, variant);
    case Isa::kAvx2: return isa_avx2::sgd_kernel(dtype, variant);
    default: return isa_scalar::sgd_kernel(dtype, variant);
  }
}

}  // namespace cpu
}  // namespace fusedopt
