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
#include <type_traits>
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

bool persistent_disabled() { return !config().persistent; }

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
constexpr uint64_t kMaxCoResidentThreads = uint64_t{1} << 14;  // fibers of a cooperative grid

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

size_t max_dynamic_shared_memory() { return kOptInSharedLimit; }

int64_t max_co_resident_threads() { return static_cast<int64_t>(kMaxCoResidentThreads); }

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

enum class State : uint8_t { kRun, kBarrier, kShfl, kGrid, kDone };

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

// Zero-initialized is "no access yet": epochs start at 1.
struct ShadowCell {
  uint32_t w_epoch = 0;
  int32_t w_tid = -1;
  uint32_t r_epoch = 0;
  int32_t r_tid = -1;  // -2: several threads
};

// One block's resources: its threads' fibers, its shared-memory arena with the valid bytes and
// the race detector's shadow, its static arrays. A normal launch runs its blocks one after
// another in one Block (g_seq, reused); a cooperative launch gives every block of the grid its
// own (co-resident blocks, switched at the grid barrier). The arena memory is mapped on demand,
// so a block costs only the pages it touches.
struct Block {
  std::vector<Fiber> fibers;
  unsigned char* arena = nullptr;  // kArenaBytes
  uint8_t* valid = nullptr;        // per arena byte: 1 inside an array, 0 red zone / unused
  ShadowCell* shadow = nullptr;    // per arena byte
  uint32_t epoch = 1;              // one per barrier interval of this block
  std::vector<StaticArray> statics;
  size_t static_cursor = kRedZone;  // next free arena offset of the static region
  size_t static_bytes = 0;
  uint3 idx{0, 0, 0};
  bool started = false, done = false;
  std::vector<uint64_t> traffic;  // the traffic counter's bytes of a suspended block
};

struct Launch {
  const void* kernel = nullptr;
  std::string name;
  dim3 grid, block;
  size_t dyn_smem = 0, dyn_max = 0;
  BlockBody body = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  bool cooperative = false;
  bool failed = false;
  bool grid_error = false;  // the error concerns the grid (not one block)
  std::string error;
};

Launch* g_launch = nullptr;      // the running launch (launches are serialized)
Block* g_blk = nullptr;          // the running block
Fiber* g_cur = nullptr;          // the running fiber, nullptr on the scheduler
Context g_sched;                 // the scheduler's context
Block g_seq;                     // the block of normal launches (fiber stacks kept)
std::vector<std::unique_ptr<Block>> g_pool;  // the blocks of cooperative launches (kept)
uint64_t g_rng = 0x9e3779b97f4a7c15ull;
std::mutex g_launch_mu;

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

void* map_zeroed(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw_error("out of memory for shared memory");
  return p;
}

void ensure_arena(Block& b) {
  if (b.arena != nullptr) return;
  b.arena = static_cast<unsigned char*>(map_zeroed(kArenaBytes));
  b.valid = static_cast<uint8_t*>(map_zeroed(kArenaBytes));
  b.shadow = static_cast<ShadowCell*>(map_zeroed(kArenaBytes * sizeof(ShadowCell)));
  static_assert(std::is_trivially_destructible<ShadowCell>::value, "mapped, never destroyed");
}

void ensure_fibers(Block& b, size_t n) {
  if (b.fibers.size() < n) b.fibers.resize(n);
}

// Forgets the previous block's arrays, poisons and opens the dynamic region, creates the fibers.
void begin_block(const Launch& l, Block& b, uint3 idx) {
  std::memset(b.valid, 0, b.static_cursor + kRedZone);
  b.statics.clear();
  b.static_cursor = kRedZone;
  b.static_bytes = 0;
  if (l.dyn_smem > 0) {
    std::memset(b.arena + kDynOffset, 0xff, l.dyn_smem);
    std::memset(b.valid + kDynOffset, 1, l.dyn_smem);
  }
  ++b.epoch;
  b.idx = idx;
  b.started = false;
  b.done = false;
  b.traffic.clear();
  for (int i = 0; i < l.nthreads; ++i) {
    Fiber& f = b.fibers[i];
    if (f.stack == nullptr) f.stack = map_stack();
    f.linear = i;
    f.tid = tid_of(i);
    f.state = State::kRun;
    make_context(f.ctx, f.stack + kGuardBytes, kStackBytes, &fiber_entry);
  }
}

