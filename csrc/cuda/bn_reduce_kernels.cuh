// Kernels of the split per-channel reduction over the canonical layouts (common.h), generic over
// an op of bn_reduce_ops.cuh; bn_reduce.cuh plans and launches them.
//
// Pass 1 tiles the N*S values of each channel across many CTAs, whatever C is, so that the grid
// fills the GPU; each CTA writes one partial state per channel it touched to a workspace [C][P].
// Pass 2 (merge_partials_kernel) merges the P partials of each channel in a fixed order and hands
// the result to an epilogue functor. No floating-point atomics: the same shape on the same GPU
// gives the same bits.
//
// Pass 1 has three shapes:
//  * planes (contiguous, S >= 256 vectors): CTA = (a range of plane segments, samples); it
//    reduces one segment (a channel's plane or part of it) after the other.
//    Each plane segment is read as 16-byte vectors aligned to the address (the input may start
//    anywhere in a 16-byte line: a.mis); the partial vectors at either end are read element-wise.
//    A segment is at most one iteration's K vectors per thread; short ones (1-2k values) take
//    several samples per iteration, so K loads stay in flight. One state per thread, then warp
//    shuffles -> shared memory -> one partial per segment and CTA.
//  * packed (contiguous, small planes, e.g. 7x7, 14x14): the cb*S values of a group of cb
//    channels of one sample are one contiguous run; a CTA reads that run for its samples
//    with 16-byte vectors that cross plane boundaries (channel = position / S). Since C*S is a
//    multiple of the vector width, every sample puts the same channels in the same lanes: each
//    thread keeps two states per vector slot (a vector spans at most two channels, as V <= S),
//    and the CTA merges the slots of each channel from shared memory at the end. A window of at
//    most 256 * K/2 vectors takes several samples per iteration (K loads in flight). A CTA takes
//    a range of such groups, one after the other.
//  Both take several units (segments, groups) when one unit of the CTA's samples is too little
//  work (few samples, e.g. N = 2): the planner (bn_reduce.cuh) sizes the ranges.
//  * rows (channels_last and (N, C)): lanes along C with one vector of V channels each (V: the
//    widest that tiles C), 32/TX rows per warp, CTA rows along N*S; per-thread states for its
//    channels, merged by shuffles within the warp, then across the warps in shared memory.
// Splits along samples / rows interleave (split y takes samples, or chunks of rows, y, y +
// splits, ...): all CTAs of a one-wave grid advance through the tensor together, so pass 1 ends
// at the tensor's last samples / rows, where the element-wise pass starts (bn_elementwise.cu).
// K vectors (per input) are loaded before any is used, for memory-level parallelism. Index math
// is 32-bit for tensors of at most 2^30 elements, 64-bit otherwise (template parameter index_t).
#pragma once

#include <cstdint>
#include <type_traits>

#include "bn_reduce_ops.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {

