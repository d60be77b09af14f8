// Internal interface between the parts of the CUDA emulation's runtime (emu_runtime.cpp,
// emu_hooks.cpp, emu_memory.cpp, emu_module.cpp); the sources see emu.h only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "emu.h"

namespace fusedbn_emu {

struct Config {
  int sm_count = 132;       // H100 SXM
  int blocks_per_sm = 0;    // 0: the occupancy model of blocks_per_sm()
  bool force_index64 = false;
  bool persistent = true;   // false: the ops take their streaming paths
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

// The linear thread index of the running fiber, -1 outside a kernel.
int current_thread();

// ---- the traffic counter (emu_traffic.cpp) ------------------------------------------------------
extern bool g_traffic_on;    // read by every access hook: nothing else is done while it is false
extern bool g_traffic_busy;  // the counter runs: the hooks do not count its own accesses
struct TrafficRange {
  uintptr_t lo, hi;
};
constexpr int kTrafficRanges = 32;
extern TrafficRange g_traffic_ranges[kTrafficRanges];  // the running op's live allocations
extern int g_traffic_nranges;

struct TrafficDir {        // one direction of one allocation in one launch
  uint64_t bytes = 0;      // bytes the lanes asked for
  uint64_t accesses = 0;   // warp-wide accesses
  uint64_t sectors = 0;    // distinct 32-byte sectors they touched, summed
  uint64_t ideal = 0;      // ceil(bytes / 32) per contiguous run of requested bytes, summed
};
struct TrafficTensor {
  TrafficDir dir[2];       // read, write
  uint64_t block_min = 0, block_max = 0;  // bytes per block, over the blocks that touched it
  uint64_t blocks_touching = 0;
};
struct TrafficLaunch {
  std::string kernel;
  dim3 grid, block;
  uint64_t blocks = 0;
  std::map<int, TrafficTensor> tensors;  // by allocation id
};
struct TrafficAlloc {
  uintptr_t base = 0;
  size_t bytes = 0;
  int arg = -1;            // the op argument it is the guarded copy of, or -1
  bool freed = false;      // freed before the op returned (a workspace)
  bool live_at_end = false;
};
struct TrafficCall {
  std::string op;
  std::vector<TrafficAlloc> allocs;
  std::vector<TrafficLaunch> launches;
};

void traffic_set_enabled(bool on);
std::vector<TrafficCall> traffic_take();  // the calls recorded since the last take
bool traffic_op_begin();                  // true: this scope must call traffic_op_end
void traffic_op_end(const std::string& op);
void traffic_alloc(const void* p, size_t n);
void traffic_free(const void* p);
void traffic_arg(const void* p, int index);
void traffic_launch_begin(const std::string& kernel, dim3 grid, dim3 block);
void traffic_block_begin(int nthreads);
void traffic_barrier();
void traffic_block_end();
// A block of a cooperative launch leaves at the grid barrier (its warp accesses closed, its
// bytes saved in `saved`) and comes back (traffic_block_resume) until traffic_block_end.
void traffic_block_suspend(std::vector<uint64_t>& saved);
void traffic_block_resume(int nthreads, std::vector<uint64_t>& saved);
void traffic_launch_end();
void traffic_access(const void* p, size_t n, bool write, const void* pc);
void traffic_vector(const void* p, size_t n, bool write, const void* pc);

}  // namespace fusedbn_emu