void end_block_arena(const Launch& l, Block& b) {
  std::memset(b.valid, 0, b.static_cursor + kRedZone);
  if (l.dyn_smem > 0) std::memset(b.valid + kDynOffset, 0, l.dyn_smem);
  b.statics.clear();
  b.static_cursor = kRedZone;
}

// Makes b the running block: its arena is the one the instrumentation checks, its index is
// blockIdx.
void enter_block(Block& b) {
  g_blk = &b;
  blockIdx = b.idx;
  set_arena_active(b.arena, kArenaBytes);
}

std::string describe_offset(const Launch& l, const Block& b, size_t off) {
  if (off >= kDynOffset) {
    const size_t rel = off - kDynOffset;
    if (rel < l.dyn_smem) return "dynamic shared memory + " + std::to_string(rel);
    return "dynamic shared memory + " + std::to_string(rel) + " (the launch has " +
           std::to_string(l.dyn_smem) + " bytes)";
  }
  const StaticArray* best = nullptr;
  for (const StaticArray& a : b.statics)
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
    case State::kGrid: return "waits at the grid barrier (" + where(f.file, f.line) + ")";
    case State::kShfl:
      return "waits at " + std::string(kind_name(f.kind)) + " (" + where(f.file, f.line) +
             ") with mask " + hex(f.mask);
    case State::kRun: return "runs";
  }
  return "?";
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

// Completes the shuffles whose lanes have all arrived; returns false (and fails the launch) when
// a waiting shuffle can never complete. Released fibers are appended to `released`.
bool resolve_shuffles(Launch& l, Block& b, std::vector<int>& released) {
  const int n = l.nthreads;
  std::vector<Fiber>& fibers = b.fibers;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    // Validate every waiting lane's group first.
    for (int i = 0; i < lanes; ++i) {
      const Fiber& f = fibers[w0 + i];
      if (f.state != State::kShfl) continue;
      for (int j = 0; j < lanes; ++j) {
        if (((f.mask >> j) & 1u) == 0 || j == i) continue;
        const Fiber& g = fibers[w0 + j];
        const bool same = g.state == State::kShfl && g.mask == f.mask && g.kind == f.kind &&
                          same_site(g, f) && g.width == f.width;
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
      Fiber& f = fibers[w0 + i];
      if (f.state != State::kShfl) continue;
      const unsigned mask = f.mask;
      for (int j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        Fiber& g = fibers[w0 + j];
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
          g.result = fibers[w0 + src].value;
        } else {
          g.result = ~uint64_t{0};  // a lane outside the mask or past the partial warp: poison
        }
      }
      for (int j = 0; j < lanes; ++j) {
        if (((mask >> j) & 1u) == 0) continue;
        fibers[w0 + j].state = State::kRun;
        released.push_back(w0 + j);
      }
    }
  }
  return true;
}

enum class Stop { kDone, kGrid, kFailed };

