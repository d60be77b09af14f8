// The runtime of the CUDA emulation (model and interface: emu.h): the launch checks, the block
// scheduler over fibers, __syncthreads, warp shuffles, per-block shared memory with red zones and
// the race detector, and the configuration the tests set. The memory-access callbacks of the
// instrumentation and the undefined-behaviour handlers are in emu_hooks.cpp, the poisoning
// allocator and the op wrapper in emu_memory.cpp.
#include "emu_runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "emu_fiber.h"

uint3 threadIdx = {0, 0, 0};
uint3 blockIdx = {0, 0, 0};
dim3 blockDim = {1, 1, 1};
dim3 gridDim = {1, 1, 1};

#if defined(__x86_64__)
// fusedbn_emu_switch(void** save_sp /* rdi */, void* load_sp /* rsi */): saves the callee-saved
// registers, MXCSR and the x87 control word on the current stack, stores the stack pointer in
// *save_sp, and resumes the context whose stack pointer is load_sp.
__asm__(R"(
  .text
  .globl fusedbn_emu_switch
  .hidden fusedbn_emu_switch
  .type fusedbn_emu_switch,@function
fusedbn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusedbn_emu_switch, .-fusedbn_emu_switch
)");
#endif

namespace fusedbn_emu {

// ---- configuration ---------------------------------------------------------------------------

Config& config() {
  static Config c;
  return c;
}

Stats& stats() {
  static Stats s;
  return s;
}

int sm_count() { return config().sm_count; }

bool index64_forced() { return config().force_index64; }

namespace {

constexpr size_t kStaticSharedLimit = 48 * 1024;      // static + dynamic without opt-in
constexpr size_t kOptInSharedLimit = 227 * 1024;      // sm_90's opt-in maximum per block
constexpr size_t kSharedPerSm = 228 * 1024;           // sm_90
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kParamLimit = 32764;                 // kernel parameter bytes (CUDA 12.1+)
constexpr size_t kRedZone = 64;                       // after every shared array
constexpr size_t kMaxStaticArrays = 64;
constexpr size_t kStaticRegion = kStaticSharedLimit + kMaxStaticArrays * (kRedZone + 16);
constexpr size_t kDynOffset = kRedZone + kStaticRegion + kRedZone;
constexpr size_t kArenaBytes = kDynOffset + kOptInSharedLimit + kRedZone;

std::mutex g_attr_mu;
std::map<const void*, int>& dyn_optin() {
  static std::map<const void*, int> m;
  return m;
}

}  // namespace

void set_max_dynamic_shared_memory(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptInSharedLimit) {
    throw_error("cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " +
                std::to_string(bytes) + "): invalid value (at most " +
                std::to_string(kOptInSharedLimit) + " bytes on sm_90)");
  }
  const std::lock_guard<std::mutex> lock(g_attr_mu);
  dyn_optin()[kernel] = bytes;
}

static size_t dyn_limit(const void* kernel) {
  const std::lock_guard<std::mutex> lock(g_attr_mu);
  const auto it = dyn_optin().find(kernel);
  return it == dyn_optin().end() ? kStaticSharedLimit : static_cast<size_t>(it->second);
}

int launch_bound(const void* kernel) {
  // Counts the NOPs __launch_bounds__ puts at the entry (emu.h). GCC never starts a function's
  // own code with a NOP.
  const unsigned char* p = static_cast<const unsigned char*>(kernel);
  int n = 0;
#if defined(__x86_64__)
  static const unsigned char kEndbr64[4] = {0xf3, 0x0f, 0x1e, 0xfa};  // -fcf-protection
  if (std::memcmp(p, kEndbr64, sizeof(kEndbr64)) == 0) p += sizeof(kEndbr64);
  while (n <= 1024 && p[n] == 0x90) ++n;
#elif defined(__aarch64__)
  static const unsigned char kBtiC[4] = {0x5f, 0x24, 0x03, 0xd5};  // -mbranch-protection
  static const unsigned char kNop[4] = {0x1f, 0x20, 0x03, 0xd5};
  if (std::memcmp(p, kBtiC, sizeof(kBtiC)) == 0) p += sizeof(kBtiC);
  while (n <= 1024 && std::memcmp(p + 4 * n, kNop, sizeof(kNop)) == 0) ++n;
#endif
  return n;  // elsewhere 0: not checked
}

