// The elementwise kernel of the fused batch norm + activation ops: one pass over the canonical
// layout (common.h) with up to three inputs, two outputs, per-channel coefficients [kParams][C]
// in the accumulation type, and the packed sign mask (bit e of byte e / 8, LSB first) read or
// written.
//
// A thread handles groups of 8 consecutive elements (in memory order), so that every group owns
// exactly one mask byte: no atomics, and the bytes of a warp are one coalesced 32-byte store.
// The 8 values of a group are loaded as one aligned vector (2 x 16 bytes for float, 16 bytes for
// half/bfloat16) when every pointer is aligned to 8 elements, else element by element; the last
// group may be partial. Grid-stride over groups with a one-wave grid; as in bn_elementwise.cu the
// (position in plane, channel) of a thread's group advances by a constant step per iteration, so
// there is no division per element; channels-last is the same walk with planes of 1 element.
// The activation is a run-time value, switched on once per group (uniform over the grid).
//
// channels_last with C a multiple of 8 (act_ew_rows_kernel): as ew_rows_kernel of
// bn_elementwise.cu, threads along C, each owning one group of 8 channels (a mask byte of every
// row, since rows start at multiples of 8) whose 8 x kParams coefficients it loads once into
// registers, and striding over at least 4 rows (one wave of blocks, as ew_rows_kernel); otherwise
// the coefficients of every element's channel are loaded per element (the channel changes from
// one element to the next).
//
// An op Fn provides kIn, kOut, kParams, kUsesAct and
//   template <Act A> apply(const acc_t (&in)[kIn], const acc_t* p, bool bit_in,
//                          acc_t (&out)[kOut], bool& bit_out, const ActEwArgs& a)
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activation.h"
#include "bn_utils.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {

constexpr int kGroup = 8;  // elements per thread per step: one mask byte
constexpr int kActRowsPerThread = 4;  // act_ew_rows_kernel: rows per thread at least (as U)

template <typename T>
struct ActEwArgs {
  using acc_t = at::opmath_type<T>;
  const T* in[3] = {nullptr, nullptr, nullptr};  // nullptr: that input reads as 0
  T* out[2] = {nullptr, nullptr};                // nullptr: that output is not written
  const uint8_t* mask_in = nullptr;
  uint8_t* mask_out = nullptr;
  const acc_t* params = nullptr;  // [kParams][C]
  int64_t C = 0, S = 1, numel = 0;
  int64_t step_pos = 0, step_ch = 0;
  acc_t slope = acc_t(0), inv_slope = acc_t(1);
  int act = 0;
  bool relu_bits = false;  // mask convention: relu (NaN counts as positive) or leaky_relu
  bool dx_train = false;   // act_backward's dx passes: training mode (batch statistics)
  bool vec = false;        // every pointer aligned to a group
};

template <int NP, typename acc_t, typename index_t>
__device__ __forceinline__ void load_params(const acc_t* params, index_t C, index_t c,
                                            acc_t (&p)[NP > 0 ? NP : 1]) {
#pragma unroll
  for (int k = 0; k < NP; ++k) p[k] = __ldg(params + k * C + c);
}

template <int NP, typename acc_t>
using GroupParams = acc_t[kGroup][NP > 0 ? NP : 1];  // the coefficients of each element

// The coefficients of act_ew_apply's elements, asked for in element order (at(0), at(1), ...):
// RowParams, the fixed channels of a act_ew_rows_kernel thread (element j: channel j);
// WalkParams, the generic walk: one channel's set, re-read where the group crosses into the next
// plane (channel), so that only one set is live (an [8][kParams] copy per group kept ~50
// registers of double coefficients live and put them in local memory).
template <int NP, typename acc_t>
struct RowParams {
  const GroupParams<NP, acc_t>& p;
  __device__ __forceinline__ const acc_t* at(int j) const { return p[j]; }
};

template <int NP, typename acc_t, typename index_t>
struct WalkParams {
  const acc_t* params;
  index_t C, S, pos, ch;
  acc_t cur[NP > 0 ? NP : 1];
  __device__ __forceinline__ const acc_t* at(int j) {
    if (j > 0 && ++pos == S) {
      pos = 0;
      ch = ch + 1 == C ? 0 : ch + 1;
      load_params<NP>(params, C, ch, cur);
    }
    return cur;
  }
};

