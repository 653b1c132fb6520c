// Storage types of the CPU kernels: how an element is loaded into its math type and rounded
// back on store. fp32/fp64 compute in their own precision; bf16/fp16 compute in fp32.
//
// The 16-bit conversions are written with integer/bit operations and selects only (no
// branches, no libm, no F16C intrinsics) so that GCC auto-vectorises them inside the
// per-ISA kernel loops. Rounding is round-to-nearest-even, matching c10::BFloat16/c10::Half.
#pragma once

#include <cstdint>

#include "fusedopt/rules.h"  // FUSEDOPT_HD

namespace fusedopt {
namespace cpu {

FUSEDOPT_HD float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
FUSEDOPT_HD uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

struct Fp32 {
  using raw = float;
  using math = float;
  FUSEDOPT_HD static math load(raw x) { return x; }
  FUSEDOPT_HD static raw store(math x) { return x; }
};

struct Fp64 {
  using raw = double;
  using math = double;
  FUSEDOPT_HD static math load(raw x) { return x; }
  FUSEDOPT_HD static raw store(math x) { return x; }
};

// bfloat16: the top half of an fp32.
struct Bf16 {
  using raw = uint16_t;
  using math = float;
  FUSEDOPT_HD static math load(raw x) { return bits_to_float(uint32_t(x) << 16); }
  FUSEDOPT_HD static raw store(math f) {
    const uint32_t u = float_to_bits(f);
    // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return static_cast<raw>(is_nan ? 0x7fc0u : rounded);  // canonical quiet NaN, as c10
  }
};

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
struct Fp16 {
  using raw = uint16_t;
  using math = float;
  FUSEDOPT_HD static math load(raw x) {
    const uint32_t h = x;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t mag = h & 0x7fffu;  // exponent and mantissa
    // Normal numbers: shift into place and rebias the exponent (15 -> 127: + 112 << 23).
    const uint32_t normal = (mag << 13) + 0x38000000u;
    // Inf/NaN: all-ones exponent, mantissa (NaN payload) kept.
    const uint32_t inf_nan = (mag << 13) | 0x7f800000u;
    // Subnormals (and zero): mantissa * 2^-24, exact in fp32 and never an fp32 denormal,
    // so this is also right when denormals are flushed (torch.set_flush_denormal).
    const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(mag)) *
                                             0x1p-24f);
    const uint32_t bits = mag >= 0x7c00u ? inf_nan : (mag >= 0x0400u ? normal : subnormal);
    return bits_to_float(bits | sign);
  }
  FUSEDOPT_HD static raw store(math f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;  // |f|
    // Normal range (|f| >= 2^-14): round the mantissa to 10 bits (ties to even), rebias the
    // exponent; a carry out of the mantissa correctly bumps the exponent, up to infinity.
    uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
    normal = normal > 0x7c00u ? 0x7c00u : normal;  // overflow -> inf
    // Subnormal range: adding 0.5f puts the binary16 subnormal ulp (2^-24) at the fp32 ulp,
    // so the FPU's own round-to-nearest-even does the rounding.
    const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
    const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    const uint32_t bits =
        a > 0x7f800000u ? nan : (a >= 0x38800000u ? normal : subnormal);
    return static_cast<raw>(bits | sign);
  }
};

}  // namespace cpu
}  // namespace fusedopt