int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  (void)kernel;
  if (config().blocks_per_sm > 0) return config().blocks_per_sm;
  // A simple model of sm_90: limited by threads, blocks and shared memory per SM.
  int n = std::min(kMaxBlocksPerSm, kMaxThreadsPerSm / std::max(threads, 1));
  if (smem > 0) n = std::min<int>(n, static_cast<int>(kSharedPerSm / (smem + 1024)));
  return std::max(n, 1);
}

[[noreturn]] void throw_error(const std::string& msg) {
  TORCH_CHECK(false, "fusedbn_emu: ", msg);
}

namespace {

// The functions of internal linkage (kernels in an anonymous namespace, which dladdr cannot
// name) of a shared object, by address relative to its base: read once from its .symtab.
const std::map<uintptr_t, std::string>& local_symbols(const char* path) {
  static std::map<std::string, std::map<uintptr_t, std::string>> by_file;
  auto found = by_file.find(path);
  if (found != by_file.end()) return found->second;
  std::map<uintptr_t, std::string>& out = by_file[path];
  std::vector<char> file;
  if (FILE* f = std::fopen(path, "rb")) {
    if (std::fseek(f, 0, SEEK_END) == 0) {
      const long n = std::ftell(f);
      if (n > 0) {
        file.resize(static_cast<size_t>(n));
        std::rewind(f);
        if (std::fread(file.data(), 1, file.size(), f) != file.size()) file.clear();
      }
    }
    std::fclose(f);
  }
  if (file.size() < sizeof(Elf64_Ehdr)) return out;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(file.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      eh->e_shoff + uint64_t{eh->e_shnum} * sizeof(Elf64_Shdr) > file.size())
    return out;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(file.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    const Elf64_Shdr& strs = sh[sh[i].sh_link];
    if (sh[i].sh_offset + sh[i].sh_size > file.size() ||
        strs.sh_offset + strs.sh_size > file.size())
      continue;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(file.data() + sh[i].sh_offset);
    const size_t nsym = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < nsym; ++k) {
      if (ELF64_ST_TYPE(sym[k].st_info) == STT_FUNC && sym[k].st_name < strs.sh_size)
        out.emplace(sym[k].st_value, file.data() + strs.sh_offset + sym[k].st_name);
    }
  }
  return out;
}

std::string local_symbol(const Dl_info& info, const void* addr) {
  if (info.dli_fname == nullptr) return std::string();
  const auto& syms = local_symbols(info.dli_fname);
  const auto it = syms.find(reinterpret_cast<uintptr_t>(addr) -
                            reinterpret_cast<uintptr_t>(info.dli_fbase));
  return it == syms.end() ? std::string() : it->second;
}

}  // namespace

std::string kernel_name(const void* kernel) {
  static std::mutex mu;
  static std::map<const void*, std::string> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(kernel);
  if (it != cache.end()) return it->second;
  Dl_info info;
  std::string sym;
  if (dladdr(kernel, &info) != 0) {
    if (info.dli_sname != nullptr && info.dli_saddr == kernel) {
      sym = info.dli_sname;
    } else {
      sym = local_symbol(info, kernel);
    }
  }
  std::string s;
  if (!sym.empty()) {
    int status = 0;
    char* d = abi::__cxa_demangle(sym.c_str(), nullptr, nullptr, &status);
    s = status == 0 && d != nullptr ? d : sym;
    std::free(d);
  } else {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "kernel at %p", kernel);
    s = buf;
  }
  cache[kernel] = s;
  return s;
}

// ---- the launch state --------------------------------------------------------------------------

namespace {

enum class State : uint8_t { kRun, kBarrier, kShfl, kDone };

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // mapping base (guard page first)
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kRun;
  const char* file = nullptr;  // where it waits
  int line = 0;
  ShflKind kind = ShflKind::kIdx;
  unsigned mask = 0;
  uint64_t value = 0;
  int lane_arg = 0;
  int width = 32;
  uint64_t result = 0;
};