// Runs block b (the running block, enter_block) until all its threads have exited (kDone) or
// every live one waits at the grid barrier (kGrid: only in a cooperative launch, and only when
// none has exited), or the launch fails.
Stop run_block(Launch& l, Block& b) {
  const int n = l.nthreads;
  std::vector<Fiber>& fibers = b.fibers;
  std::vector<int> order;
  order.reserve(n);
  for (int i = 0; i < n; ++i)
    if (fibers[i].state == State::kRun) order.push_back(i);
  shuffle(order);
  while (true) {
    for (int i : order) {
      if (fibers[i].state == State::kRun) resume(fibers[i]);
      if (l.failed) return Stop::kFailed;
    }
    order.clear();
    if (!resolve_shuffles(l, b, order)) return Stop::kFailed;
    if (!order.empty()) {
      shuffle(order);
      continue;
    }
    // Everybody waits at a barrier or has exited.
    int first = -1, first_grid = -1, first_done = -1;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = fibers[i];
      if (f.state == State::kDone) {
        if (first_done < 0) first_done = i;
        continue;
      }
      if (f.state == State::kGrid) {
        if (first_grid < 0) {
          first_grid = i;
        } else if (!same_site(f, fibers[first_grid])) {
          fail_launch("divergent grid barriers: " + thread_str(first_grid) + " " +
                      state_str(fibers[first_grid]) + " but " + thread_str(i) + " " +
                      state_str(f) + " -- every thread of the grid must reach the same one");
          return Stop::kFailed;
        }
        continue;
      }
      if (f.state != State::kBarrier) {  // a shuffle left waiting: reported by resolve_shuffles
        fail_launch(thread_str(i) + " " + state_str(f) + " and can never complete");
        return Stop::kFailed;
      }
      if (first < 0) {
        first = i;
      } else {
        const Fiber& g = fibers[first];
        if (!same_site(f, g)) {
          fail_launch("divergent barrier: " + thread_str(first) + " waits at __syncthreads (" +
                      where(g.file, g.line) + ") but " + thread_str(i) +
                      " waits at __syncthreads (" + where(f.file, f.line) +
                      ") -- every live thread of a block must reach the same barrier");
          return Stop::kFailed;
        }
      }
      order.push_back(i);
    }
    if (first_grid >= 0) {
      if (first >= 0) {
        fail_launch("divergent barrier: " + thread_str(first) + " " + state_str(fibers[first]) +
                    " but " + thread_str(first_grid) + " " + state_str(fibers[first_grid]) +
                    " -- every live thread of a block must reach the same barrier");
        return Stop::kFailed;
      }
      if (first_done >= 0) {
        fail_launch(thread_str(first_done) + " has exited while " + thread_str(first_grid) +
                    " " + state_str(fibers[first_grid]) +
                    ": the grid barrier waits for every thread of the grid, so on a GPU this "
                    "deadlocks (an exited thread never arrives)");
        return Stop::kFailed;
      }
      return Stop::kGrid;
    }
    if (order.empty()) return Stop::kDone;  // the block is done
    if (g_traffic_on) traffic_barrier();
    ++b.epoch;
    for (int i : order) fibers[i].state = State::kRun;
    shuffle(order);
  }
}