// The group of n elements at e0: loads, Fn, stores, the mask byte; ps.at(j): element j's
// coefficients.
template <class Fn, Act A, typename T, typename index_t, class Params>
__device__ __forceinline__ void act_ew_apply(const ActEwArgs<T>& a, index_t e0, int n,
                                             Params& ps) {
  using acc_t = at::opmath_type<T>;
  Vec<T, kGroup> v[Fn::kIn];
#pragma unroll
  for (int i = 0; i < Fn::kIn; ++i) {
    if (a.in[i] == nullptr) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) v[i].v[j] = static_cast<T>(0.0f);
    } else if (n == kGroup && a.vec) {
      v[i] = load_vec<T, kGroup>(a.in[i] + e0);
    } else {
      v[i] = load_partial<T, kGroup>(a.in[i] + e0, 0, n);
    }
  }
  const unsigned bits_in = a.mask_in != nullptr ? a.mask_in[e0 >> 3] : 0u;
  Vec<T, kGroup> o[Fn::kOut > 0 ? Fn::kOut : 1];
  unsigned bits_out = 0;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < n) {
      acc_t in[Fn::kIn], out[Fn::kOut > 0 ? Fn::kOut : 1];
#pragma unroll
      for (int i = 0; i < Fn::kIn; ++i) in[i] = static_cast<acc_t>(v[i].v[j]);
      bool bit = false;
      Fn::template apply<A>(in, ps.at(j), ((bits_in >> j) & 1u) != 0, out, bit, a);
#pragma unroll
      for (int k = 0; k < Fn::kOut; ++k) o[k].v[j] = static_cast<T>(out[k]);
      bits_out |= static_cast<unsigned>(bit) << j;
    }
  }
#pragma unroll
  for (int k = 0; k < Fn::kOut; ++k) {
    if (a.out[k] == nullptr) continue;
    if (n == kGroup && a.vec) {
      store_vec<T, kGroup>(a.out[k] + e0, o[k]);
    } else {
      // Unrolled with a guard: a loop to the run-time n indexes o[k] dynamically, which puts it
      // in local memory.
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
        if (j < n) a.out[k][e0 + j] = o[k].v[j];
    }
  }
  if (a.mask_out != nullptr) a.mask_out[e0 >> 3] = static_cast<uint8_t>(bits_out);
}

// The generic walk: the coefficients of the group's channel, re-read where it crosses into the
// next plane (channel).
template <class Fn, Act A, typename T, typename index_t>
__device__ __forceinline__ void act_ew_group(const ActEwArgs<T>& a, index_t e0, int n,
                                             index_t pos, index_t ch) {
  using acc_t = at::opmath_type<T>;
  constexpr int NP = Fn::kParams;
  WalkParams<NP, acc_t, index_t> ps{a.params, static_cast<index_t>(a.C),
                                    static_cast<index_t>(a.S), pos, ch, {}};
  load_params<NP>(a.params, ps.C, ch, ps.cur);
  act_ew_apply<Fn, A>(a, e0, n, ps);
}

// Runs the group with the activation a.act (uniform over the grid).
template <class Fn, typename T, typename index_t, class Group>
__device__ __forceinline__ void act_ew_dispatch(const ActEwArgs<T>& a, const Group& group) {
  if constexpr (Fn::kUsesAct) {
    dispatch_act(static_cast<Act>(a.act), group);
  } else {
    group(std::integral_constant<Act, Act::kIdentity>{});
  }
}

template <class Fn, typename T, typename index_t>
__global__ void __launch_bounds__(kBlockThreads) act_ew_kernel(const ActEwArgs<T> a) {
  const index_t S = a.S, C = a.C, numel = a.numel;
  const index_t groups = (numel + kGroup - 1) / kGroup;
  const index_t stride = static_cast<index_t>(gridDim.x) * kBlockThreads;
  index_t q = static_cast<index_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  index_t pos = 0, ch = 0;
  {
    const index_t e = q * kGroup;
    const index_t plane = e / S;
    pos = e - plane * S;
    ch = plane % C;
  }
  for (; q < groups; q += stride) {
    const index_t e0 = q * kGroup;
    const int n = static_cast<int>(min(static_cast<index_t>(kGroup), numel - e0));
    act_ew_dispatch<Fn, T, index_t>(a, [&](auto act) {
      act_ew_group<Fn, decltype(act)::value>(a, e0, n, pos, ch);
    });
    pos += a.step_pos;
    ch += a.step_ch;
    if (pos >= S) {
      pos -= S;
      ++ch;
    }
    if (ch >= C) ch -= C;
  }
}

// channels_last, C % kGroup == 0: blockDim (TX, TY), thread (tx, ty) of block (bx, by) owns the
// channel group g = bx * TX + tx and rows by * TY + ty, + gridDim.y * TY, ...
template <class Fn, typename T, typename index_t>
__global__ void __launch_bounds__(kBlockThreads) act_ew_rows_kernel(const ActEwArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int NP = Fn::kParams;
  const index_t C = a.C;
  const index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= C / kGroup) return;
  GroupParams<NP, acc_t> p;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) load_params<NP>(a.params, C, g * kGroup + j, p[j]);
  const index_t rows = a.numel / C;
  const index_t stride = static_cast<index_t>(gridDim.y) * blockDim.y;
  for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += stride) {
    const index_t e0 = r * C + g * kGroup;
    act_ew_dispatch<Fn, T, index_t>(a, [&](auto act) {
      RowParams<NP, acc_t> ps{p};
      act_ew_apply<Fn, decltype(act)::value>(a, e0, kGroup, ps);
    });
  }
}

