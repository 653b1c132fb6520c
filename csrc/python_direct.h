// Direct Python entry points of the CPU kernels (see python_direct.cpp).
#pragma once

#include <torch/extension.h>

namespace fusedopt {

void bind_direct_calls(pybind11::module& m);

}  // namespace fusedopt
