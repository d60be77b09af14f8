// The callbacks of the compiler instrumentation the emulated build is compiled with:
//  * -fsanitize=thread: the compiler calls __tsan_readN/__tsan_writeN before every memory access
//    it cannot prove thread-private, and __tsan_atomic* for every atomic operation. No
//    ThreadSanitizer runtime is linked: these definitions replace it. An access inside the
//    shared-memory arena of the running launch goes to the emulator's shared-memory checks
//    (red zones, races); any other goes to the traffic counter when a test turned it on
//    (emu_traffic.cpp), else returns at once; the atomics are performed as such.
//  * -fsanitize=undefined (alignment, signed overflow, shifts, bounds, null, ...): the handlers
//    of the UBSan ABI, without libubsan: each reports the check that failed and where, as an
//    error of the running launch (or of the running op, in host code).
#include <cstdint>
#include <cstdio>
#include <string>

#include "emu_runtime.h"

#define FUSEDBN_EMU_NO_INSTRUMENT \
  __attribute__((no_sanitize_thread, no_sanitize_undefined, visibility("default")))

namespace fusedbn_emu {

static unsigned char* g_lo = nullptr;
static size_t g_span = 0;

void set_arena_active(unsigned char* lo, size_t bytes) {
  g_lo = lo;
  g_span = bytes;
}

}  // namespace fusedbn_emu

using fusedbn_emu::g_lo;
using fusedbn_emu::g_span;

// Whether p lies in an allocation of the running op (the traffic counter's candidates): most
// accesses are to fiber stacks, rejected here without a call.
FUSEDBN_EMU_NO_INSTRUMENT static inline bool traffic_candidate(uintptr_t p) {
  for (int i = 0; i < fusedbn_emu::g_traffic_nranges; ++i) {
    if (p - fusedbn_emu::g_traffic_ranges[i].lo <
        fusedbn_emu::g_traffic_ranges[i].hi - fusedbn_emu::g_traffic_ranges[i].lo)
      return true;
  }
  return false;
}

// pc: the instrumented access's return address (the traffic counter groups lanes by it).
FUSEDBN_EMU_NO_INSTRUMENT static inline void emu_access(const void* p, size_t n, bool write,
                                                        const void* pc) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(g_lo);
  if (off < g_span) {
    fusedbn_emu::shared_access(off, n, write);
  } else if (fusedbn_emu::g_traffic_on && !fusedbn_emu::g_traffic_busy &&
             traffic_candidate(reinterpret_cast<uintptr_t>(p))) {
    fusedbn_emu::traffic_access(p, n, write, pc);
  }
}
#define FUSEDBN_EMU_PC __builtin_return_address(0)

