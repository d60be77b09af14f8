// Cooperative fibers for the CUDA emulation: a context switch of the callee-saved registers on
// x86-64 (about ten instructions, no system call), ucontext elsewhere.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fusedbn_emu {

// A fiber's stack: kStackBytes usable, one inaccessible page below it (overflow faults).
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

inline char* map_stack() {
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("fusedbn_emu: cannot map a fiber stack");
  mprotect(p, kGuardBytes, PROT_NONE);
  return static_cast<char*>(p);
}

#if defined(__x86_64__)

extern "C" void fusedbn_emu_switch(void** save_sp, void* load_sp);

struct Context {
  void* sp = nullptr;
};

// Prepares ctx to start entry() on the stack [stack, stack + size) at its first switch.
inline void make_context(Context& ctx, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                   // entry's return address: none
  *--sp = reinterpret_cast<uint64_t>(entry);   // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = 0;       // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  ctx.sp = sp;
}

inline void switch_context(Context& from, Context& to) { fusedbn_emu_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

inline void make_context(Context& ctx, char* stack, size_t size, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

}  // namespace fusedbn_emu