struct StaticArray {
  const void* tag;
  size_t offset, bytes;
  const char* name;
};

struct ShadowCell {
  uint32_t w_epoch = 0;
  int32_t w_tid = -1;
  uint32_t r_epoch = 0;
  int32_t r_tid = -1;  // -2: several threads
};

struct Launch {
  const void* kernel = nullptr;
  std::string name;
  dim3 grid, block;
  size_t dyn_smem = 0, dyn_max = 0;
  BlockBody body = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  bool failed = false;
  std::string error;
  // block state
  std::vector<StaticArray> statics;
  size_t static_cursor = kRedZone;  // next free arena offset of the static region
  size_t static_bytes = 0;
};

Launch* g_launch = nullptr;      // the running launch (launches are serialized)
Fiber* g_cur = nullptr;          // the running fiber, nullptr on the scheduler
Context g_sched;                 // the scheduler's context
std::vector<Fiber> g_fibers;     // reused across launches (stacks kept)
uint32_t g_epoch = 1;            // shared-memory epoch: one per block and barrier interval
uint64_t g_rng = 0x9e3779b97f4a7c15ull;
std::mutex g_launch_mu;

unsigned char* g_arena = nullptr;     // kArenaBytes
uint8_t* g_valid = nullptr;           // per arena byte: 1 inside an array, 0 red zone / unused
ShadowCell* g_shadow = nullptr;       // per arena byte

}  // namespace

void set_seed(uint64_t seed) { g_rng = seed * 0x2545f4914f6cdd1dull + 0x9e3779b97f4a7c15ull; }

