// The traffic counter of the emulated build (tests/emu_testing.py traffic(); off unless a test
// turns it on, so the emulated suite pays one branch per access for it).
//
// Every global load and store of the instrumented sources reaches traffic_access: the
// -fsanitize=thread callbacks (emu_hooks.cpp) for scalar accesses, check_vector_access (the
// load_vec/store_vec helpers of bn_utils.cuh) for vector ones, which are counted as one access of
// their full width -- the host compiler may split a 16- or 32-byte copy into narrower moves, which
// would not be the GPU's one instruction; the moves of the copy that follows are skipped. An
// access is global when it falls inside an allocation of the running op (the poisoning allocator
// of emu_memory.cpp reports them: the guarded copies of the op's arguments, its outputs and its
// workspaces); anything else (fiber stacks, kernel parameters, shared memory) is not traffic.
//
// Per launch and allocation: bytes read and written (what the lanes asked for), and per
// warp-wide access the distinct 32-byte sectors touched against the ideal, ceil(bytes / 32) per
// contiguous run of the bytes the lanes asked for. The lanes of one warp access are those of a
// warp that execute the same instruction (the callback's return address) for the k-th time since
// the block started or passed its last barrier, on the same allocation in the same direction: the
// fibers of a warp run one after another, so the accesses are buffered per warp and grouped when
// the block reaches a barrier or ends. Per block, the bytes each allocation moved (min and max
// over the blocks that touched it: how much work a block gets).
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "emu_runtime.h"

// The counter's own accesses are instrumented too (every source of the emulated build is): its
// entry points are not, and mark the counter busy, so that the hooks do not count the counter.
#define FUSEDBN_EMU_NO_INSTRUMENT __attribute__((no_sanitize_thread, no_sanitize_undefined))

