// Baseline variant of the CPU kernels (see kernels_impl.h). Compiled for the build's default target (SSE2 on x86-64), runs anywhere.
// Headers are included BEFORE switching the target so that only our own code is compiled
// for it; the ISA is selected at run time (isa.cpp), never with -march at build time.
#include <cstdint>
#include <type_traits>

#include "kernels.h"
#include "storage.h"

#define FUSEDOPT_ISA_NS isa_scalar
#include "kernels_impl.h"