// act_forward's map of one element (ApplyFn of bn_act_forward.cu, and its persistent rows store):
// z = ((x - hi) - lo) * s + b (affine_split, p: the channel's 4 coefficients), + r when has_r,
// returns act(z); bit: the sign of the output as rounded to T (the mask's bit).
template <Act A, typename T, typename acc_t>
__device__ __forceinline__ acc_t act_affine(acc_t x, const acc_t* p, bool has_r, acc_t r,
                                            acc_t slope, bool relu_bits, bool& bit) {
  acc_t z = affine_split(x, p);
  if (has_r) z += r;
  const acc_t y = ActFn<A>::f(z, slope);
  bit = positive_output(static_cast<acc_t>(static_cast<T>(y)), relu_bits);
  return y;
}

// The mask bits of a vector of V <= 8 elements e0, ..., e0 + V - 1 held by one lane (bit j: element
// e0 + j) stored into their byte e0 / 8 by threads along a row of the rows layout: the G = 8 / V
// consecutive lanes of one byte (lane % G == (e0 / V) % G, the group's first at a byte boundary;
// every lane of the group calls this) OR their bits, shifted to their place, by shuffles within
// the group, and the group's first lane stores the byte (as act_ew_apply forms the bytes: bit e %
// 8 of byte e / 8). The byte is written once, by one lane.
template <int V, typename index_t>
__device__ __forceinline__ void store_mask_bits(uint8_t* mask, index_t e0, unsigned bits,
                                                int lane) {
  constexpr int G = kGroup / V;
  static_assert(G >= 1 && G * V == kGroup, "V must divide a mask byte's 8 elements");
  if constexpr (G > 1) {
    const int m = lane % G;
    bits <<= m * V;
    const unsigned group = ((1u << G) - 1u) << (lane - m);
#pragma unroll
    for (int o = 1; o < G; o <<= 1) bits |= __shfl_xor_sync(group, bits, o);
    if (m != 0) return;
  }
  mask[e0 >> 3] = static_cast<uint8_t>(bits);
}

// Whether the lanes of a rows kernel (TX lanes along C, vectors of V channels) can form the mask
// bytes with store_mask_bits: rows start at byte boundaries (C % 8 == 0) and the lanes of a byte
// lie in one row of one warp (TX a multiple of 8 / V).
inline bool rows_mask_bytes_fit(int V, int tx, int64_t C) {
  return V <= kGroup && C % kGroup == 0 && tx % (kGroup / V) == 0;
}

inline bool group_aligned(const void* p, int64_t elem_size) {
  return p == nullptr || aligned_to(p, static_cast<int>(elem_size * kGroup));
}

// Launches Fn over the canonical geometry g (numel > 0). The caller fills the pointers, params,
// slope, act and mask fields of a; this fills the geometry and the grid walk.
template <class Fn, typename T>
void launch_act_ew(ActEwArgs<T> a, const Geometry& g, int device) {
  a.C = g.C;
  a.S = g.layout == Layout::kChannelsLast ? 1 : g.S;
  a.numel = g.numel();
  a.vec = true;
  for (const T* p : a.in) a.vec = a.vec && group_aligned(p, sizeof(T));
  for (const T* p : a.out) a.vec = a.vec && group_aligned(p, sizeof(T));
  const cudaStream_t stream = current_stream();
  const int64_t groups = ceil_div<int64_t>(a.numel, kGroup);
  const int64_t sms = sm_count(device);
  if (g.layout == Layout::kChannelsLast && g.C % kGroup == 0) {
    dispatch_index(!fits_int32(a.numel), [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      auto kernel = act_ew_rows_kernel<Fn, T, index_t>;
      const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
      const int64_t cgroups = g.C / kGroup;
      const int tx = static_cast<int>(std::min<int64_t>(cgroups, kWarpSize));
      const int ty = kBlockThreads / tx;
      const int64_t gx = ceil_div<int64_t>(cgroups, tx);
      // At least kActRowsPerThread rows per thread, so that the coefficients are reused.
      int64_t gy = g.rows() / (int64_t{ty} * kActRowsPerThread);
      gy = std::max<int64_t>(1, std::min({gy, sms * bps / gx, int64_t{65535}}));
      launch_kernel(kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                    dim3(tx, ty), 0, stream, a);
    });
    return;
  }
  dispatch_index(!fits_int32(a.numel), [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    auto kernel = act_ew_kernel<Fn, T, index_t>;
    const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
    const int64_t blocks =
        std::max<int64_t>(1, std::min(ceil_div<int64_t>(groups, kBlockThreads), sms * bps));
    const int64_t step = blocks * kBlockThreads * kGroup;  // elements per grid iteration
    a.step_pos = step % a.S;
    a.step_ch = (step / a.S) % a.C;
    launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream, a);
  });
}

}  // namespace cuda
}  // namespace fusedbn
