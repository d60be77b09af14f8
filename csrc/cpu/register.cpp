// Registers the CPU kernels with the dispatcher. Compiled once, with the portable flags, and linked
// into every variant (fusedbn._cpu_default, fusedbn._cpu_avx2; see CPU_ONCE in setup.py): it only
// takes the addresses of the variant's kernels, so it gains nothing from AVX2, and its template
// instantiations (the boxing wrappers of ten signatures) are a large unit to compile twice.
// The Python module of a variant is module.cpp.
#include "bn_act.h"
#include "kernels.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward_train", &fusedbn::cpu::forward_train);
  m.impl("forward_train_update", &fusedbn::cpu::forward_train_update);
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
