// Checks the identity behind the CPU kernels' grad-scale division (csrc/cpu/kernels_impl.h,
// divide_block): for float a, d with y = 1/d correctly rounded and q0 = a*y,
//     fma(fma(-q0, d, a), y, q0) == a / d        (bit for bit)
// whenever |a| and |q0| lie in [2^-100, 2^100] (Markstein's theorem; outside that range the
// kernels divide). For each divisor, every one of the 2^23 significands of a is tried, at a
// random exponent. Divisors: significands next to 1 and next to 2 (the hardest cases for a
// reciprocal), then random ones, at random exponents.
//
//   g++ -O2 -mfma -o rd reciprocal_division.cpp && ./rd DIVISORS SEED
// exits 1 (and prints the first mismatches) if the identity fails anywhere.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

int main(int argc, char** argv) {
  const int divisors = argc > 1 ? std::atoi(argv[1]) : 16;
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1);
  long checked = 0, wrong = 0;
  for (int t = 0; t < divisors; ++t) {
    const uint32_t edge = (t / 2) & 0x7fffffu;
    const uint32_t significand = t < 32 ? ((t & 1) ? 0x7fffffu - edge : edge) : (rng() & 0x7fffffu);
    const float d = std::ldexp(from_bits(0x3f800000u | significand), int(rng() % 160) - 80);
    const float y = 1.0f / d;
    const int exponent = int(rng() % 160) - 80;
    for (uint32_t m = 0; m < (1u << 23); ++m) {
      const float a = std::ldexp(from_bits(0x3f800000u | m), exponent);
      const float q0 = a * y;
      const float abs_q0 = std::fabs(q0);
      if (!(abs_q0 >= 0x1p-100f && abs_q0 <= 0x1p100f)) continue;  // the kernels divide
      const float q = std::fma(std::fma(-q0, d, a), y, q0);
      ++checked;
      if (to_bits(q) != to_bits(a / d)) {
        if (wrong++ < 5) std::printf("mismatch: a=%a d=%a a/d=%a fma result=%a\n", a, d, a / d, q);
      }
    }
  }
  std::printf("%ld quotients checked, %ld wrong\n", checked, wrong);
  return wrong == 0 ? 0 : 1;
}