extern "C" {

FUSEDBN_EMU_NO_INSTRUMENT void __tsan_init() {}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_func_entry(void*) {}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_func_exit() {}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_vptr_update(void**, void*) {}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_vptr_read(void**) {}

#define FUSEDBN_EMU_HOOK(name, n, w) \
  FUSEDBN_EMU_NO_INSTRUMENT void name(void* p) { emu_access(p, n, w, FUSEDBN_EMU_PC); }
#define FUSEDBN_EMU_ACCESS(n)                              \
  FUSEDBN_EMU_HOOK(__tsan_read##n, n, false)               \
  FUSEDBN_EMU_HOOK(__tsan_write##n, n, true)               \
  FUSEDBN_EMU_HOOK(__tsan_unaligned_read##n, n, false)     \
  FUSEDBN_EMU_HOOK(__tsan_unaligned_write##n, n, true)     \
  FUSEDBN_EMU_HOOK(__tsan_volatile_read##n, n, false)      \
  FUSEDBN_EMU_HOOK(__tsan_volatile_write##n, n, true)
FUSEDBN_EMU_ACCESS(1)
FUSEDBN_EMU_ACCESS(2)
FUSEDBN_EMU_ACCESS(4)
FUSEDBN_EMU_ACCESS(8)
FUSEDBN_EMU_ACCESS(16)
#undef FUSEDBN_EMU_ACCESS
#undef FUSEDBN_EMU_HOOK

FUSEDBN_EMU_NO_INSTRUMENT void __tsan_read_range(void* p, unsigned long n) {
  emu_access(p, n, false, FUSEDBN_EMU_PC);
}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_write_range(void* p, unsigned long n) {
  emu_access(p, n, true, FUSEDBN_EMU_PC);
}

// Atomics (ThreadSanitizer's ABI: memory orders 0..5 as __ATOMIC_*); performed sequentially
// consistent, which is at least as strong as asked.
#define FUSEDBN_EMU_RMW(bits, T, op)                                                               \
  FUSEDBN_EMU_NO_INSTRUMENT T __tsan_atomic##bits##_##op(volatile T* a, T v, int) {                \
    return __atomic_##op(a, v, __ATOMIC_SEQ_CST);                                                  \
  }
#define FUSEDBN_EMU_CAS(bits, T, kind)                                                             \
  FUSEDBN_EMU_NO_INSTRUMENT int __tsan_atomic##bits##_compare_exchange_##kind(                     \
      volatile T* a, T* c, T v, int, int) {                                                        \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
  }
#define FUSEDBN_EMU_ATOMICS(bits, T)                                                               \
  FUSEDBN_EMU_NO_INSTRUMENT T __tsan_atomic##bits##_load(const volatile T* a, int) {               \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                   \
  }                                                                                                \
  FUSEDBN_EMU_NO_INSTRUMENT void __tsan_atomic##bits##_store(volatile T* a, T v, int) {            \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                \
  FUSEDBN_EMU_NO_INSTRUMENT T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                            \
  }                                                                                                \
  FUSEDBN_EMU_RMW(bits, T, fetch_add)                                                              \
  FUSEDBN_EMU_RMW(bits, T, fetch_sub)                                                              \
  FUSEDBN_EMU_RMW(bits, T, fetch_and)                                                              \
  FUSEDBN_EMU_RMW(bits, T, fetch_or)                                                               \
  FUSEDBN_EMU_RMW(bits, T, fetch_xor)                                                              \
  FUSEDBN_EMU_RMW(bits, T, fetch_nand)                                                             \
  FUSEDBN_EMU_CAS(bits, T, strong)                                                                 \
  FUSEDBN_EMU_CAS(bits, T, weak)                                                                   \
  FUSEDBN_EMU_NO_INSTRUMENT T __tsan_atomic##bits##_compare_exchange_val(volatile T* a,            \
                                                                         T c, T v, int, int) {     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
    return c;                                                                                      \
  }
FUSEDBN_EMU_ATOMICS(8, char)
FUSEDBN_EMU_ATOMICS(16, short)
FUSEDBN_EMU_ATOMICS(32, int)
FUSEDBN_EMU_ATOMICS(64, long)
#undef FUSEDBN_EMU_ATOMICS
#undef FUSEDBN_EMU_CAS
#undef FUSEDBN_EMU_RMW

FUSEDBN_EMU_NO_INSTRUMENT void __tsan_atomic_thread_fence(int) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
FUSEDBN_EMU_NO_INSTRUMENT void __tsan_atomic_signal_fence(int) {
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

}  // extern "C"

// ---- UBSan ------------------------------------------------------------------------------------

namespace {

struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};
struct OutOfBoundsData {
  SourceLocation loc;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};

FUSEDBN_EMU_NO_INSTRUMENT std::string at_loc(const SourceLocation& loc) {
  std::string f = loc.file != nullptr ? loc.file : "?";
  const size_t p = f.rfind("csrc/");
  if (p != std::string::npos) f = f.substr(p);
  return f + ":" + std::to_string(loc.line) + ":" + std::to_string(loc.column);
}

FUSEDBN_EMU_NO_INSTRUMENT void report(const void* data, const char* what) {
  const SourceLocation& loc = *static_cast<const SourceLocation*>(data);
  fusedbn_emu::report_undefined_behaviour(std::string(what) + " at " + at_loc(loc));
}

}  // namespace

extern "C" {

FUSEDBN_EMU_NO_INSTRUMENT void __ubsan_handle_type_mismatch_v1(void* data, uintptr_t ptr) {
  const TypeMismatchData& d = *static_cast<const TypeMismatchData*>(data);
  const uintptr_t align = uintptr_t{1} << d.log_alignment;
  char buf[512];
  if (ptr == 0) {
    std::snprintf(buf, sizeof(buf), "null pointer access of type %s", d.type->name);
  } else if (align != 0 && (ptr & (align - 1)) != 0) {
    std::snprintf(buf, sizeof(buf),
                  "misaligned address %p for type %s, which requires %zu-byte alignment",
                  reinterpret_cast<void*>(ptr), d.type->name, static_cast<size_t>(align));
  } else {
    std::snprintf(buf, sizeof(buf), "insufficient object size at %p for type %s",
                  reinterpret_cast<void*>(ptr), d.type->name);
  }
  fusedbn_emu::report_undefined_behaviour(std::string(buf) + " at " + at_loc(d.loc));
}

FUSEDBN_EMU_NO_INSTRUMENT void __ubsan_handle_out_of_bounds(void* data, uintptr_t index) {
  const OutOfBoundsData& d = *static_cast<const OutOfBoundsData*>(data);
  fusedbn_emu::report_undefined_behaviour("index " + std::to_string(index) +
                                          " out of bounds for type " + d.array_type->name +
                                          " at " + at_loc(d.loc));
}

#define FUSEDBN_EMU_UB(name, what, ...) \
  FUSEDBN_EMU_NO_INSTRUMENT void __ubsan_handle_##name(void* data, ##__VA_ARGS__) { \
    report(data, what);                                                              \
  }
FUSEDBN_EMU_UB(add_overflow, "signed integer overflow in an addition", uintptr_t, uintptr_t)
FUSEDBN_EMU_UB(sub_overflow, "signed integer overflow in a subtraction", uintptr_t, uintptr_t)
FUSEDBN_EMU_UB(mul_overflow, "signed integer overflow in a multiplication", uintptr_t, uintptr_t)
FUSEDBN_EMU_UB(negate_overflow, "signed integer overflow in a negation", uintptr_t)
FUSEDBN_EMU_UB(divrem_overflow, "integer division overflow or division by zero", uintptr_t,
               uintptr_t)
FUSEDBN_EMU_UB(shift_out_of_bounds, "shift out of bounds", uintptr_t, uintptr_t)
FUSEDBN_EMU_UB(pointer_overflow, "pointer arithmetic overflow", uintptr_t, uintptr_t)
FUSEDBN_EMU_UB(load_invalid_value, "load of an invalid value (bool or enum)", uintptr_t)
FUSEDBN_EMU_UB(float_cast_overflow, "float to integer conversion out of range", uintptr_t)
FUSEDBN_EMU_UB(vla_bound_not_positive, "variable-length array bound not positive", uintptr_t)
FUSEDBN_EMU_UB(nonnull_arg, "null pointer passed as an argument declared nonnull")
FUSEDBN_EMU_UB(nonnull_return_v1, "null pointer returned from a function declared returns_nonnull",
               void*)
FUSEDBN_EMU_UB(invalid_builtin, "invalid argument to a builtin")
#undef FUSEDBN_EMU_UB

FUSEDBN_EMU_NO_INSTRUMENT void __ubsan_handle_builtin_unreachable(void* data) {
  const SourceLocation& loc = *static_cast<const SourceLocation*>(data);
  std::fprintf(stderr, "fusedbn_emu: __builtin_unreachable reached at %s\n", at_loc(loc).c_str());
  std::abort();
}
FUSEDBN_EMU_NO_INSTRUMENT void __ubsan_handle_missing_return(void* data) {
  const SourceLocation& loc = *static_cast<const SourceLocation*>(data);
  std::fprintf(stderr, "fusedbn_emu: end of a value-returning function reached at %s\n",
               at_loc(loc).c_str());
  std::abort();
}

}  // extern "C"