namespace {

uint64_t next_random() {  // splitmix64
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
void shuffle(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
}

std::string fmt3(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

uint3 tid_of(int linear) {
  const unsigned bx = blockDim.x, by = blockDim.y;
  return {static_cast<unsigned>(linear) % bx, (static_cast<unsigned>(linear) / bx) % by,
          static_cast<unsigned>(linear) / (bx * by)};
}

std::string thread_str(int linear) { return "thread " + fmt3(tid_of(linear)); }

std::string where(const char* file, int line) {
  std::string f = file != nullptr ? file : "?";
  const size_t p = f.rfind("csrc/");
  if (p != std::string::npos) f = f.substr(p);
  return f + ":" + std::to_string(line);
}

void fiber_entry();

// Switches from the running fiber back to the scheduler.
void yield_to_scheduler() {
  Fiber* f = g_cur;
  switch_context(f->ctx, g_sched);
}

// Records the launch's first error and abandons the running fiber (its stack is reused; the
// kernel's frames hold nothing that needs destroying).
[[noreturn]] void fail_in_fiber(const std::string& msg) {
  Launch& l = *g_launch;
  if (!l.failed) {
    l.failed = true;
    l.error = msg;
  }
  g_cur->state = State::kDone;
  yield_to_scheduler();
  std::abort();  // never resumed
}

void fail_launch(const std::string& msg) {
  Launch& l = *g_launch;
  if (!l.failed) {
    l.failed = true;
    l.error = msg;
  }
}

void fiber_entry() {
  try {
    g_launch->body(g_launch->ctx);
  } catch (const std::exception& e) {
    fail_in_fiber(std::string(thread_str(g_cur->linear)) + " threw: " + e.what());
  }
  g_cur->state = State::kDone;
  yield_to_scheduler();
  std::abort();
}

void resume(Fiber& f) {
  g_cur = &f;
  threadIdx = f.tid;
  switch_context(g_sched, f.ctx);
  g_cur = nullptr;
}

void ensure_arena() {
  if (g_arena != nullptr) return;
  g_arena = static_cast<unsigned char*>(std::aligned_alloc(256, kArenaBytes));
  g_valid = static_cast<uint8_t*>(std::calloc(kArenaBytes, 1));
  g_shadow = new ShadowCell[kArenaBytes];
  if (g_arena == nullptr || g_valid == nullptr) throw_error("out of memory for shared memory");
}

void begin_block(Launch& l) {
  // Forget the previous block's arrays, poison and open the dynamic region.
  std::memset(g_valid, 0, l.static_cursor + kRedZone);
  l.statics.clear();
  l.static_cursor = kRedZone;
  l.static_bytes = 0;
  if (l.dyn_smem > 0) {
    std::memset(g_arena + kDynOffset, 0xff, l.dyn_smem);
    std::memset(g_valid + kDynOffset, 1, l.dyn_smem);
  }
  ++g_epoch;
}

void end_launch_arena(Launch& l) {
  std::memset(g_valid, 0, l.static_cursor + kRedZone);
  if (l.dyn_smem > 0) std::memset(g_valid + kDynOffset, 0, l.dyn_smem);
  l.statics.clear();
  l.static_cursor = kRedZone;
}

std::string describe_offset(const Launch& l, size_t off) {
  if (off >= kDynOffset) {
    const size_t rel = off - kDynOffset;
    if (rel < l.dyn_smem) return "dynamic shared memory + " + std::to_string(rel);
    return "dynamic shared memory + " + std::to_string(rel) + " (the launch has " +
           std::to_string(l.dyn_smem) + " bytes)";
  }
  const StaticArray* best = nullptr;
  for (const StaticArray& a : l.statics)
    if (a.offset <= off && (best == nullptr || a.offset > best->offset)) best = &a;
  if (best == nullptr) return "static shared memory before the first array";
  const size_t rel = off - best->offset;
  std::string s = std::string("'") + best->name + "' + " + std::to_string(rel);
  if (rel >= best->bytes) s += " (the array has " + std::to_string(best->bytes) + " bytes)";
  return s;
}

// Waits at a shuffle or barrier point until the scheduler releases the fiber.
void wait_here(State s, const char* file, int line) {
  Fiber* f = g_cur;
  f->state = s;
  f->file = file;
  f->line = line;
  yield_to_scheduler();
}

const char* kind_name(ShflKind k) {
  switch (k) {
    case ShflKind::kIdx: return "__shfl_sync";
    case ShflKind::kUp: return "__shfl_up_sync";
    case ShflKind::kDown: return "__shfl_down_sync";
    case ShflKind::kXor: return "__shfl_xor_sync";
    case ShflKind::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08x", m);
  return b;
}

std::string state_str(const Fiber& f) {
  switch (f.state) {
    case State::kDone: return "has exited";
    case State::kBarrier: return "waits at __syncthreads (" + where(f.file, f.line) + ")";
    case State::kShfl:
      return "waits at " + std::string(kind_name(f.kind)) + " (" + where(f.file, f.line) +
             ") with mask " + hex(f.mask);
    case State::kRun: return "runs";
  }
  return "?";
}

// Completes the shuffles whose lanes have all arrived; returns false (and fails the launch) when
// a waiting shuffle can never complete. Released fibers are appended to `released`.
bool resolve_shuffles(Launch& l, std::vector<int>& released) {
  const int n = l.nthreads;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    // Validate every waiting lane's group first.
    for (int i = 0; i < lanes; ++i) {
      const Fiber& f = g_fibers[w0 + i];
      if (f.state != State::kShfl) continue;
      for (int j = 0; j < lanes; ++j) {
        if (((f.mask >> j) & 1u) == 0 || j == i) continue;
        const Fiber& g = g_fibers[w0 + j];
        const bool same = g.state == State::kShfl && g.mask == f.mask && g.kind == f.kind &&
                          g.line == f.line && std::strcmp(g.file, f.file) == 0 &&
                          g.width == f.width;
        if (!same) {
          fail_launch(std::string(kind_name(f.kind)) + " at " + where(f.file, f.line) +
                      " with mask " + hex(f.mask) + " by " + thread_str(w0 + i) + " (lane " +
                      std::to_string(i) + "): lane " + std::to_string(j) + " named in the mask " +
                      (g.state == State::kShfl && g.mask != f.mask
                           ? "calls it with mask " + hex(g.mask) +
                                 " (the lanes of a shuffle must agree on the mask)"
                           : state_str(g)) +
                      " -- every lane named in the mask must reach the same shuffle");
          return false;
        }
      }
    }
    // Complete them.
    for (int i = 0; i < lanes; ++i) {
      Fiber& f = g_fibers[w0 + i];
      if (f.state != State::kShfl) continue;
      const unsigned mask = f.mask;
      for (int j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        Fiber& g = g_fibers[w0 + j];
        const int w = g.width;
        const int seg = j & ~(w - 1);
        int src = j;
        switch (g.kind) {
          case ShflKind::kIdx: src = seg + (g.lane_arg & (w - 1)); break;
          case ShflKind::kUp: src = (j - seg) >= g.lane_arg ? j - g.lane_arg : j; break;
          case ShflKind::kDown: src = (j - seg) + g.lane_arg < w ? j + g.lane_arg : j; break;
          case ShflKind::kXor: {
            const int s = j ^ g.lane_arg;
            src = s < seg + w ? s : j;
            break;
          }
          case ShflKind::kSyncWarp: src = j; break;
        }
        if (src == j) {
          g.result = g.value;
        } else if (src < lanes && ((mask >> src) & 1u) != 0) {
          g.result = g_fibers[w0 + src].value;
        } else {
          g.result = ~uint64_t{0};  // a lane outside the mask or past the partial warp: poison
        }
      }
      for (int j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        g_fibers[w0 + j].state = State::kRun;
        released.push_back(w0 + j);
      }
    }
  }
  return true;
}

void run_block(Launch& l) {
  begin_block(l);
  const int n = l.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    if (f.stack == nullptr) f.stack = map_stack();
    f.linear = i;
    f.tid = tid_of(i);
    f.state = State::kRun;
    make_context(f.ctx, f.stack + kGuardBytes, kStackBytes, &fiber_entry);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  shuffle(order);
  while (true) {
    for (int i : order) {
      if (g_fibers[i].state == State::kRun) resume(g_fibers[i]);
      if (l.failed) return;
    }
    order.clear();
    if (!resolve_shuffles(l, order)) return;
    if (!order.empty()) {
      shuffle(order);
      continue;
    }
    // Everybody waits at a barrier or has exited.
    int first = -1;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.state == State::kDone) continue;
      if (f.state != State::kBarrier) {  // a shuffle left waiting: reported by resolve_shuffles
        fail_launch(thread_str(i) + " " + state_str(f) + " and can never complete");
        return;
      }
      if (first < 0) {
        first = i;
      } else {
        const Fiber& g = g_fibers[first];
        if (f.line != g.line || std::strcmp(f.file, g.file) != 0) {
          fail_launch("divergent barrier: " + thread_str(first) + " waits at __syncthreads (" +
                      where(g.file, g.line) + ") but " + thread_str(i) +
                      " waits at __syncthreads (" + where(f.file, f.line) +
                      ") -- every live thread of a block must reach the same barrier");
          return;
        }
      }
      order.push_back(i);
    }
    if (order.empty()) return;  // the block is done
    if (g_traffic_on) traffic_barrier();
    ++g_epoch;
    for (int i : order) g_fibers[i].state = State::kRun;
    shuffle(order);
  }
}

}  // namespace