template <typename T, typename acc_t>
struct ReduceArgs {
  const T* in0 = nullptr;
  const T* in1 = nullptr;       // second input of two- and three-input ops
  const T* in2 = nullptr;       // third input of three-input ops (nullptr: reads as zeros)
  const acc_t* chan = nullptr;  // per-channel op parameter, or nullptr
  int64_t shift_stride = 0;     // offset between channels' first values (ChannelShift)
  void* partials = nullptr;     // [C][P] Op::Partial
  int64_t N = 0, C = 0, S = 0;
  int64_t P = 0;         // partials per channel
  int64_t splits = 1;    // gridDim.y: ranges of samples (planes, packed) or of rows (rows)
  int64_t units = 1;     // planes: plane segments (C * nseg); packed: channel groups; block x
                         // takes units [x * units / gridDim.x, (x + 1) * units / gridDim.x)
  int64_t nseg = 1;      // planes: segments per plane
  int64_t seg_len = 0;   // planes: values per segment (a multiple of V)
  int64_t cb = 1;        // packed: channels per group, at most (group g: channels
                         // [g * C / units, (g + 1) * C / units))
  int64_t mis = 0;       // planes, packed: position of in0 (and in1) in its 16-byte line, in
                         // elements (both inputs share it, else V = 1)
  int64_t kq = 1;        // planes: vector slots per sample and iteration (K / kq samples at once)
  int64_t tx = 32;       // rows: lanes along channels (TX); a warp holds 32 / TX rows
  // Ops with kMaskedIn0 (bn_act_backward.cu): the packed sign mask of in0 (bit e of byte e / 8),
  // and what in0 becomes where the bit is clear: 0 (mask_zero) or in0 * mask_slope.
  const uint8_t* mask = nullptr;
  acc_t mask_slope = acc_t(0);
  bool mask_zero = false;
  // act_backward's three-input ops: the activation (Act) and its slope (mask_slope), 1 / slope.
  int act = 0;
  acc_t inv_slope = acc_t(1);
  // Ops with kStoresIn0 (backward in eval mode): out0 = in0 * Op::out_scale(channel parameter)
  // and, when out1 is set, out1 = in0 (after mask_in0), written as in0 is read; out_vec: out0
  // and out1 sit in their 16-byte lines as in0 does (vector stores), else element-wise.
  T* out0 = nullptr;
  T* out1 = nullptr;
  bool out_vec = false;
};

// An op that declares kMaskedIn0 rewrites elements [lo, hi) of the first input's group of V
// elements at `offset` after it is loaded: Op::mask_in0 (the act backward's dz from dy and the
// mask, computed where it is read instead of stored and read back).
template <class Op, class = void>
struct masks_in0 : std::false_type {};
template <class Op>
struct masks_in0<Op, std::void_t<decltype(Op::kMaskedIn0)>>
    : std::bool_constant<Op::kMaskedIn0> {};

// An op that declares kFormsDz (act_backward's InputGradOp) is, to the persistent backward
// kernels, its Base op (GradOp over (dz, x)) whose dz it forms from the loaded dy, x and the
// residual it reads itself (its form_dz hooks), so that the tiles hold dz.
template <class Op, class = void>
struct forms_dz : std::false_type {};
template <class Op>
struct forms_dz<Op, std::void_t<decltype(Op::kFormsDz)>> : std::bool_constant<Op::kFormsDz> {};

template <class Op, int V, typename index_t>
__device__ __forceinline__ void mask_in0(
    const ReduceArgs<typename Op::scalar_t, typename Op::acc_t>& a, index_t offset,
    int lo, int hi, Vec<typename Op::scalar_t, V>& r) {
  if constexpr (masks_in0<Op>::value) Op::template mask_in0<V>(a, offset, lo, hi, r);
}

// An op that declares kStoresIn0 writes elements [lo, hi) of in0's group at `offset`, scaled by
// Op::out_scale of each element's channel parameter (param_of(j): element j's), to out0 at the
// same offset, and unscaled to out1 when set, as the pass loads them: backward in eval mode forms
// dx = dy * w * invstd, which needs no sums, from the reduction's own read of dy (3 |x| instead
// of 4), and the act backward's grad_residual dz with it.
// Elements [lo, hi) of v to p: one vector store when the group is whole and `whole_ok` (p
// aligned to the vector), else element by element.
template <typename T, int V>
__device__ __forceinline__ void store_group(T* p, const Vec<T, V>& v, int lo, int hi,
                                            bool whole_ok) {
  if (lo == 0 && hi == V && whole_ok) {
    store_vec<T, V>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j >= lo && j < hi) p[j] = v.v[j];
  }
}

template <class Op, class = void>
struct stores_in0 : std::false_type {};
template <class Op>
struct stores_in0<Op, std::void_t<decltype(Op::kStoresIn0)>>
    : std::bool_constant<Op::kStoresIn0> {};

// A kStoresIn0 op that also declares kFormsIn0 (act_backward's input and output sources in eval
// mode) first rewrites in0's elements [lo, hi) into what it stores and pushes -- dz from dy, x
// (y) and r; the output source also in1's, y into x_hat / invstd -- with
// Op::form_in0<V>(a, lo, hi, r0, r1, r2, param_of), where the other hooks see only in0.
template <class Op, class = void>
struct forms_in0 : std::false_type {};
template <class Op>
struct forms_in0<Op, std::void_t<decltype(Op::kFormsIn0)>> : std::bool_constant<Op::kFormsIn0> {};