namespace fusedbn_emu {

bool g_traffic_on = false;
bool g_traffic_busy = false;
TrafficRange g_traffic_ranges[kTrafficRanges];
int g_traffic_nranges = 0;

namespace {

constexpr uintptr_t kSector = 32;

// One lane's access, buffered until its warp's accesses are grouped.
struct LaneAccess {
  uintptr_t pc;
  uint32_t occurrence;  // how many times the lane executed pc before, since the last barrier
  int32_t alloc_dir;    // allocation id * 2 + write
  uintptr_t lo;
  uint32_t n;
  bool operator<(const LaneAccess& o) const {
    if (pc != o.pc) return pc < o.pc;
    if (occurrence != o.occurrence) return occurrence < o.occurrence;
    if (alloc_dir != o.alloc_dir) return alloc_dir < o.alloc_dir;
    return lo < o.lo;
  }
  bool same_group(const LaneAccess& o) const {
    return pc == o.pc && occurrence == o.occurrence && alloc_dir == o.alloc_dir;
  }
};

// Per thread: the instructions it executed since the last barrier and how often (few distinct
// ones: a linear search beats a hash).
struct Occurrences {
  std::vector<std::pair<uintptr_t, uint32_t>> v;
  uint32_t next(uintptr_t pc) {
    for (auto& e : v)
      if (e.first == pc) return e.second++;
    v.emplace_back(pc, 1u);
    return 0;
  }
};

struct CallRecord {
  std::string op;
  std::vector<TrafficAlloc> allocs;
  std::vector<TrafficLaunch> launches;
};

std::vector<CallRecord> g_done;           // finished calls, not yet taken
std::unique_ptr<CallRecord> g_call;       // the running op's record
int g_depth = 0;                          // nested op scopes (only the outermost records)
std::map<uintptr_t, int> g_by_addr;       // live allocations of the running op: base -> id
uintptr_t g_hit_lo = 1, g_hit_hi = 0;     // the last allocation found
int g_hit_id = -1;

TrafficLaunch* g_launch = nullptr;        // the running launch's record
std::vector<std::vector<LaneAccess>> g_warps;  // per warp of the block
std::vector<Occurrences> g_occurrence;         // per thread
std::vector<uint64_t> g_block_bytes;           // per allocation id: bytes of the running block
int g_skip_thread = -1;                   // the moves of a vector copy already counted
uintptr_t g_skip_lo = 0, g_skip_hi = 0;

int find_alloc(uintptr_t a) {
  if (a >= g_hit_lo && a < g_hit_hi) return g_hit_id;
  auto it = g_by_addr.upper_bound(a);
  if (it == g_by_addr.begin()) return -1;
  --it;
  const TrafficAlloc& r = g_call->allocs[it->second];
  if (a >= r.base + r.bytes) return -1;
  g_hit_lo = r.base;
  g_hit_hi = r.base + r.bytes;
  g_hit_id = it->second;
  return it->second;
}

// The live allocations for the hooks' inline check; past kTrafficRanges of them, one range that
// covers them all (the hooks then call traffic_access for addresses between them too).
void sync_ranges() {
  int k = 0;
  if (g_by_addr.size() <= static_cast<size_t>(kTrafficRanges)) {
    for (const auto& kv : g_by_addr) {
      const TrafficAlloc& a = g_call->allocs[kv.second];
      g_traffic_ranges[k++] = {a.base, a.base + a.bytes};
    }
  } else {
    const TrafficAlloc& first = g_call->allocs[g_by_addr.begin()->second];
    const TrafficAlloc& last = g_call->allocs[g_by_addr.rbegin()->second];
    g_traffic_ranges[k++] = {first.base, last.base + last.bytes};
  }
  g_traffic_nranges = k;
}

void forget_hit() {
  g_hit_lo = 1;
  g_hit_hi = 0;
  g_hit_id = -1;
}

void record(int thread, int id, uintptr_t a, size_t n, bool write, uintptr_t pc) {
  const uint32_t occ = g_occurrence[thread].next(pc);
  g_warps[thread / 32].push_back(
      {pc, occ, id * 2 + (write ? 1 : 0), a, static_cast<uint32_t>(n)});
  if (static_cast<size_t>(id) >= g_block_bytes.size()) g_block_bytes.resize(id + 1, 0);
  g_block_bytes[id] += n;
}

// Groups the buffered accesses into warp accesses and adds them to the launch's record.
void close_groups() {
  for (auto& warp : g_warps) {
    std::sort(warp.begin(), warp.end());
    size_t i = 0;
    while (i < warp.size()) {  // one warp access (group) per step, its lanes sorted by address
      const LaneAccess& g = warp[i];
      TrafficDir& d = g_launch->tensors[g.alloc_dir / 2].dir[g.alloc_dir & 1];
      uint64_t sectors = 0, ideal = 0, bytes = 0;
      uintptr_t last_sector = ~uintptr_t{0};
      while (i < warp.size() && warp[i].same_group(g)) {  // one contiguous run per step
        const uintptr_t lo = warp[i].lo;
        uintptr_t hi = lo + warp[i].n;
        bytes += warp[i].n;
        for (++i; i < warp.size() && warp[i].same_group(g) && warp[i].lo <= hi; ++i) {
          hi = std::max<uintptr_t>(hi, warp[i].lo + warp[i].n);
          bytes += warp[i].n;
        }
        ideal += (hi - lo + kSector - 1) / kSector;
        uintptr_t s0 = lo / kSector;
        const uintptr_t s1 = (hi - 1) / kSector;
        if (s0 == last_sector) ++s0;
        if (s1 >= s0) sectors += s1 - s0 + 1;
        last_sector = s1;
      }
      d.bytes += bytes;
      d.accesses += 1;
      d.sectors += sectors;
      d.ideal += std::min(ideal, sectors);  // runs a few bytes apart may share their sectors
    }
    warp.clear();
  }
  for (auto& o : g_occurrence) o.v.clear();
  g_skip_thread = -1;
}

struct Busy {
  FUSEDBN_EMU_NO_INSTRUMENT Busy() { g_traffic_busy = true; }
  FUSEDBN_EMU_NO_INSTRUMENT ~Busy() { g_traffic_busy = false; }
};

}  // namespace

void traffic_set_enabled(bool on) { g_traffic_on = on; }

FUSEDBN_EMU_NO_INSTRUMENT std::vector<TrafficCall> traffic_take() {
  const Busy busy;
  std::vector<TrafficCall> out;
  for (CallRecord& c : g_done) out.push_back({c.op, std::move(c.allocs), std::move(c.launches)});
  g_done.clear();
  return out;
}

FUSEDBN_EMU_NO_INSTRUMENT bool traffic_op_begin() {
  const Busy busy;
  if (!g_traffic_on) return false;
  if (g_depth++ > 0) return true;
  g_call.reset(new CallRecord);
  g_by_addr.clear();
  g_traffic_nranges = 0;
  forget_hit();
  return true;
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_op_end(const std::string& op) {
  const Busy busy;
  if (--g_depth > 0 || !g_call) return;
  for (TrafficAlloc& a : g_call->allocs) a.live_at_end = !a.freed;
  g_call->op = op;
  g_done.push_back(std::move(*g_call));
  g_call.reset();
  g_by_addr.clear();
  g_traffic_nranges = 0;
  forget_hit();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_alloc(const void* p, size_t n) {
  const Busy busy;
  if (!g_call) return;
  const auto base = reinterpret_cast<uintptr_t>(p);
  const int id = static_cast<int>(g_call->allocs.size());
  TrafficAlloc a;
  a.base = base;
  a.bytes = n;
  g_call->allocs.push_back(a);
  g_by_addr[base] = id;
  forget_hit();
  sync_ranges();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_free(const void* p) {
  const Busy busy;
  if (!g_call) return;
  const auto it = g_by_addr.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_by_addr.end()) return;
  g_call->allocs[it->second].freed = true;
  g_by_addr.erase(it);
  forget_hit();
  sync_ranges();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_arg(const void* p, int index) {
  const Busy busy;
  if (!g_call) return;
  const auto it = g_by_addr.find(reinterpret_cast<uintptr_t>(p));
  if (it != g_by_addr.end()) g_call->allocs[it->second].arg = index;
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_launch_begin(const std::string& kernel, dim3 grid,
                                                    dim3 block) {
  const Busy busy;
  if (!g_call) return;
  TrafficLaunch l;
  l.kernel = kernel;
  l.grid = grid;
  l.block = block;
  g_call->launches.push_back(std::move(l));
  g_launch = &g_call->launches.back();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_block_begin(int nthreads) {
  const Busy busy;
  if (g_launch == nullptr) return;
  g_warps.resize((nthreads + 31) / 32);
  g_occurrence.resize(nthreads);
  g_block_bytes.clear();
  g_skip_thread = -1;
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_barrier() {
  const Busy busy;
  if (g_launch != nullptr) close_groups();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_block_end() {
  const Busy busy;
  if (g_launch == nullptr) return;
  close_groups();
  g_launch->blocks += 1;
  for (size_t id = 0; id < g_block_bytes.size(); ++id) {
    const uint64_t b = g_block_bytes[id];
    if (b == 0) continue;
    TrafficTensor& t = g_launch->tensors[static_cast<int>(id)];
    t.block_min = t.blocks_touching == 0 ? b : std::min(t.block_min, b);
    t.block_max = std::max(t.block_max, b);
    t.blocks_touching += 1;
  }
  g_block_bytes.clear();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_block_suspend(std::vector<uint64_t>& saved) {
  const Busy busy;
  if (g_launch == nullptr) return;
  close_groups();
  saved.swap(g_block_bytes);
  g_block_bytes.clear();
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_block_resume(int nthreads, std::vector<uint64_t>& saved) {
  traffic_block_begin(nthreads);
  const Busy busy;
  if (g_launch != nullptr) g_block_bytes.swap(saved);
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_launch_end() {
  const Busy busy;
  g_launch = nullptr;
}

// The calling thread t and the tracked allocation id that address a falls in, for an access to
// count: false when none is counted (no counted launch, host code, an untracked address).
static FUSEDBN_EMU_NO_INSTRUMENT bool counted(uintptr_t a, int& t, int& id) {
  if (g_launch == nullptr) return false;
  t = current_thread();
  if (t < 0) return false;
  id = find_alloc(a);
  return id >= 0;
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_access(const void* p, size_t n, bool write,
                                              const void* pc) {
  const Busy busy;
  const auto a = reinterpret_cast<uintptr_t>(p);
  int t = -1, id = -1;
  if (!counted(a, t, id)) return;
  if (t == g_skip_thread) {
    if (a >= g_skip_lo && a + n <= g_skip_hi) return;  // a move of the vector copy just counted
    g_skip_thread = -1;
  }
  record(t, id, a, n, write, reinterpret_cast<uintptr_t>(pc));
}

FUSEDBN_EMU_NO_INSTRUMENT void traffic_vector(const void* p, size_t n, bool write,
                                              const void* pc) {
  const Busy busy;
  const auto a = reinterpret_cast<uintptr_t>(p);
  int t = -1, id = -1;
  if (!counted(a, t, id)) return;
  record(t, id, a, n, write, reinterpret_cast<uintptr_t>(pc));
  g_skip_thread = t;
  g_skip_lo = a;
  g_skip_hi = a + n;
}

}  // namespace fusedbn_emu
