// Memory of the emulated op library: a CPU allocator that fills every allocation with 0xff bytes
// (NaN in every floating type, so an element no kernel wrote shows) between two guard zones of
// 0xff bytes (checked when the op returns and when the memory is freed, so a write past either
// end of a tensor shows; a read there reads NaN), and OpScope (emu.h), which installs it for the
// duration of an op and copies the op's tensor arguments into such memory.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emu_runtime.h"

namespace fusedbn_emu {

namespace {

constexpr size_t kGuard = 256;  // bytes of poison before and after every allocation
constexpr unsigned char kPoison = 0xff;

struct Block {
  unsigned char* raw;
  size_t n;        // bytes asked for
  size_t padded;   // bytes of the user part, rounded up to 64
};

std::mutex g_mu;
std::set<Block*>& live() {
  static std::set<Block*> s;
  return s;
}
std::vector<std::string>& pending() {
  static std::vector<std::string> v;
  return v;
}
std::vector<Block*>* g_scope_blocks = nullptr;  // allocations of the running op

bool all_poison(const unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != kPoison) return false;
  return true;
}

// Empty when the guard zones are intact, else a description.
std::string check_guards(const Block* b) {
  std::string s;
  if (!all_poison(b->raw, kGuard)) s = "before the start";
  if (!all_poison(b->raw + kGuard + b->n, kGuard + (b->padded - b->n)))
    s += s.empty() ? "past the end" : " and past the end";
  if (s.empty()) return s;
  return "a kernel wrote " + s + " of a " + std::to_string(b->n) + "-byte allocation";
}

void free_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  const std::string err = check_guards(b);
  if (g_traffic_on) traffic_free(b->raw + kGuard);
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    live().erase(b);
    if (!err.empty()) pending().push_back(err);
  }
  std::free(b->raw);
  delete b;
}

class PoisonAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t padded = (n + 63) / 64 * 64;
    const size_t total = kGuard + padded + kGuard;
    auto* raw = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    TORCH_CHECK(raw != nullptr, "fusedbn_emu: out of memory (", n, " bytes)");
    std::memset(raw, kPoison, total);
    Block* b = new Block{raw, n, padded};
    {
      const std::lock_guard<std::mutex> lock(g_mu);
      live().insert(b);
      if (g_scope_blocks != nullptr) g_scope_blocks->push_back(b);
    }
    if (g_traffic_on) traffic_alloc(raw + kGuard, n);
    return {raw + kGuard, b, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

PoisonAllocator g_alloc;
std::recursive_mutex g_op_mu;  // emulated ops run one at a time

}  // namespace

void add_pending_error(const std::string& msg) {
  const std::lock_guard<std::mutex> lock(g_mu);
  pending().push_back(msg);
}

std::string take_pending_errors() {
  const std::lock_guard<std::mutex> lock(g_mu);
  std::string s;
  for (const std::string& e : pending()) s += (s.empty() ? "" : "; ") + e;
  pending().clear();
  return s;
}

struct OpScope::Impl {
  struct Arg {
    int index;
    bool mutating;
    at::Tensor original, copy;
    std::vector<unsigned char> snapshot;  // the copy's storage bytes before the op
  };
  std::unique_lock<std::recursive_mutex> lock{g_op_mu};
  c10::Allocator* previous = nullptr;
  std::vector<Block*> blocks;
  std::vector<Block*>* outer_blocks = nullptr;
  std::vector<Arg> args;
  bool finished = false;
  bool traffic = false;  // this scope records the op's traffic (traffic_op_begin)
};

OpScope::OpScope() : impl_(new Impl) {
  std::string stale = take_pending_errors();  // of an earlier op, found after it returned
  impl_->traffic = traffic_op_begin();
  impl_->previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&g_alloc, /*priority=*/255);
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    impl_->outer_blocks = g_scope_blocks;
    g_scope_blocks = &impl_->blocks;
  }
  if (!stale.empty()) {
    add_pending_error("after an earlier op returned: " + stale);
  }
}

OpScope::~OpScope() {
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    g_scope_blocks = impl_->outer_blocks;
  }
  c10::SetCPUAllocator(impl_->previous, /*priority=*/255);
  if (impl_->traffic) traffic_op_end("?");  // finish did not run: an exception in the op
  delete impl_;
}

at::Tensor OpScope::guard_copy(const at::Tensor& t, int index, bool mutating) {
  if (!t.defined() || t.device().type() != c10::DeviceType::CPU) return t;
  const c10::Storage& src = t.storage();
  const size_t nbytes = src.nbytes();
  c10::Storage st(c10::Storage::use_byte_size_t(), nbytes, g_alloc.allocate(nbytes), &g_alloc,
                  /*resizable=*/false);
  at::Tensor copy = at::empty({0}, t.options().requires_grad(false));
  copy.set_(st, t.storage_offset(), t.sizes(), t.strides());
  if (t.numel() > 0) {
    if (at::has_internal_overlap(copy) == at::MemOverlap::No) {
      copy.copy_(t.detach());  // the bytes outside the view stay poison
    } else if (nbytes > 0) {
      std::memcpy(st.mutable_data(), src.data(), nbytes);
    }
  }
  traffic_arg(st.data(), index);
  Impl::Arg a{index, mutating, t, copy, {}};
  const auto* p = static_cast<const unsigned char*>(st.data());
  a.snapshot.assign(p, p + nbytes);
  impl_->args.push_back(std::move(a));
  return copy;
}

namespace {
// "fusedbn::cuda::forward_train" from OpWrap's __PRETTY_FUNCTION__.
std::string op_name(const char* op) {
  std::string name = op;
  const size_t p = name.find("f = ");
  if (p != std::string::npos) name = name.substr(p + 4, name.find_first_of(",;]", p) - p - 4);
  return name;
}
}  // namespace

void OpScope::finish(const char* op) {
  if (impl_->traffic) {
    traffic_op_end(op_name(op));
    impl_->traffic = false;
  }
  std::string errors;
  auto add = [&](const std::string& e) { errors += (errors.empty() ? "" : "; ") + e; };
  for (Impl::Arg& a : impl_->args) {
    const c10::Storage& st = a.copy.storage();
    const bool changed =
        std::memcmp(st.data(), a.snapshot.data(), a.snapshot.size()) != 0;
    if (!changed) continue;
    if (a.mutating) {
      a.original.detach().copy_(a.copy);
    } else {
      add("the op wrote to its argument " + std::to_string(a.index) +
          ", which it may only read");
    }
  }
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    for (Block* b : impl_->blocks) {
      if (live().count(b) == 0) continue;
      const std::string e = check_guards(b);
      if (!e.empty()) add(e);
    }
  }
  const std::string late = take_pending_errors();
  if (!late.empty()) add(late);
  if (!errors.empty()) {
    throw_error(op_name(op) + ": " + errors);
  }
}

}  // namespace fusedbn_emu
