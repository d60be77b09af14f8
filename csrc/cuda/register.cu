// Registers the CUDA kernels of the fusedbn operators (declared once in csrc/schema.cpp). A build
// without CUDA does not compile this file, and the dispatcher then reports the missing backend.
// The emulated build (csrc/cuda/emu/) registers the same kernels as fusedbn_emu on the CPU key
// (FUSEDBN_LIBRARY_IMPL, launch.cuh).
#include <torch/library.h>

#include "bn_cuda_ops.h"
#include "launch.cuh"

FUSEDBN_LIBRARY_IMPL(m) {
  m.impl("forward_train", FUSEDBN_CUDA_FN(fusedbn::cuda::forward_train));
  m.impl("forward_eval", FUSEDBN_CUDA_FN(fusedbn::cuda::forward_eval));
  m.impl("backward", FUSEDBN_CUDA_FN(fusedbn::cuda::backward));
  // Writes running_mean and running_var (arguments 0 and 1) in place.
  m.impl("update_running_stats",
         FUSEDBN_CUDA_FN_MUTATING(fusedbn::cuda::update_running_stats, 0b11));
  m.impl("batch_stats", FUSEDBN_CUDA_FN(fusedbn::cuda::batch_stats));
  m.impl("backward_reduce", FUSEDBN_CUDA_FN(fusedbn::cuda::backward_reduce));
  m.impl("backward_elemt", FUSEDBN_CUDA_FN(fusedbn::cuda::backward_elemt));
}