template <class Op, int V, typename index_t, class ParamOf>
__device__ __forceinline__ void store_in0(
    const ReduceArgs<typename Op::scalar_t, typename Op::acc_t>& a, index_t offset, int lo,
    int hi, Vec<typename Op::scalar_t, V>& r, Vec<typename Op::scalar_t, V>& r1,
    const Vec<typename Op::scalar_t, V>& r2, ParamOf param_of) {
  if constexpr (stores_in0<Op>::value) {
    using T = typename Op::scalar_t;
    using acc_t = typename Op::acc_t;
    if constexpr (forms_in0<Op>::value) Op::template form_in0<V>(a, lo, hi, r, r1, r2, param_of);
    Vec<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j)
      out.v[j] = static_cast<T>(static_cast<acc_t>(r.v[j]) * Op::out_scale(param_of(j)));
    store_group<T, V>(a.out0 + offset, out, lo, hi, a.out_vec);
    if (a.out1 != nullptr) store_group<T, V>(a.out1 + offset, r, lo, hi, a.out_vec);
  }
}

constexpr int kReduceK = 4;  // vectors in flight per thread and input

// Values per CTA pass over a window (V-element vectors, K per thread).
template <int V>
constexpr int64_t window_capacity(int K) {
  return int64_t{kBlockThreads} * K * V - (V - 1);
}

// The first work unit of block x of gx (planes, packed): units split as evenly as they go.
__device__ __forceinline__ int64_t block_unit(int64_t units, unsigned x, unsigned gx) {
  return static_cast<int64_t>(x) * units / static_cast<int64_t>(gx);
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> zero_vec() {
  Vec<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = static_cast<T>(0.0f);
  return r;
}

// The vector at p + offset, or zeros when p is nullptr (an absent optional input).
template <typename T, int V, typename index_t>
__device__ __forceinline__ Vec<T, V> load_vec_or_zero(const T* p, index_t offset) {
  return p != nullptr ? load_vec<T, V>(p + offset) : zero_vec<T, V>();
}

template <class Op, int V, typename index_t>
__device__ __forceinline__ void load_group(
    const ReduceArgs<typename Op::scalar_t, typename Op::acc_t>& a, index_t offset, int lo, int hi,
    Vec<typename Op::scalar_t, V>& r0, Vec<typename Op::scalar_t, V>& r1,
    Vec<typename Op::scalar_t, V>& r2) {
  using T = typename Op::scalar_t;
  if (lo == 0 && hi == V) {
    r0 = load_vec<T, V>(a.in0 + offset);
    if constexpr (Op::kInputs >= 2) r1 = load_vec<T, V>(a.in1 + offset);
    if constexpr (Op::kInputs == 3) r2 = load_vec_or_zero<T, V>(a.in2, offset);
  } else if (lo < hi) {
    r0 = load_partial<T, V>(a.in0 + offset, lo, hi);
    if constexpr (Op::kInputs >= 2) r1 = load_partial<T, V>(a.in1 + offset, lo, hi);
    if constexpr (Op::kInputs == 3) {
      r2 = a.in2 != nullptr ? load_partial<T, V>(a.in2 + offset, lo, hi) : zero_vec<T, V>();
    }
  }
  if (lo < hi) mask_in0<Op, V>(a, offset, lo, hi, r0);
}

template <typename acc_t, typename T, int V>
__device__ __forceinline__ void to_acc(const Vec<T, V>& r, acc_t (&x)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) x[j] = static_cast<acc_t>(r.v[j]);
}

