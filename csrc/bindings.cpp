// fusedbn._C: the Python module that carries the operator library (schemas in schema.cpp, CUDA
// kernels when they were built) and says how it was built.
#include "eager.h"

#include <pybind11/pybind11.h>

#ifndef FUSEDBN_VERSION
#define FUSEDBN_VERSION "unknown"
#endif
#ifndef FUSEDBN_TORCH_VERSION
#define FUSEDBN_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FUSEDBN_VERSION;
#ifdef FUSEDBN_WITH_CUDA
  info["backends"] = py::make_tuple("cpu", "cuda");
  info["cuda"] = true;
  info["cuda_arch_list"] = FUSEDBN_CUDA_ARCH_LIST;
  info["cuda_version"] = FUSEDBN_CUDA_VERSION;
#else
  info["backends"] = py::make_tuple("cpu");
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
  info["cuda_version"] = py::none();
#endif
  info["torch_version"] = FUSEDBN_TORCH_VERSION;  // the torch it was compiled against
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedbn operator library";
  m.def("build_info", &build_info,
        "How this fusedbn was built: version, compiled backends, CUDA architectures, torch.");
  fusedbn::bind_eager(m);
}
