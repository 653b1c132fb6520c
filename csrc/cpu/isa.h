// Run-time choice of the CPU kernel variant.
#pragma once

#include <string>

#include "kernels.h"

namespace fusedopt {
namespace cpu {

// Best variant that is both compiled in and supported by this CPU (and OS), capped by the
// FUSEDOPT_CPU_ISA environment variable ("avx512bf16", "avx512", "avx2", "scalar") if set at
// load time.
Isa active_isa();
// Best variant this machine could run (ignores the override).
Isa best_supported_isa();
bool isa_compiled(Isa isa);
const char* isa_name(Isa isa);
// Parses an isa_name(); throws on anything else.
Isa parse_isa(const std::string& name);
// Forces a variant (tests use it to exercise every variant on one machine). Throws if the
// variant is not compiled or not supported here. Returns the previous choice.
Isa set_active_isa(Isa isa);

}  // namespace cpu
}  // namespace fusedopt
