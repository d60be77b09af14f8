// Registers the CUDA kernels of the fusedbn operators (declared once in csrc/schema.cpp). A build
// without CUDA does not compile this file, and the dispatcher then reports the missing backend.
#include <torch/library.h>

#include "bn_cuda_ops.h"

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) {
  m.impl("forward_train", TORCH_FN(fusedbn::cuda::forward_train));
  m.impl("forward_eval", TORCH_FN(fusedbn::cuda::forward_eval));
  m.impl("backward", TORCH_FN(fusedbn::cuda::backward));
  m.impl("update_running_stats", TORCH_FN(fusedbn::cuda::update_running_stats));
  m.impl("batch_stats", TORCH_FN(fusedbn::cuda::batch_stats));
  m.impl("backward_reduce", TORCH_FN(fusedbn::cuda::backward_reduce));
  m.impl("backward_elemt", TORCH_FN(fusedbn::cuda::backward_elemt));
}
