// The Python module of the emulated op library (built by tests/emu_testing.py): the emulator's
// configuration and counters, and the deliberately broken kernels of broken_kernels.cu. Loading
// it registers the emulated CUDA ops as torch.ops.fusedbn_emu.* on the CPU key.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "emu_runtime.h"

namespace fusedbn_emu {
std::vector<float> run_broken_kernel(const std::string& name);  // broken_kernels.cpp
std::vector<std::string> broken_kernel_names();
at::Tensor run_tensor_kernel(const std::string& name, const at::Tensor& x);
}  // namespace fusedbn_emu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedbn_emu;
  m.doc() = "fusedbn's CUDA kernels compiled for the CPU emulation of CUDA (tests only)";
  m.def("set_sm_count", [](int n) {
    TORCH_CHECK(n >= 1, "fusedbn_emu: the SM count must be positive, got ", n);
    config().sm_count = n;
  });
  m.def("set_blocks_per_sm", [](int n) {
    TORCH_CHECK(n >= 0, "fusedbn_emu: blocks per SM must be >= 0 (0: the occupancy model), got ",
                n);
    config().blocks_per_sm = n;
  });
  m.def("set_force_index64", [](bool on) { config().force_index64 = on; });
  m.def("set_persistent", [](bool on) { config().persistent = on; });
  m.def("set_seed", [](uint64_t seed) { set_seed(seed); });
  m.def("config", [] {
    const Config& c = config();
    return pybind11::dict(pybind11::arg("sm_count") = c.sm_count,
                          pybind11::arg("blocks_per_sm") = c.blocks_per_sm,
                          pybind11::arg("force_index64") = c.force_index64,
                          pybind11::arg("persistent") = c.persistent);
  });
  m.def("stats", [] {
    const Stats& s = stats();
    return pybind11::dict(pybind11::arg("launches") = s.launches,
                          pybind11::arg("blocks") = s.blocks,
                          pybind11::arg("threads") = s.threads);
  });
  m.def("reset_stats", [] { stats() = Stats{}; });
  m.def("set_traffic", [](bool on) { traffic_set_enabled(on); },
        "Turns the traffic counter (emu_traffic.cpp) on or off.");
  m.def("take_traffic", [] {
    namespace py = pybind11;
    auto dir = [](const TrafficDir& d) {
      return py::dict(py::arg("bytes") = d.bytes, py::arg("accesses") = d.accesses,
                      py::arg("sectors") = d.sectors, py::arg("ideal") = d.ideal);
    };
    auto d3 = [](dim3 v) { return py::make_tuple(v.x, v.y, v.z); };
    py::list calls;
    for (const TrafficCall& c : traffic_take()) {
      py::list allocs, launches;
      for (const TrafficAlloc& a : c.allocs) {
        allocs.append(py::dict(py::arg("ptr") = static_cast<uint64_t>(a.base),
                               py::arg("bytes") = a.bytes, py::arg("arg") = a.arg,
                               py::arg("live_at_end") = a.live_at_end));
      }
      for (const TrafficLaunch& l : c.launches) {
        py::dict tensors;
        for (const auto& kv : l.tensors) {
          const TrafficTensor& t = kv.second;
          tensors[py::int_(kv.first)] = py::dict(
              py::arg("read") = dir(t.dir[0]), py::arg("write") = dir(t.dir[1]),
              py::arg("block_min") = t.block_min, py::arg("block_max") = t.block_max,
              py::arg("blocks_touching") = t.blocks_touching);
        }
        launches.append(py::dict(py::arg("kernel") = l.kernel, py::arg("grid") = d3(l.grid),
                                 py::arg("block") = d3(l.block), py::arg("blocks") = l.blocks,
                                 py::arg("tensors") = tensors));
      }
      calls.append(py::dict(py::arg("op") = c.op, py::arg("allocs") = allocs,
                            py::arg("launches") = launches));
    }
    return calls;
  }, "The op calls the traffic counter recorded since the last call (and forgets them).");
  m.def("run_broken_kernel", &run_broken_kernel, pybind11::arg("name"),
        "Launches one of the deliberately broken kernels; raises the emulator's error.");
  m.def("broken_kernel_names", &broken_kernel_names);
  m.def("run_tensor_kernel", &run_tensor_kernel, pybind11::arg("name"), pybind11::arg("x"),
        "Runs one of the element-wise kernels of broken_kernels.cpp over x as an emulated op "
        "would (poisoned allocations, guarded input).");
}
