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

// How many sub-ranges the optimizer kernels walk side by side (1 or 2; kernels_impl.h,
// for_each_index). The better count depends on the machine's prefetchers
// (benchmarks/stream_count.cpp): 2 on the Intel Xeon VM measured (~15% faster than 1 on
// GPT-2-sized AdamW there), 1 on the AMD EPYC (Zen 4) VM (1-10% faster there), so the default
// is 1 on AMD CPUs and 2 elsewhere. FUSEDOPT_CPU_STREAMS=1|2 at load time overrides it (other
// values are ignored, like FUSEDOPT_CPU_ISA's).
int active_streams();
int default_streams();
// Sets the count (tests and benchmarks compare both in one process); throws unless 1 or 2.
// Returns the previous count.
int set_active_streams(int streams);

}  // namespace cpu
}  // namespace fusedopt