void run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, size_t param_bytes,
                BlockBody body, void* ctx) {
  const std::lock_guard<std::mutex> lock(g_launch_mu);
  const std::string name = kernel_name(kernel);
  auto bad = [&](const std::string& what) {
    throw_error("launch of " + name + " with grid (" + std::to_string(grid.x) + ", " +
                std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                std::to_string(block.z) + "), " + std::to_string(smem) +
                " bytes of dynamic shared memory: " + what);
  };
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    bad("invalid configuration argument: a zero grid or block dimension");
  if (block.x > 1024 || block.y > 1024 || block.z > 64)
    bad("invalid configuration argument: block dimensions exceed (1024, 1024, 64)");
  if (threads > 1024) bad("invalid configuration argument: more than 1024 threads per block");
  const int bound = launch_bound(kernel);
  if (bound > 0 && threads > static_cast<uint64_t>(bound)) {
    bad("too many resources requested for launch: " + std::to_string(threads) +
        " threads per block, more than the kernel's __launch_bounds__(" + std::to_string(bound) +
        ")");
  }
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    bad("invalid configuration argument: grid dimensions exceed (2^31 - 1, 65535, 65535)");
  const size_t dmax = dyn_limit(kernel);
  if (smem > dmax) {
    bad(dmax == kStaticSharedLimit
            ? "too much dynamic shared memory: more than 48 KB needs "
              "set_max_dynamic_shared_memory (cudaFuncAttributeMaxDynamicSharedMemorySize)"
            : "too much dynamic shared memory: more than the " + std::to_string(dmax) +
                  " bytes the kernel opted in to");
  }
  if (param_bytes > kParamLimit) bad("kernel parameters exceed 32764 bytes");
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  if (nblocks * threads > (uint64_t{1} << 34))
    bad("too large to emulate (more than 2^34 threads)");

  ensure_arena();
  if (g_fibers.size() < threads) g_fibers.resize(threads);
  Launch l;
  l.kernel = kernel;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.dyn_smem = smem;
  l.dyn_max = dmax;
  l.body = body;
  l.ctx = ctx;
  l.nthreads = static_cast<int>(threads);
  g_launch = &l;
  blockDim = block;
  gridDim = grid;
  stats().launches += 1;
  stats().blocks += nblocks;
  stats().threads += nblocks * threads;

  std::vector<uint32_t> order;
  const bool permute = nblocks <= (uint64_t{1} << 24);
  if (permute) {
    order.resize(nblocks);
    std::iota(order.begin(), order.end(), 0u);
    shuffle(order);
  }
  const bool count = g_traffic_on;
  if (count) traffic_launch_begin(name, grid, block);
  set_arena_active(g_arena, kArenaBytes);
  for (uint64_t k = 0; k < nblocks && !l.failed; ++k) {
    const uint64_t b = permute ? order[k] : k;
    blockIdx = {static_cast<unsigned>(b % grid.x),
                static_cast<unsigned>((b / grid.x) % grid.y),
                static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    if (count) traffic_block_begin(l.nthreads);
    run_block(l);
    if (count) traffic_block_end();
  }
  if (count) traffic_launch_end();
  set_arena_active(nullptr, 0);
  end_launch_arena(l);
  g_launch = nullptr;
  if (l.failed) {
    throw_error(name + ", block " + fmt3(blockIdx) + ": " + l.error);
  }
}

// ---- device-side entry points ------------------------------------------------------------------

int current_thread() { return g_cur != nullptr ? g_cur->linear : -1; }

static Fiber& current(const char* what) {
  if (g_cur == nullptr) throw_error(std::string(what) + " called outside a kernel");
  return *g_cur;
}

void syncthreads(const char* file, int line) {
  current("__syncthreads");
  wait_here(State::kBarrier, file, line);
}

uint64_t shfl_bits(ShflKind kind, const char* file, int line, unsigned mask, uint64_t bits,
                   int lane_arg, int width) {
  Fiber& f = current(kind_name(kind));
  const int lane = f.linear % 32;
  if (((mask >> lane) & 1u) == 0) {
    fail_in_fiber(std::string(kind_name(kind)) + " at " + where(file, line) + ": " +
                  thread_str(f.linear) + " (lane " + std::to_string(lane) +
                  ") calls it with mask " + hex(mask) +
                  ", which does not name the calling lane");
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail_in_fiber(std::string(kind_name(kind)) + " at " + where(file, line) + ": width " +
                  std::to_string(width) + " is not a power of two in [1, 32]");
  }
  f.kind = kind;
  f.mask = mask;
  f.value = bits;
  f.lane_arg = lane_arg;
  f.width = width;
  wait_here(State::kShfl, file, line);
  return f.result;
}

unsigned char* dynamic_shared_memory() {
  current("dynamic_shared_memory");
  return g_arena + kDynOffset;
}

void* static_shared(const void* tag, size_t bytes, size_t align, const char* name) {
  current("FUSEDBN_SHARED_ARRAY");
  Launch& l = *g_launch;
  for (const StaticArray& a : l.statics)
    if (a.tag == tag) return g_arena + a.offset;
  if (l.statics.size() >= kMaxStaticArrays)
    fail_in_fiber("more than " + std::to_string(kMaxStaticArrays) + " static shared arrays");
  if (l.static_bytes + bytes > kStaticSharedLimit) {
    fail_in_fiber("static shared memory: '" + std::string(name) + "' (" + std::to_string(bytes) +
                  " bytes) brings the kernel's static shared memory to " +
                  std::to_string(l.static_bytes + bytes) + " bytes, more than CUDA's 48 KB");
  }
  if (l.static_bytes + bytes + l.dyn_smem > std::max(kStaticSharedLimit, l.dyn_max)) {
    fail_in_fiber("shared memory: " + std::to_string(l.static_bytes + bytes) +
                  " bytes static + " + std::to_string(l.dyn_smem) +
                  " bytes dynamic exceed the kernel's limit of " +
                  std::to_string(std::max(kStaticSharedLimit, l.dyn_max)) + " bytes");
  }
  align = std::max<size_t>(align, 16);
  const size_t off = (l.static_cursor + align - 1) / align * align;
  l.statics.push_back({tag, off, bytes, name});
  l.static_cursor = off + bytes + kRedZone;
  l.static_bytes += bytes;
  std::memset(g_arena + off, 0xff, bytes);
  std::memset(g_valid + off, 1, bytes);
  return g_arena + off;
}

void check_vector_access(const void* p, size_t bytes, size_t align, const char* what) {
  // load_vec / store_vec: one access of the vector's width for the traffic counter.
  if (g_traffic_on) traffic_vector(p, bytes, what[0] == 's', __builtin_return_address(0));
  if (reinterpret_cast<uintptr_t>(p) % align == 0) return;
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "misaligned vector access: %s of %zu bytes at %p, which is not %zu-byte aligned",
                what, bytes, p, align);
  if (g_cur != nullptr) fail_in_fiber(thread_str(g_cur->linear) + ": " + buf);
  throw_error(buf);
}

