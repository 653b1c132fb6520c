// Baseline variant of the clipping kernels (see norm_kernels_impl.h): the build's default target.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "norm_kernels.h"
#include "storage.h"

#define FUSEDOPT_ISA_NS isa_scalar
#include "norm_kernels_impl.h"