// Pushes elements [lo, hi) of a loaded group. Three-input ops take the third array too.
template <class Op, int V>
__device__ __forceinline__ void push_group(typename Op::Thread& s,
                                           const Vec<typename Op::scalar_t, V>& r0,
                                           const Vec<typename Op::scalar_t, V>& r1,
                                           const Vec<typename Op::scalar_t, V>& r2, int lo, int hi,
                                           const typename Op::Param& par) {
  using acc_t = typename Op::acc_t;
  acc_t x0[V], x1[V];
  to_acc(r0, x0);
  if constexpr (Op::kInputs >= 2) to_acc(r1, x1);
  if constexpr (Op::kInputs == 3) {
    acc_t x2[V];
    to_acc(r2, x2);
    if (lo == 0 && hi == V) {
      Op::push_all(s, x0, x1, x2, par);
    } else {
      Op::push(s, x0, x1, x2, lo, hi, par);
    }
  } else if (lo == 0 && hi == V) {
    Op::push_all(s, x0, Op::kInputs == 2 ? x1 : x0, par);
  } else {
    Op::push(s, x0, Op::kInputs == 2 ? x1 : x0, lo, hi, par);
  }
}

template <typename Partial>
__device__ __forceinline__ Partial* shared_partials() {
  return reinterpret_cast<Partial*>(dynamic_shared_memory());
}