// The checks of every launch (CUDA's limits); throws for a launch CUDA refuses.
size_t check_launch(const void* kernel, const std::string& name, dim3 grid, dim3 block,
                    size_t smem, size_t param_bytes, bool cooperative) {
  auto bad = [&](const std::string& what) {
    throw_error(std::string(cooperative ? "cooperative launch" : "launch") + " of " + name +
                " with grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                std::to_string(grid.z) + "), block (" + std::to_string(block.x) + ", " +
                std::to_string(block.y) + ", " + std::to_string(block.z) + "), " +
                std::to_string(smem) + " bytes of dynamic shared memory: " + what);
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
  if (cooperative) {
    // cudaLaunchCooperativeKernel: every block must be resident at once.
    const int bps = blocks_per_sm(kernel, static_cast<int>(threads), smem);
    const uint64_t resident = uint64_t(sm_count()) * static_cast<uint64_t>(bps);
    if (nblocks > resident) {
      bad("too many blocks in cooperative launch (cudaErrorCooperativeLaunchTooLarge): " +
          std::to_string(nblocks) + " blocks, but at most " + std::to_string(resident) +
          " can be resident (" + std::to_string(sm_count()) + " SMs x " + std::to_string(bps) +
          " blocks per SM)");
    }
    if (nblocks * threads > kMaxCoResidentThreads) {
      bad("too large to emulate co-resident: " + std::to_string(nblocks * threads) +
          " threads, the emulator holds at most " + std::to_string(kMaxCoResidentThreads) +
          " (set a smaller sm_count / blocks_per_sm in the test)");
    }
  }
  return dmax;
}

void start_launch(Launch& l, const void* kernel, const std::string& name, dim3 grid, dim3 block,
                  size_t smem, size_t dmax, BlockBody body, void* ctx, bool cooperative) {
  l.kernel = kernel;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.dyn_smem = smem;
  l.dyn_max = dmax;
  l.body = body;
  l.ctx = ctx;
  l.nthreads = static_cast<int>(uint64_t{block.x} * block.y * block.z);
  l.cooperative = cooperative;
  g_launch = &l;
  blockDim = block;
  gridDim = grid;
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  stats().launches += 1;
  stats().blocks += nblocks;
  stats().threads += nblocks * l.nthreads;
}

uint3 block_index(const Launch& l, uint64_t b) {
  return {static_cast<unsigned>(b % l.grid.x), static_cast<unsigned>((b / l.grid.x) % l.grid.y),
          static_cast<unsigned>(b / (uint64_t{l.grid.x} * l.grid.y))};
}

[[noreturn]] void throw_launch_error(const Launch& l, const Block* b) {
  if (l.grid_error || b == nullptr) throw_error(l.name + ", grid: " + l.error);
  throw_error(l.name + ", block " + fmt3(b->idx) + ": " + l.error);
}

}  // namespace

void run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, size_t param_bytes,
                BlockBody body, void* ctx) {
  const std::lock_guard<std::mutex> lock(g_launch_mu);
  const std::string name = kernel_name(kernel);
  const size_t dmax = check_launch(kernel, name, grid, block, smem, param_bytes, false);
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  Launch l;
  start_launch(l, kernel, name, grid, block, smem, dmax, body, ctx, false);
  Block& b = g_seq;
  ensure_arena(b);
  ensure_fibers(b, static_cast<size_t>(l.nthreads));

  std::vector<uint32_t> order;
  const bool permute = nblocks <= (uint64_t{1} << 24);
  if (permute) {
    order.resize(nblocks);
    std::iota(order.begin(), order.end(), 0u);
    shuffle(order);
  }
  const bool count = g_traffic_on;
  if (count) traffic_launch_begin(name, grid, block);
  for (uint64_t k = 0; k < nblocks && !l.failed; ++k) {
    begin_block(l, b, block_index(l, permute ? order[k] : k));
    enter_block(b);
    if (count) traffic_block_begin(l.nthreads);
    run_block(l, b);
    if (count) traffic_block_end();
  }
  if (count) traffic_launch_end();
  set_arena_active(nullptr, 0);
  end_block_arena(l, b);
  g_launch = nullptr;
  g_blk = nullptr;
  if (l.failed) throw_launch_error(l, &b);
}

