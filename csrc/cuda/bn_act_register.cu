// Registers the CUDA kernels of the fused batch norm + activation operators (declared in
// csrc/schema.cpp; the plain batch-norm operators register in register.cu).
#include <torch/library.h>

#include "bn_act_cuda.h"

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) {
  m.impl("act_forward_train", TORCH_FN(fusedbn::cuda::act_forward_train));
  m.impl("act_forward_eval", TORCH_FN(fusedbn::cuda::act_forward_eval));
  m.impl("act_backward", TORCH_FN(fusedbn::cuda::act_backward));
}
