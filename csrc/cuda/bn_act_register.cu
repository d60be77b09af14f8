// Registers the CUDA kernels of the fused batch norm + activation operators (declared in
// csrc/schema.cpp; the plain batch-norm operators register in register.cu).
#include <torch/library.h>

#include "bn_act_cuda.h"
#include "launch.cuh"

FUSEDBN_LIBRARY_IMPL(m) {
  m.impl("act_forward_train", FUSEDBN_CUDA_FN(fusedbn::cuda::act_forward_train));
  m.impl("act_forward_eval", FUSEDBN_CUDA_FN(fusedbn::cuda::act_forward_eval));
  m.impl("act_backward", FUSEDBN_CUDA_FN(fusedbn::cuda::act_backward));
}