// ---- the shared-memory checks (called by the instrumentation for arena addresses) -------------

void shared_access(uintptr_t offset, size_t n, bool write) {
  if (g_cur == nullptr || g_launch == nullptr) return;
  Launch& l = *g_launch;
  const int t = g_cur->linear;
  for (size_t k = 0; k < n; ++k) {
    const size_t off = offset + k;
    if (g_valid[off] == 0) {
      fail_in_fiber(thread_str(t) + ": shared-memory overrun: " + (write ? "write" : "read") +
                    " of " + std::to_string(n) + " bytes at " + describe_offset(l, offset) +
                    (off == offset ? std::string() : " reaches " + describe_offset(l, off)) +
                    ", outside every shared array");
    }
    ShadowCell& c = g_shadow[off];
    const uint32_t e = g_epoch;
    if (write) {
      if (c.w_epoch == e && c.w_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " writes " +
                      describe_offset(l, off) + " that " + thread_str(c.w_tid) +
                      " wrote since the last __syncthreads");
      }
      if (c.r_epoch == e && c.r_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " writes " +
                      describe_offset(l, off) + " that " +
                      (c.r_tid == -2 ? std::string("other threads") : thread_str(c.r_tid)) +
                      " read since the last __syncthreads");
      }
      c.w_epoch = e;
      c.w_tid = t;
    } else {
      if (c.w_epoch == e && c.w_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " reads " +
                      describe_offset(l, off) + " that " + thread_str(c.w_tid) +
                      " wrote since the last __syncthreads");
      }
      if (c.r_epoch != e) {
        c.r_epoch = e;
        c.r_tid = t;
      } else if (c.r_tid != t) {
        c.r_tid = -2;
      }
    }
  }
}

void report_undefined_behaviour(const std::string& msg) {
  if (g_cur != nullptr && g_launch != nullptr) {
    fail_in_fiber(thread_str(g_cur->linear) + ": undefined behaviour: " + msg);
  }
  add_pending_error("undefined behaviour in host code: " + msg);
}

}  // namespace fusedbn_emu
