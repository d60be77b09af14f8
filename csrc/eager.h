// The eager batch-norm entry point of fusedbn._C (csrc/eager.cpp), bound by bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedbn {

// Adds batch_norm (the modules' eager path) and set_double_backward to the module.
void bind_eager(pybind11::module_& m);

}  // namespace fusedbn