// ---- planes ------------------------------------------------------------------------------
// Block x takes the plane segments (units u = c * nseg + seg) of its range one after another: a
// state per segment, reduced over the block and written as that segment's partial before the
// next one starts (one barrier per unit: the warp results alternate between two buffers).
template <class Op, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_planes_kernel(const ReduceArgs<typename Op::scalar_t, typename Op::acc_t> a) {
  using T = typename Op::scalar_t;
  using Partial = typename Op::Partial;
  constexpr int K = kReduceK;
  const index_t C = a.C, S = a.S, N = a.N, nseg = a.nseg, splits = a.splits;
  const index_t mis = a.mis;
  const int64_t u_begin = block_unit(a.units, blockIdx.x, gridDim.x);
  const int64_t u_end = block_unit(a.units, blockIdx.x + 1, gridDim.x);

  // A segment is at most kBlockThreads * K vectors, so one iteration reads a whole segment of
  // each of its samples. Slot k holds vector qv[k] of sample n + sg[k] * splits: kq slots per
  // sample, K / kq samples per iteration, so short segments (1-2k values: one or two vectors per
  // thread) still keep K loads in flight. The block's samples interleave with the other splits'
  // (blockIdx.y, + splits, ...), so the grid's blocks move through the samples together.
  const int kq = static_cast<int>(a.kq), G = K / kq;
  int sg[K];
  index_t qv[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    sg[k] = k / kq;
    qv[k] = static_cast<index_t>(threadIdx.x) + static_cast<index_t>(k % kq) * kBlockThreads;
  }
  FUSEDBN_SHARED_ARRAY(16, unsigned char, warp_buf,
                       2 * kBlockThreads / kWarpSize * sizeof(Partial));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int parity = 0;
  for (int64_t u = u_begin; u < u_end; ++u, parity ^= 1) {
    const index_t c = static_cast<index_t>(u) / nseg;
    const index_t seg = static_cast<index_t>(u) - c * nseg;
    const index_t off = seg * static_cast<index_t>(a.seg_len);
    const index_t len = min(static_cast<index_t>(a.seg_len), S - off);
    const typename Op::Param par = Op::param(a, c);
    typename Op::Thread st = Op::init();
    for (index_t n = blockIdx.y; n < N; n += static_cast<index_t>(G) * splits) {
      Vec<T, V> r0[K], r1[K], r2[K];
      int lo[K], hi[K];
      index_t at[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const index_t nn = n + static_cast<index_t>(sg[k]) * splits;
        lo[k] = 0;
        hi[k] = 0;
        if (sg[k] < G && nn < N) {
          const index_t start = (nn * C + c) * S + off;
          const int head = static_cast<int>((start + mis) & (V - 1));  // address-aligned vectors
          const index_t nvec = (head + len + V - 1) / V;
          const index_t q = qv[k];
          lo[k] = q == 0 ? head : 0;
          hi[k] =
              q < nvec ? static_cast<int>(min(static_cast<index_t>(V), head + len - q * V)) : 0;
          at[k] = start - head + q * V;
          load_group<Op, V, index_t>(a, at[k], lo[k], hi[k], r0[k], r1[k], r2[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (lo[k] < hi[k]) {
          store_in0<Op, V, index_t>(a, at[k], lo[k], hi[k], r0[k], r1[k], r2[k],
                                    [&](int) { return par; });
          push_group<Op, V>(st, r0[k], r1[k], r2[k], lo[k], hi[k], par);
        }
      }
    }

    // Warp shuffles -> warp_parts (this unit's buffer) -> warp 0. The other buffer is the
    // previous unit's, which warp 0 read before it reached this unit's barrier.
    Partial* warp_parts =
        reinterpret_cast<Partial*>(warp_buf) + parity * (kBlockThreads / kWarpSize);
    Partial p = warp_reduce<Op>(Op::finish(st));
    if (lane == 0) warp_parts[warp] = p;
    __syncthreads();
    if (warp == 0) {
      p = lane < kBlockThreads / kWarpSize ? warp_parts[lane] : Op::empty();
      p = warp_reduce<Op>(p);
      if (lane == 0) {
        Partial* out = static_cast<Partial*>(a.partials);
        out[static_cast<int64_t>(c) * a.P + static_cast<int64_t>(seg) * a.splits + blockIdx.y] =
            p;
      }
    }
  }
}

// ---- packed ------------------------------------------------------------------------------
// One channel group of the packed kernel: channels [c0, c0 + cbn) (cbn * S <= the window).
template <class Op, int V, int K, typename index_t>
__device__ __forceinline__ void reduce_packed_group(
    const ReduceArgs<typename Op::scalar_t, typename Op::acc_t>& a, const index_t c0,
    const int cbn) {
  using T = typename Op::scalar_t;
  using Partial = typename Op::Partial;
  const index_t C = a.C;
  const int S = static_cast<int>(a.S);  // S < window capacity here
  const int W = cbn * S;
  // The window's position in its 16-byte line: the same for every sample, as C*S % V == 0.
  const int sh = static_cast<int>((c0 * S + static_cast<index_t>(a.mis)) & (V - 1));
  const int nvec = (sh + W + V - 1) / V;                // <= kBlockThreads * K (plan)

  // Vector slot k holds elements [lo, bnd) of local channel ch and [bnd, hi) of channel ch + 1
  // of vector q = threadIdx.x + (k % kq) * 256 of sample n + (k / kq) * splits: kq slots cover
  // the window, K / kq samples per iteration (a small window keeps K loads in flight).
  const int kq = min(K, (nvec + kBlockThreads - 1) / kBlockThreads), G = K / kq;
  int lo[K], hi[K], bnd[K];
  typename Op::Param p0[K], p1[K];
  typename Op::Thread s0[K], s1[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int q = threadIdx.x + (k % kq) * kBlockThreads;
    const int rel = q * V - sh;  // window position of the vector's first lane
    lo[k] = max(0, -rel);
    hi[k] = k / kq < G && q < nvec ? min(V, W - rel) : 0;
    const int ch = lo[k] < hi[k] ? (rel + lo[k]) / S : 0;
    bnd[k] = lo[k] < hi[k] ? min(hi[k], max(lo[k], (ch + 1) * S - rel)) : hi[k];
    p0[k] = Op::param(a, c0 + ch);
    p1[k] = bnd[k] < hi[k] ? Op::param(a, c0 + ch + 1) : p0[k];
    s0[k] = Op::init();
    s1[k] = Op::init();
  }

  // Samples blockIdx.y, + splits, ...: the grid's blocks move through the samples together.
  const index_t N = a.N, splits = a.splits;
  for (index_t n = blockIdx.y; n < N; n += static_cast<index_t>(G) * splits) {
    Vec<T, V> r0[K], r1[K], r2[K];
    bool live[K];
    // Slot k's group in this iteration (recomputed where it is stored: fewer live registers).
    auto group_at = [&](int k) -> index_t {
      const index_t nn = n + static_cast<index_t>(k / kq) * splits;
      const index_t q = threadIdx.x + (k % kq) * kBlockThreads;
      return (nn * C + c0) * S - sh + q * V;
    };
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const index_t nn = n + static_cast<index_t>(k / kq) * splits;
      live[k] = nn < N && lo[k] < hi[k];
      if (live[k]) load_group<Op, V, index_t>(a, group_at(k), lo[k], hi[k], r0[k], r1[k], r2[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!live[k]) continue;
      store_in0<Op, V, index_t>(a, group_at(k), lo[k], hi[k], r0[k], r1[k], r2[k],
                                [&](int j) { return j < bnd[k] ? p0[k] : p1[k]; });
      if (lo[k] == 0 && bnd[k] == V) {
        push_group<Op, V>(s0[k], r0[k], r1[k], r2[k], 0, V, p0[k]);
      } else {
        if (lo[k] < bnd[k]) push_group<Op, V>(s0[k], r0[k], r1[k], r2[k], lo[k], bnd[k], p0[k]);
        if (bnd[k] < hi[k]) push_group<Op, V>(s1[k], r0[k], r1[k], r2[k], bnd[k], hi[k], p1[k]);
      }
    }
  }

  // Slot states -> shared memory as pieces[2 * q + side] (the slots of one vector merged in
  // sample order first), then per channel in a fixed order.
  Partial f0[K], f1[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    f0[k] = Op::finish(s0[k]);
    f1[k] = Op::finish(s1[k]);
  }
#pragma unroll
  for (int k = 1; k < K; ++k) {
#pragma unroll
    for (int d = 0; d < k; ++d) {
      if (k / kq < G && k % kq == d && k >= kq) {
        Op::merge(f0[d], f0[k]);
        Op::merge(f1[d], f1[k]);
      }
    }
  }
  Partial* pieces = shared_partials<Partial>();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < kq) {
      const int q = threadIdx.x + k * kBlockThreads;
      pieces[2 * q] = f0[k];
      pieces[2 * q + 1] = f1[k];
    }
  }
  __syncthreads();

  Partial* out = static_cast<Partial*>(a.partials);
  // Pieces of local channel ch: vectors q_first..q_last; the first one holds ch in its second
  // side when it started in the previous channel.
  auto piece = [&](int ch, int q, int q_first) -> const Partial& {
    const bool second = q == q_first && max(q * V - sh, 0) < ch * S;
    return pieces[2 * q + (second ? 1 : 0)];
  };
  // A thread per channel (sequential merges) or a warp per channel (strided merges and a
  // shuffle tree), whichever has the shorter chain of dependent merges; uniform over the CTA.
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const int per_channel = S / V + 2;  // vectors touching one channel, at most
  const int thread_chain = per_channel * ((cbn + kBlockThreads - 1) / kBlockThreads);
  const int warp_chain =
      ((cbn + kWarps - 1) / kWarps) * ((per_channel + kWarpSize - 1) / kWarpSize + 5);
  if (thread_chain <= warp_chain) {
    for (int ch = threadIdx.x; ch < cbn; ch += kBlockThreads) {
      const int q_first = (ch * S + sh) / V, q_last = ((ch + 1) * S - 1 + sh) / V;
      Partial acc = Op::empty();
      for (int q = q_first; q <= q_last; ++q) Op::merge(acc, piece(ch, q, q_first));
      out[static_cast<int64_t>(c0 + ch) * a.P + blockIdx.y] = acc;
    }
  } else {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    for (int ch = warp; ch < cbn; ch += kWarps) {
      const int q_first = (ch * S + sh) / V, q_last = ((ch + 1) * S - 1 + sh) / V;
      Partial acc = Op::empty();
      for (int q = q_first + lane; q <= q_last; q += kWarpSize)
        Op::merge(acc, piece(ch, q, q_first));
      acc = warp_reduce<Op>(acc);
      if (lane == 0) out[static_cast<int64_t>(c0 + ch) * a.P + blockIdx.y] = acc;
    }
  }
}

// Block x takes the channel groups of its range one after another (a barrier between two).
template <class Op, int V, int K, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_packed_kernel(const ReduceArgs<typename Op::scalar_t, typename Op::acc_t> a) {
  const int64_t C = a.C, units = a.units;
  const int64_t u_begin = block_unit(units, blockIdx.x, gridDim.x);
  const int64_t u_end = block_unit(units, blockIdx.x + 1, gridDim.x);
  for (int64_t u = u_begin; u < u_end; ++u) {
    // The previous group's merges read the pieces this one overwrites.
    if (u != u_begin) __syncthreads();
    const int64_t c0 = u * C / units;
    reduce_packed_group<Op, V, K, index_t>(a, static_cast<index_t>(c0),
                                           static_cast<int>((u + 1) * C / units - c0));
  }
}

// ---- rows (channels_last) ----------------------------------------------------------------
// 256 threads in 8 warps. Lane l of a warp takes channel vector tx = l % TX (of the block's TX)
// and row k = l / TX of the warp's RW = 32 / TX rows; lanes with k >= RW (when TX does not divide
// 32) idle. So a block reads TY = 8 * RW rows per step, K steps per chunk of TY * K rows, and the
// splits take chunks blockIdx.y, + splits, ... (the grid's blocks move through the rows together,
// and pass 1 ends at the last rows). The merge of each thread's V states: the lanes of a warp that
// hold the same channels (l = tx, tx + TX, ...) by shuffles, then the 8 warps' results through
// shared memory laid out [V][warp][TX] (consecutive lanes, consecutive partials: no bank
// conflicts), merged in warp order by one thread per (vector slot, channel vector).
template <class Op, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_rows_kernel(const ReduceArgs<typename Op::scalar_t, typename Op::acc_t> a) {
  using T = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using Partial = typename Op::Partial;
  constexpr int K = kReduceK;  // rows in flight per thread
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const int TX = static_cast<int>(a.tx), RW = kWarpSize / TX, TY = kWarps * RW;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int tx = lane % TX, k = lane / TX;
  const int ty = warp * RW + k;
  const index_t C = a.C;
  const index_t cv = static_cast<index_t>(blockIdx.x) * TX + tx;  // vector of channels
  const bool active = k < RW && cv < C / V;
  const index_t rows = a.N * a.S;
  const index_t chunk = static_cast<index_t>(TY) * K;
  const index_t stride = chunk * static_cast<index_t>(a.splits);

  typename Op::Param par[V];
  typename Op::Thread st[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    par[j] = active ? Op::param(a, cv * V + j) : typename Op::Param{};
    st[j] = Op::init();
  }
  if (active) {
    for (index_t r = static_cast<index_t>(blockIdx.y) * chunk + ty; r < rows; r += stride) {
      // Rows of this chunk in u-steps: K but in the last chunk (a 32-bit division there: the
      // 64-bit one made ptxas spill the 64-bit-index double kernel).
      const index_t left = rows - r;
      const int cnt = left >= static_cast<index_t>(K) * TY
                          ? K
                          : (static_cast<int>(left) + TY - 1) / TY;
      Vec<T, V> v0[K], v1[K], v2[K];
#pragma unroll
      for (int u = 0; u < K; ++u) {
        if (u < cnt) {
          const index_t offset = (r + static_cast<index_t>(u) * TY) * C + cv * V;
          v0[u] = load_vec<T, V>(a.in0 + offset);
          mask_in0<Op, V>(a, offset, 0, V, v0[u]);
          if constexpr (Op::kInputs >= 2) v1[u] = load_vec<T, V>(a.in1 + offset);
          if constexpr (Op::kInputs == 3) v2[u] = load_vec_or_zero<T, V>(a.in2, offset);
        }
      }
      if constexpr (stores_in0<Op>::value) {
#pragma unroll
        for (int u = 0; u < K; ++u) {
          if (u < cnt) {
            store_in0<Op, V, index_t>(a, (r + static_cast<index_t>(u) * TY) * C + cv * V, 0, V,
                                      v0[u], v1[u], v2[u], [&](int j) { return par[j]; });
          }
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t x0[K], x1[K], x2[K];
#pragma unroll
        for (int u = 0; u < K; ++u) {
          x0[u] = u < cnt ? static_cast<acc_t>(v0[u].v[j]) : acc_t(0);
          if constexpr (Op::kInputs >= 2)
            x1[u] = u < cnt ? static_cast<acc_t>(v1[u].v[j]) : acc_t(0);
          if constexpr (Op::kInputs == 3)
            x2[u] = u < cnt ? static_cast<acc_t>(v2[u].v[j]) : acc_t(0);
        }
        if constexpr (Op::kInputs == 3) {
          if (cnt == K) {
            Op::push_all(st[j], x0, x1, x2, par[j]);
          } else {
            Op::push(st[j], x0, x1, x2, 0, cnt, par[j]);
          }
        } else if (cnt == K) {
          Op::push_all(st[j], x0, Op::kInputs == 2 ? x1 : x0, par[j]);
        } else {
          Op::push(st[j], x0, Op::kInputs == 2 ? x1 : x0, 0, cnt, par[j]);
        }
      }
    }
  }

  // 1. Within the warp: a tree over its RW rows (fixed: row k takes row k + off).
  Partial p[V];
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = Op::finish(st[j]);
  int span = 1;
  while (span < RW) span <<= 1;
  for (int off = span >> 1; off > 0; off >>= 1) {
    const bool take = k < off && k + off < RW;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Partial other = Op::shfl_down(p[j], off * TX);
      if (take) Op::merge(p[j], other);
    }
  }
  // 2. Across the warps: [V][warp][TX] in shared memory, merged in warp order.
  Partial* sm = shared_partials<Partial>();
  if (k == 0) {
#pragma unroll
    for (int j = 0; j < V; ++j) sm[(j * kWarps + warp) * TX + tx] = p[j];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < V * TX) {
    const int j = static_cast<int>(threadIdx.x) / TX, x = static_cast<int>(threadIdx.x) % TX;
    const index_t cw = static_cast<index_t>(blockIdx.x) * TX + x;
    if (cw < C / V) {
      Partial acc = sm[(j * kWarps) * TX + x];
      for (int w = 1; w < kWarps; ++w) Op::merge(acc, sm[(j * kWarps + w) * TX + x]);
      Partial* out = static_cast<Partial*>(a.partials);
      out[(static_cast<int64_t>(cw) * V + j) * a.P + blockIdx.y] = acc;
    }
  }
}

// ---- pass 2 ------------------------------------------------------------------------------
// `group` threads (a power of two, 32..256) merge the P partials of one channel: each merges a
// strided subset in order, then warps by shuffles, then the group's warps in order. The
// epilogue runs once per channel with the merged state.
template <class Op, class Epilogue>
__global__ void __launch_bounds__(kBlockThreads)
    merge_partials_kernel(const typename Op::Partial* partials, int64_t C, int64_t P, int group,
                          const Epilogue epi) {
  using Partial = typename Op::Partial;
  FUSEDBN_SHARED_ARRAY(16, unsigned char, buf, kBlockThreads / kWarpSize * sizeof(Partial));
  Partial* warp_parts = reinterpret_cast<Partial*>(buf);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int t = threadIdx.x % group;
  const int64_t c =
      static_cast<int64_t>(blockIdx.x) * (kBlockThreads / group) + threadIdx.x / group;
  Partial acc = Op::empty();
  if (c < C) {
    for (int64_t p = t; p < P; p += group) Op::merge(acc, partials[c * P + p]);
  }
  acc = warp_reduce<Op>(acc);
  if (group > kWarpSize) {
    if (lane == 0) warp_parts[warp] = acc;
    __syncthreads();
    if (t == 0) {
      acc = warp_parts[warp];
      for (int w = 1; w < group / kWarpSize; ++w) Op::merge(acc, warp_parts[warp + w]);
    }
  }
  if (t == 0 && c < C) epi(c, acc);
}

}  // namespace cuda
}  // namespace fusedbn
