// Registers the CPU kernels and makes this build variant importable as a Python module
// (fusedbn._cpu_default or fusedbn._cpu_avx2; fusedbn/_ext.py imports exactly one of them).
#include "bn_act.h"
#include "kernels.h"

#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward_train", &fusedbn::cpu::forward_train);
  m.impl("forward_eval", &fusedbn::cpu::forward_eval);
  m.impl("backward", &fusedbn::cpu::backward);
  m.impl("update_running_stats", &fusedbn::cpu::update_running_stats);
  m.impl("batch_stats", &fusedbn::cpu::batch_stats);
  m.impl("backward_reduce", &fusedbn::cpu::backward_reduce);
  m.impl("backward_elemt", &fusedbn::cpu::backward_elemt);
  m.impl("act_forward_train", &fusedbn::cpu::act_forward_train);
  m.impl("act_forward_eval", &fusedbn::cpu::act_forward_eval);
  m.impl("act_backward", &fusedbn::cpu::act_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedbn CPU kernels (one instruction-set variant)";
#if defined(CPU_CAPABILITY_AVX2)
  m.attr("variant") = "avx2";
#else
  m.attr("variant") = "default";
#endif
}