void run_cooperative_launch(const void* kernel, dim3 grid, dim3 block, size_t smem,
                            size_t param_bytes, BlockBody body, void* ctx) {
  const std::lock_guard<std::mutex> lock(g_launch_mu);
  const std::string name = kernel_name(kernel);
  const size_t dmax = check_launch(kernel, name, grid, block, smem, param_bytes, true);
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  Launch l;
  start_launch(l, kernel, name, grid, block, smem, dmax, body, ctx, true);
  while (g_pool.size() < nblocks) g_pool.emplace_back(new Block);
  for (uint64_t k = 0; k < nblocks; ++k) {
    Block& b = *g_pool[k];
    ensure_arena(b);
    ensure_fibers(b, static_cast<size_t>(l.nthreads));
    begin_block(l, b, block_index(l, k));
  }
  const bool count = g_traffic_on;
  if (count) traffic_launch_begin(name, grid, block);
  // Rounds: every block that is not done runs until its threads wait at the grid barrier or
  // exit, the blocks in an order shuffled per round; then the barrier is checked and released.
  std::vector<uint32_t> order(nblocks);
  std::iota(order.begin(), order.end(), 0u);
  Block* last = nullptr;
  while (!l.failed) {
    shuffle(order);
    for (uint32_t k : order) {
      Block& b = *g_pool[k];
      if (b.done) continue;
      enter_block(b);
      last = &b;
      if (count) {
        if (b.started) {
          traffic_block_resume(l.nthreads, b.traffic);
        } else {
          traffic_block_begin(l.nthreads);
        }
      }
      b.started = true;
      const Stop stop = run_block(l, b);
      if (stop == Stop::kFailed) break;
      if (stop == Stop::kDone) {
        b.done = true;
        if (count) traffic_block_end();
      } else if (count) {
        traffic_block_suspend(b.traffic);
      }
    }
    if (l.failed) break;
    // Every block is done or waits at the grid barrier.
    const Block* waiting = nullptr;
    const Block* exited = nullptr;
    for (uint64_t k = 0; k < nblocks; ++k) {
      const Block& b = *g_pool[k];
      if (b.done) {
        if (exited == nullptr) exited = &b;
        continue;
      }
      if (waiting == nullptr) {
        waiting = &b;
        continue;
      }
      const Fiber* fa = nullptr;
      const Fiber* fb = nullptr;
      for (int i = 0; i < l.nthreads && (fa == nullptr || fb == nullptr); ++i) {
        if (fa == nullptr && waiting->fibers[i].state == State::kGrid) fa = &waiting->fibers[i];
        if (fb == nullptr && b.fibers[i].state == State::kGrid) fb = &b.fibers[i];
      }
      if (!same_site(*fa, *fb)) {
        l.grid_error = true;
        fail_launch("divergent grid barriers: block " + fmt3(waiting->idx) + " " +
                    thread_str(fa->linear) + " " + state_str(*fa) + " but block " +
                    fmt3(b.idx) + " " + thread_str(fb->linear) + " " + state_str(*fb) +
                    " -- every thread of the grid must reach the same one");
        break;
      }
    }
    if (l.failed || waiting == nullptr) break;  // failed, or every block is done
    if (exited != nullptr) {
      const Fiber* fa = nullptr;
      for (int i = 0; i < l.nthreads && fa == nullptr; ++i)
        if (waiting->fibers[i].state == State::kGrid) fa = &waiting->fibers[i];
      l.grid_error = true;
      fail_launch("block " + fmt3(exited->idx) + " has exited while block " +
                  fmt3(waiting->idx) + " " + thread_str(fa->linear) + " " + state_str(*fa) +
                  ": the grid barrier waits for every thread of the grid, so on a GPU this "
                  "deadlocks (an exited thread never arrives)");
      break;
    }
    // Release: the grid barrier is also a barrier of every block.
    for (uint64_t k = 0; k < nblocks; ++k) {
      Block& b = *g_pool[k];
      ++b.epoch;
      for (int i = 0; i < l.nthreads; ++i)
        if (b.fibers[i].state == State::kGrid) b.fibers[i].state = State::kRun;
    }
  }
  if (count) traffic_launch_end();
  set_arena_active(nullptr, 0);
  for (uint64_t k = 0; k < nblocks; ++k) {
    Block& b = *g_pool[k];
    end_block_arena(l, b);
    // Give the pages back (the pool keeps the mappings): a zero shadow cell is "no access" and
    // every used byte is poisoned again when a block starts, so nothing needs keeping.
    madvise(b.arena, kArenaBytes, MADV_DONTNEED);
    madvise(b.valid, kArenaBytes, MADV_DONTNEED);
    madvise(b.shadow, kArenaBytes * sizeof(ShadowCell), MADV_DONTNEED);
    for (Fiber& f : b.fibers)  // exited: make_context rebuilds the stack's top next time
      if (f.stack != nullptr) madvise(f.stack + kGuardBytes, kStackBytes, MADV_DONTNEED);
  }
  g_launch = nullptr;
  g_blk = nullptr;
  if (l.failed) throw_launch_error(l, last);
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

void grid_sync(const char* file, int line) {
  Fiber& f = current("the grid barrier");
  if (!g_launch->cooperative) {
    fail_in_fiber(thread_str(f.linear) + ": grid barrier (" + where(file, line) +
                  ") in a launch that is not cooperative: this_grid().sync() needs "
                  "cudaLaunchCooperativeKernel (launch_cooperative), else the grid's blocks need "
                  "not be resident together");
  }
  wait_here(State::kGrid, file, line);
}

unsigned char* dynamic_shared_memory() {
  current("dynamic_shared_memory");
  return g_blk->arena + kDynOffset;
}

void* static_shared(const void* tag, size_t bytes, size_t align, const char* name) {
  current("FUSEDBN_SHARED_ARRAY");
  Launch& l = *g_launch;
  Block& b = *g_blk;
  for (const StaticArray& a : b.statics)
    if (a.tag == tag) return b.arena + a.offset;
  if (b.statics.size() >= kMaxStaticArrays)
    fail_in_fiber("more than " + std::to_string(kMaxStaticArrays) + " static shared arrays");
  if (b.static_bytes + bytes > kStaticSharedLimit) {
    fail_in_fiber("static shared memory: '" + std::string(name) + "' (" + std::to_string(bytes) +
                  " bytes) brings the kernel's static shared memory to " +
                  std::to_string(b.static_bytes + bytes) + " bytes, more than CUDA's 48 KB");
  }
  if (b.static_bytes + bytes + l.dyn_smem > std::max(kStaticSharedLimit, l.dyn_max)) {
    fail_in_fiber("shared memory: " + std::to_string(b.static_bytes + bytes) +
                  " bytes static + " + std::to_string(l.dyn_smem) +
                  " bytes dynamic exceed the kernel's limit of " +
                  std::to_string(std::max(kStaticSharedLimit, l.dyn_max)) + " bytes");
  }
  align = std::max<size_t>(align, 16);
  const size_t off = (b.static_cursor + align - 1) / align * align;
  b.statics.push_back({tag, off, bytes, name});
  b.static_cursor = off + bytes + kRedZone;
  b.static_bytes += bytes;
  std::memset(b.arena + off, 0xff, bytes);
  std::memset(b.valid + off, 1, bytes);
  return b.arena + off;
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
  const Launch& l = *g_launch;
  const Block& b = *g_blk;
  const int t = g_cur->linear;
  for (size_t k = 0; k < n; ++k) {
    const size_t off = offset + k;
    if (b.valid[off] == 0) {
      fail_in_fiber(thread_str(t) + ": shared-memory overrun: " + (write ? "write" : "read") +
                    " of " + std::to_string(n) + " bytes at " + describe_offset(l, b, offset) +
                    (off == offset ? std::string() : " reaches " + describe_offset(l, b, off)) +
                    ", outside every shared array");
    }
    ShadowCell& c = b.shadow[off];
    const uint32_t e = b.epoch;
    if (write) {
      if (c.w_epoch == e && c.w_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " writes " +
                      describe_offset(l, b, off) + " that " + thread_str(c.w_tid) +
                      " wrote since the last __syncthreads");
      }
      if (c.r_epoch == e && c.r_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " writes " +
                      describe_offset(l, b, off) + " that " +
                      (c.r_tid == -2 ? std::string("other threads") : thread_str(c.r_tid)) +
                      " read since the last __syncthreads");
      }
      c.w_epoch = e;
      c.w_tid = t;
    } else {
      if (c.w_epoch == e && c.w_tid != t) {
        fail_in_fiber("shared-memory race: " + thread_str(t) + " reads " +
                      describe_offset(l, b, off) + " that " + thread_str(c.w_tid) +
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
