// Internal interface between the parts of the CUDA emulation's runtime (emu_runtime.cpp,
// emu_hooks.cpp, emu_memory.cpp, emu_module.cpp); the sources see emu.h only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "emu.h"

namespace fusedbn_emu {

struct Config {
  int sm_count = 132;       // H100 SXM
  int blocks_per_sm = 0;    // 0: the occupancy model of blocks_per_sm()
  bool force_index64 = false;
};
Config& config();

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0;
};
Stats& stats();

void set_seed(uint64_t seed);

[[noreturn]] void throw_error(const std::string& msg);
std::string kernel_name(const void* kernel);

// The arena whose accesses the instrumentation reports to shared_access (nullptr: none).
void set_arena_active(unsigned char* lo, size_t bytes);
void shared_access(uintptr_t offset, size_t n, bool write);
void report_undefined_behaviour(const std::string& msg);

// Errors found outside a launch (a guard zone written, undefined behaviour in host code): raised
// by the op that is running or by the next one.
void add_pending_error(const std::string& msg);
std::string take_pending_errors();

}  // namespace fusedbn_emu
