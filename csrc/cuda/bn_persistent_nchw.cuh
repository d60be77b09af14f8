// The persistent single-read training passes (issue 15) for the contiguous layout (N, C, S):
// NCHW, NCDHW and (N, C, L). One body (persistent_nchw_body) and one planner serve the forward
// (this file: x -> y, WelfordOp, TrainStatsEpilogue, channel_affine's map AffineFn) and the
// backward (bn_persistent_nchw_backward.cuh: dy, x -> dx, GradOp, BackwardEpilogue, channel_grad's
// map GradFn), and the fused activation ops (act_forward_train: ActNchwStore; act_backward from
// the mask: MaskedGradOp, dy masked as it is loaded, and DxDzNchwStore). One cooperative launch per slab of CTA columns, every CTA of it co-resident, each
// holding its tiles of the op's inputs (Op::kInputs: x, or dy and x) in shared memory from their
// one read to the write of the output. The work is cut as the streaming pass 1 of
// bn_reduce_kernels.cuh cuts it:
//  * packed (S <= 256 vectors - V + 1, C * S a multiple of the vector width, else scalar): a unit
//    is a balanced group of cb or cb - 1 whole planes (the first C % units groups take cb; with a
//    Store's chan_group ck > 1, of whole blocks of ck planes: cb and cb - 1 blocks); the
//    cb * S values of one sample are one contiguous window, read as 16-byte vectors aligned to
//    the address that cross plane boundaries (a vector spans at most two channels, V <= S);
//  * planes (larger S): a unit is one channel; its planes are cut into nseg windows (segments)
//    of seg_len values (a multiple of V, at most 255 V), each read as address-aligned vectors
//    with the partial vectors at either end read element-wise.
// A window is at most 256 vectors: thread t holds vector t of it, for K = 4 samples at a time
// (slot k: sample n + k), as the streaming packed kernel does with one vector slot per thread.
// CTA column x takes a balanced range of the units (whole channels: a channel is never split
// between slabs), CTA row y a balanced range of the samples:
//   1. per unit: the channels' op parameters (Op::param: WelfordOp's shift, the channel's first
//      value; GradOp's saved mean) read once per CTA into shared memory; the windows of its
//      samples loaded into the tiles, growing per-slot op states on the way (two per slot: the
//      vector's channel and the next one; push_group with the element ranges of the streaming
//      kernels); the slots merged in sample order, one piece pair per thread to shared memory,
//      then per channel the pieces of its vectors in vector order (a thread or a warp per
//      channel, the packed kernel's choice) -> partials[c][y];
//   2. grid barrier;
//   3. the column's channels dealt out to its gy CTAs, a warp per channel: lane l merges partials
//      l, l + 32, ... in order, then the warp's shuffle tree (the streaming pass 2 with a
//      32-thread group), and the streaming path's epilogue;
//   4. grid barrier;
//   5. per unit: the 4 coefficients of its channels read once into shared memory, and the Store
//      policy run on every vector of the tiles: MapStore<Fn> applies the map of the streaming
//      element-wise pass (Fn::apply: y = ((x - hi) - lo) * s + b, dx = (dy - k0) * a - (x -
//      mean) * k3) and writes the output (vector stores where it sits in its 16-byte lines as
//      the inputs do, else element-wise); the fused activation ops' stores
//      (bn_act_forward.cu, bn_act_backward.cu) add the residual, the activation and the mask,
//      or grad_residual.
// Global traffic: each input read once (+ one parameter per channel and CTA row: the forward's
// shift is a value of x, the backward's mean one of the saved mean), the output written once,
// partials C * gy states written and read, coefficients 4 C written and 4 C per CTA row read,
// plus what the epilogue reads and writes per channel.
// Numerics: the per-vector groups, the merges and the maps are the streaming path's (the same op,
// element ranges, epilogue and map); only the partition of the samples into partials differs
// (contiguous ranges per CTA instead of interleaved samples, and a plane's segments merged within
// the CTA), which changes the rounding, not the error bound.
// The planner (plan_persistent_nchw) sizes the tiles from the occupancy API (Op::kInputs tiles:
// the backward's hold about half the forward's values); a tensor none of whose slabs fits, or a
// cooperative launch that is refused, leaves the streaming path to the caller.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "bn_channel_fns.cuh"
#include "bn_reduce.cuh"
#include "bn_reduce_kernels.cuh"
#include "bn_reduce_ops.cuh"
#include "bn_utils.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {

// The arguments of both kernels. The op reads its per-channel parameter through Op::param(a, c)
// (bn_reduce_ops.cuh): WelfordOp the shift in0[c * shift_stride], GradOp the saved mean chan[c].
template <typename T, typename acc_t, typename Partial>
struct PersistentNchwArgs {
  using scalar_t = T;
  using acc_type = acc_t;
  const T* in0 = nullptr;        // forward: x; backward: dy
  const T* in1 = nullptr;        // backward: x
  T* out = nullptr;              // forward: y; backward: dx
  const acc_t* chan = nullptr;   // backward: the saved mean [C]
  int64_t shift_stride = 0;      // forward: S (ChannelShift)
  Partial* partials = nullptr;   // [C][gy]
  const acc_t* coeffs = nullptr;  // [4][C], written by the epilogue
  int64_t N = 0, C = 0, S = 0;
  // Balanced ranges without a division in the kernel (a 64-bit one is a subroutine call that
  // made ptxas spill): item i of `parts` starts at i * q + min(i, r), q = total / parts,
  // r = total % parts (the first r get q + 1).
  int64_t units = 0;            // channel groups (packed) or channels (planes)
  int64_t ck = 1;               // packed: units are made of blocks of ck channels (C % ck == 0)
  int64_t cq = 1, cr = 0;       // packed: blocks of unit u (C / ck over units)
  int64_t gx = 1;               // CTA columns in all
  int64_t uq = 1, ur = 0;       // units of column x (units over gx)
  int64_t col0 = 0;             // the launch's first column
  int64_t gy = 1;               // CTAs per column: sample ranges = partials per channel
  int64_t sq = 1, sr = 0;      // samples of CTA row y (N over gy)
  int64_t nseg = 1;     // planes: windows per plane; packed: 1
  int64_t seg_len = 0;  // planes: values per window (a multiple of V)
  int32_t packed = 0;   // 1: units are groups of whole planes, one window per sample
  int32_t nq = 0;       // vector slots per (sample, window) in the tile (<= kBlockThreads)
  int32_t upc = 0;      // units per column, at most
  int32_t spc = 0;      // samples per CTA, at most
  int32_t cbmax = 1;    // channels per unit, at most (the shared channel values)
  int32_t mis = 0;      // position of the inputs in their 16-byte lines, in elements
  int32_t out_vec = 0;  // 1: the output sits in its lines as the inputs do (vector stores)
  // kMaskedIn0 ops (act_backward's MaskedGradOp): the mask, and what dy becomes where its bit is
  // clear (0: mask_zero, else dy * mask_slope), applied as in0 is loaded (the tile holds dz).
  const uint8_t* mask = nullptr;
  acc_t mask_slope = acc_t(0);
  bool mask_zero = false;
  // forms_dz ops (act_backward's InputGradOp, OutputGradOp): the residual (nullptr: zeros), read
  // as in0 and in1 are loaded (vector loads where it sits in its lines as they do: in2_vec), the
  // activation; their slope is mask_slope, their parameters chan [3][C] (InputGradOp: mean,
  // w * invstd, b; OutputGradOp: 0, b, 1 / (w * invstd)).
  const T* in2 = nullptr;
  int32_t in2_vec = 0;
  int32_t act = 0;
  acc_t inv_slope = acc_t(1);  // OutputGradOp's 1 / slope
};

// The op whose partials the body grows: Op, or a forms_dz op's Base (GradOp over (dz, x)); and
// the tiles it holds: Op::kInputs, a forms_dz op's dy (as dz) and x.
template <class Op, bool = forms_dz<Op>::value>
struct nchw_reduce_op {
  using type = Op;
  static constexpr int kTiles = Op::kInputs;
};
template <class Op>
struct nchw_reduce_op<Op, true> {
  using type = typename Op::Base;
  static constexpr int kTiles = 2;
};

// The start of item i of a balanced split (see PersistentNchwArgs).
__host__ __device__ __forceinline__ int64_t balanced_start(int64_t i, int64_t q, int64_t r) {
  return i * q + (i < r ? i : r);
}

// Shared memory next to the tiles: two pieces per thread, the unit's channel values [4][cbmax].
template <typename Partial, typename acc_t>
constexpr size_t persistent_nchw_scratch_bytes(int cbmax) {
  return size_t{2} * kBlockThreads * sizeof(Partial) +
         size_t{4} * static_cast<size_t>(cbmax) * sizeof(acc_t);
}

// Thread t's vector of the window of one sample: elements [lo, bnd) of the unit's local channel
// ch, [bnd, hi) of ch + 1 (lo == hi: none), at element offset base.
template <typename index_t>
struct NchwSlot {
  index_t base;
  int lo, hi, bnd, ch;
};

// The unit-local channel of lane j of slot q (lanes outside [lo, hi): q's first, any would do).
template <typename index_t>
__device__ __forceinline__ int nchw_lane_channel(const NchwSlot<index_t>& q, int j) {
  return j >= q.lo && j < q.hi && j >= q.bnd ? q.ch + 1 : q.ch;
}

// The 4 coefficients of unit-local channel cj from the shared channel values [4][cbmax].
template <typename acc_t>
__device__ __forceinline__ void nchw_coeffs(const acc_t* chan, int cbmax, int cj, acc_t (&p)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) p[k] = chan[k * cbmax + cj];
}

// The body's last step, the plain one (the forward's y, the backward's dx): Fn::apply of the
// tiles' vectors v0 (and v1) with each lane's channel coefficients, the output a.out written
// (vector stores where it sits in its lines as the inputs do, else element-wise). A Store policy
// provides that device step, store<V>(a, q, v0, v1, chan, lane) (every thread of the CTA calls it
// for the same samples and windows, lanes with elements only), and the host's questions:
// chan_group(S) (packed units made of blocks of that many channels), seg_align() (planes:
// segments a multiple of that many values), accepts(V, mis, C, S, packed) (false: the streaming
// path) and bind(V, mis) (the policy as launched, for the vector width and the inputs' position
// in their lines).
template <class Fn>
struct MapStore {
  int chan_group(int64_t /*S*/) const { return 1; }
  int seg_align() const { return 1; }
  bool accepts(int, int, int64_t, int64_t, bool) const { return true; }
  MapStore bind(int /*V*/, int /*mis*/) const { return *this; }
  template <int V, class Args, typename index_t, typename T = typename Args::scalar_t,
            typename acc_t = typename Args::acc_type>
  __device__ __forceinline__ void store(const Args& a, const NchwSlot<index_t>& q,
                                        const Vec<T, V>& v0, const Vec<T, V>& v1,
                                        const acc_t* chan, int /*lane*/) const {
    Vec<T, V> yv;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t p[4];
      nchw_coeffs(chan, a.cbmax, nchw_lane_channel(q, j), p);
      yv.v[j] = static_cast<T>(
          Fn::apply(static_cast<acc_t>(v0.v[j]), static_cast<acc_t>(v1.v[j]), p));
    }
    if (q.lo == 0 && q.hi == V && a.out_vec) {
      store_vec<T, V>(a.out + q.base, yv);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j >= q.lo && j < q.hi) a.out[q.base + j] = yv.v[j];
    }
  }
};

// One window of a unit: values [off, off + W) of each of its planes' concatenation (packed: W =
// cb * S, channel boundaries every S values; planes: one channel, W = the segment's length).
struct NchwWindow {
  int64_t off;
  int W, Sw;
};

// The kernels' shared body: Op (WelfordOp / GradOp) grows the partials from its inputs, Epilogue
// turns the merged partial of each channel into its 4 coefficients, the Store maps the tiles with
// them and writes the outputs.
template <class Op, int V, typename index_t, class Args, class Epilogue, class Store>
__device__ __forceinline__ void persistent_nchw_body(const Args& a, const Epilogue& epi,
                                                     const Store& store) {
  using ROp = typename nchw_reduce_op<Op>::type;  // the partials' op
  using T = typename ROp::scalar_t;
  using acc_t = typename ROp::acc_t;
  using Partial = typename ROp::Partial;
  using Param = typename ROp::Param;
  static_assert(sizeof(Param) == sizeof(acc_t), "the channel values hold one acc_t each");
  constexpr bool kDz = forms_dz<Op>::value;
  constexpr int K = kReduceK;
  constexpr int NI = nchw_reduce_op<Op>::kTiles;  // tiles
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const index_t C = a.C, S = a.S;
  const int t = threadIdx.x;
  const int lane = t % kWarpSize, warp = t / kWarpSize;
  const int64_t col = a.col0 + static_cast<int64_t>(blockIdx.x);
  const int64_t u_begin = balanced_start(col, a.uq, a.ur);
  const int64_t u_end = balanced_start(col + 1, a.uq, a.ur);
  const int64_t row = blockIdx.y;
  const index_t n0 = static_cast<index_t>(balanced_start(row, a.sq, a.sr));
  const index_t n1 = static_cast<index_t>(balanced_start(row + 1, a.sq, a.sr));
  const int nw = a.packed ? 1 : static_cast<int>(a.nseg);
  const int nq = a.nq, spc = a.spc, cbmax = a.cbmax;
  const index_t mis = a.mis;

  unsigned char* smem = dynamic_shared_memory();
  Vec<T, V>* tile = reinterpret_cast<Vec<T, V>*>(smem);  // [NI][upc][spc][nw][nq]
  const size_t tile_vecs = static_cast<size_t>(a.upc) * spc * nw * nq;
  const size_t tile_bytes = (NI * tile_vecs * sizeof(Vec<T, V>) + 15) / 16 * 16;
  Partial* pieces = reinterpret_cast<Partial*>(smem + tile_bytes);  // [2 * kBlockThreads]
  acc_t* chan = reinterpret_cast<acc_t*>(pieces + 2 * kBlockThreads);  // [4][cbmax]
  Param* pchan = reinterpret_cast<Param*>(chan);                        // [cbmax] (phase 1)

  // Unit u: channels [c0, c0 + cbn).
  auto unit_channels = [&](int64_t u, int64_t& c0, int& cbn) {
    if (a.packed) {
      c0 = a.ck * balanced_start(u, a.cq, a.cr);
      cbn = static_cast<int>(a.ck * (a.cq + (u < a.cr ? 1 : 0)));
    } else {
      c0 = u;
      cbn = 1;
    }
  };
  auto window = [&](int w, int cbn) -> NchwWindow {
    if (a.packed) return {0, cbn * static_cast<int>(a.S), static_cast<int>(a.S)};
    const int64_t off = static_cast<int64_t>(w) * a.seg_len;
    const int W = static_cast<int>(a.S - off < a.seg_len ? a.S - off : a.seg_len);
    return {off, W, W};
  };
  using Slot = NchwSlot<index_t>;
  auto slot = [&](index_t nn, index_t c0, const NchwWindow& win) -> Slot {
    Slot s;
    const index_t start = (nn * C + c0) * S + static_cast<index_t>(win.off);
    const int sh = static_cast<int>((start + mis) & (V - 1));  // address-aligned vectors
    const int nvec = (sh + win.W + V - 1) / V;                  // <= nq (plan)
    const int rel = t * V - sh;  // window position of the vector's first lane
    s.base = start - sh + static_cast<index_t>(t) * V;
    s.lo = max(0, -rel);
    s.hi = t < nvec ? min(V, win.W - rel) : 0;
    s.ch = s.lo < s.hi ? (rel + s.lo) / win.Sw : 0;
    s.bnd = s.lo < s.hi ? min(s.hi, max(s.lo, (s.ch + 1) * win.Sw - rel)) : s.hi;
    return s;
  };
  auto tile_at = [&](int i, int64_t iu, index_t nn, int w) -> Vec<T, V>& {
    return tile[i * tile_vecs + ((iu * spc + static_cast<int64_t>(nn - n0)) * nw + w) * nq + t];
  };
  auto load_slot = [&](const T* in, const Slot& s) -> Vec<T, V> {
    if (s.lo == 0 && s.hi == V) return load_vec<T, V>(in + s.base);
    return load_partial<T, V>(in + s.base, s.lo, s.hi);
  };

  // ---- 1. load the tiles, per-unit partials ----
  for (int64_t u = u_begin; u < u_end; ++u) {
    int64_t c0l;
    int cbn;
    unit_channels(u, c0l, cbn);
    const index_t c0 = static_cast<index_t>(c0l);
    // The previous unit's merges read the pieces this one overwrites (after the barrier below).
    // A forms_dz op: its 3 parameter rows [3][cbmax], the first the mean (ROp's parameter).
    for (int i = t; i < cbn; i += kBlockThreads) {
      if constexpr (kDz) {
#pragma unroll
        for (int kk = 0; kk < 3; ++kk) chan[kk * cbmax + i] = a.chan[kk * a.C + c0l + i];
      } else {
        pchan[i] = Op::param(a, c0l + i);
      }
    }
    __syncthreads();

    typename ROp::Thread s0[K], s1[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      s0[k] = ROp::init();
      s1[k] = ROp::init();
    }
    for (int w = 0; w < nw; ++w) {
      const NchwWindow win = window(w, cbn);
      for (index_t n = n0; n < n1; n += K) {
        Vec<T, V> r0[K], r1[K];
        Slot sl[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const index_t nn = n + k;
          sl[k].lo = sl[k].hi = sl[k].bnd = sl[k].ch = 0;
          if (nn < n1) {
            sl[k] = slot(nn, c0, win);
            if (sl[k].lo < sl[k].hi) {
              r0[k] = load_slot(a.in0, sl[k]);
              if constexpr (NI == 2) r1[k] = load_slot(a.in1, sl[k]);
              if constexpr (masks_in0<Op>::value)
                Op::template mask_in0<V>(a, sl[k].base, sl[k].lo, sl[k].hi, r0[k]);
              if constexpr (kDz)
                Op::template form_dz_slot<V>(a, sl[k], static_cast<const acc_t*>(chan), cbmax,
                                             r0[k], r1[k]);
              tile_at(0, u - u_begin, nn, w) = r0[k];
              if constexpr (NI == 2) tile_at(1, u - u_begin, nn, w) = r1[k];
            }
          }
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const Slot& q = sl[k];
          if (q.lo >= q.hi) continue;
          const Vec<T, V>& rb = NI == 2 ? r1[k] : r0[k];
          const Param p0 = pchan[q.ch];
          if (q.lo == 0 && q.bnd == V) {
            push_group<ROp, V>(s0[k], r0[k], rb, r0[k], 0, V, p0);
          } else {
            if (q.lo < q.bnd) push_group<ROp, V>(s0[k], r0[k], rb, r0[k], q.lo, q.bnd, p0);
            if (q.bnd < q.hi) {
              const Param p1 = pchan[q.ch + 1];
              push_group<ROp, V>(s1[k], r0[k], rb, r0[k], q.bnd, q.hi, p1);
            }
          }
        }
      }
    }

    // Slots merged in sample order -> pieces[2 t + side] -> per channel in vector order.
    Partial f0 = ROp::finish(s0[0]), f1 = ROp::finish(s1[0]);
#pragma unroll
    for (int k = 1; k < K; ++k) {
      ROp::merge(f0, ROp::finish(s0[k]));
      ROp::merge(f1, ROp::finish(s1[k]));
    }
    pieces[2 * t] = f0;
    pieces[2 * t + 1] = f1;
    __syncthreads();

    // Vectors of local channel ch: q_first..q_last (one channel: every slot); the first one holds
    // ch in its second side when it started in the previous channel. The window's position in its
    // line is the same for every sample of a packed unit (C * S % V == 0).
    const int S_ = static_cast<int>(a.S);
    const int sh = static_cast<int>((c0 * S + mis) & (V - 1));
    auto q_range = [&](int ch, int& q_first, int& q_last) {
      if (cbn == 1) {
        q_first = 0;
        q_last = nq - 1;
      } else {
        q_first = (ch * S_ + sh) / V;
        q_last = ((ch + 1) * S_ - 1 + sh) / V;
      }
    };
    auto piece = [&](int ch, int q, int q_first) -> const Partial& {
      const bool second = cbn > 1 && q == q_first && max(q * V - sh, 0) < ch * S_;
      return pieces[2 * q + (second ? 1 : 0)];
    };
    Partial* out = a.partials;
    const int per_channel = cbn == 1 ? nq : S_ / V + 2;
    const int thread_chain = per_channel * ((cbn + kBlockThreads - 1) / kBlockThreads);
    const int warp_chain =
        ((cbn + kWarps - 1) / kWarps) * ((per_channel + kWarpSize - 1) / kWarpSize + 5);
    if (thread_chain <= warp_chain) {
      for (int ch = t; ch < cbn; ch += kBlockThreads) {
        int q_first, q_last;
        q_range(ch, q_first, q_last);
        Partial acc = ROp::empty();
        for (int q = q_first; q <= q_last; ++q) ROp::merge(acc, piece(ch, q, q_first));
        out[(c0l + ch) * a.gy + blockIdx.y] = acc;
      }
    } else {
      for (int ch = warp; ch < cbn; ch += kWarps) {
        int q_first, q_last;
        q_range(ch, q_first, q_last);
        Partial acc = ROp::empty();
        for (int q = q_first + lane; q <= q_last; q += kWarpSize)
          ROp::merge(acc, piece(ch, q, q_first));
        acc = warp_reduce<ROp>(acc);
        if (lane == 0) out[(c0l + ch) * a.gy + blockIdx.y] = acc;
      }
    }
  }

  FUSEDBN_GRID_SYNC();

  // ---- 3. the column's channels dealt out to its gy CTAs, a warp per channel ----
  {
    int64_t cb0, cb1;
    int cbn;
    unit_channels(u_begin, cb0, cbn);
    unit_channels(u_end - 1, cb1, cbn);
    cb1 += cbn;
    const int64_t gy = a.gy;
    for (int64_t q = static_cast<int64_t>(blockIdx.y) + static_cast<int64_t>(warp) * gy;
         q < cb1 - cb0; q += static_cast<int64_t>(kWarps) * gy) {
      const int64_t c = cb0 + q;
      Partial acc = ROp::empty();
      for (int64_t i = lane; i < gy; i += kWarpSize) ROp::merge(acc, a.partials[c * gy + i]);
      acc = warp_reduce<ROp>(acc);
      if (lane == 0) epi(c, acc);
    }
  }

  FUSEDBN_GRID_SYNC();

  // ---- 5. the map over the tiles ----
  for (int64_t u = u_begin; u < u_end; ++u) {
    int64_t c0l;
    int cbn;
    unit_channels(u, c0l, cbn);
    const index_t c0 = static_cast<index_t>(c0l);
    __syncthreads();  // the previous unit's map has read chan
    for (int i = t; i < 4 * cbn; i += kBlockThreads) {
      const int kk = i / cbn, q = i % cbn;
      chan[kk * cbmax + q] = a.coeffs[static_cast<int64_t>(kk) * a.C + c0l + q];
    }
    __syncthreads();
    for (int w = 0; w < nw; ++w) {
      const NchwWindow win = window(w, cbn);
      for (index_t nn = n0; nn < n1; ++nn) {
        const Slot q = slot(nn, c0, win);
        if (q.lo >= q.hi) continue;
        const Vec<T, V> v0 = tile_at(0, u - u_begin, nn, w);
        const Vec<T, V> v1 = tile_at(NI - 1, u - u_begin, nn, w);
        store.template store<V>(a, q, v0, v1, static_cast<const acc_t*>(chan), lane);
      }
    }
  }
}

template <typename T, int V, typename index_t, class Epilogue, class Store>
__global__ void __launch_bounds__(kBlockThreads) persistent_nchw_kernel(
    const PersistentNchwArgs<T, at::opmath_type<T>, fusedbn::WelfordState<at::opmath_type<T>>> a,
    const Epilogue epi, const Store store) {
  persistent_nchw_body<WelfordOp<T>, V, index_t>(a, epi, store);
}

// The plan of one persistent contiguous pass; ok = false: the streaming path.
struct PersistentNchwPlan {
  bool ok = false;
  bool packed = false;
  int64_t units = 0, gx = 0, gx_slab = 0, gy = 0;
  int64_t ck = 1;  // packed: channels per block (units are whole blocks)
  int64_t nseg = 1, seg_len = 0;
  int nq = 0, upc = 0, spc = 0, cbmax = 1;
  size_t smem = 0;
};

// Units and windows: packed groups of whole planes when a window of 256 vectors holds a plane
// (at most 256 V - V + 1 values, the window's head in its line included), else one channel per
// unit cut into segments of at most 255 V values (256 for scalars: a segment at any position
// in its line spans at most 256 vectors). Then the tiles: a CTA holds NI (the op's inputs) x
// upc units x spc samples x nseg windows x nq vectors of dynamic shared memory next to the
// scratch. The candidate budgets run from small to the device's opt-in maximum; for each, the
// occupancy API says how many CTAs can be co-resident; the first budget at which every column
// fits one launch wins -- the least shared memory, the most CTAs per SM --, else the largest at
// which a slab of at least one column fits (slabs of as many columns as fit, one launch each). A
// budget counts only if its tiles hold twice the units (or samples) that make min_values = 8
// 16-byte vectors per thread of each input (the streaming reductions' rule of work per CTA), or
// the whole tensor: balanced ranges no larger than the tiles then still give every CTA at least
// min_values. Then the work is spread over as many CTAs as the slab leaves room for (fewer units
// per column, then more sample ranges), down to min_values values of each input per CTA.
// The Store's constraints: packed units are made of whole blocks of ck channels (C % ck == 0: the
// window of a unit then starts and ends where the store needs it to, e.g. at mask bytes), and the
// planes' segments are a multiple of seg_align values (a power of two, at most 8); either one may
// leave no plan.
template <typename T, int V, int NI, typename Partial, typename Kernel>
PersistentNchwPlan plan_persistent_nchw(Kernel kernel, int64_t N, int64_t C, int64_t S,
                                        bool packed, int device, int64_t ck = 1,
                                        int64_t seg_align = 1) {
  using acc_t = at::opmath_type<T>;
  PersistentNchwPlan p;
  p.packed = packed;
  p.ck = packed ? ck : 1;
  int64_t wmax = 0, unit_values = 0;  // values of the smallest unit per sample
  if (packed) {
    const int64_t cap = int64_t{kBlockThreads} * V - (V - 1);
    const int64_t blocks = C / p.ck;
    const int64_t per = cap / (p.ck * S);  // blocks per unit, at most
    if (per < 1 || blocks * p.ck != C) return p;
    p.units = ceil_div<int64_t>(blocks, per);
    p.cbmax = static_cast<int>(p.ck * ceil_div<int64_t>(blocks, p.units));
    p.nseg = 1;
    p.seg_len = S;
    wmax = p.cbmax * S;
    unit_values = blocks / p.units * p.ck * S;
  } else {
    const int64_t align = std::max<int64_t>(V, seg_align);  // both powers of two
    const int64_t cap = (V == 1 ? int64_t{kBlockThreads} : int64_t{kBlockThreads - 1} * V) /
                        align * align;
    p.nseg = ceil_div<int64_t>(S, cap);
    p.seg_len = ceil_div<int64_t>(ceil_div<int64_t>(S, p.nseg), align) * align;
    p.nseg = ceil_div<int64_t>(S, p.seg_len);
    p.units = C;
    p.cbmax = 1;
    wmax = p.seg_len;
    unit_values = S;
  }
  p.nq = static_cast<int>((2 * V - 2 + wmax) / V);
  if (p.nq > kBlockThreads) return p;
  // Tile bytes per unit and sample (of every input).
  const size_t ub = size_t{NI} * p.nseg * p.nq * V * sizeof(T);
  const size_t scratch = persistent_nchw_scratch_bytes<Partial, acc_t>(p.cbmax) + 16;
  const size_t optin = max_dynamic_shared_memory(device);
  const int64_t numel = N * C * S;
  const int64_t min_values = std::min<int64_t>(numel, min_block_values<T>());
  // The smallest tile a budget must hold: twice the units (of all samples), or the samples (of
  // one unit), that make min_values -- so that balanced ranges of at most the tile's capacity
  // can still give every CTA at least min_values (a range's floor is at least half its ceiling)
  // --, or the whole tensor.
  size_t min_tile = 0;
  if (N * unit_values >= min_values) {
    const int64_t ms = ceil_div<int64_t>(min_values, unit_values);
    min_tile = size_t(std::min<int64_t>(N, 2 * ms)) * ub;
  } else {
    const int64_t mu = ceil_div<int64_t>(min_values, N * unit_values);
    min_tile = size_t(std::min<int64_t>(p.units, 2 * mu)) * size_t(N) * ub;
  }
  if (optin <= scratch + ub) return p;
  set_max_dynamic_shared_memory(kernel, static_cast<int>(optin));
  const size_t budgets[] = {24 << 10, 48 << 10, 96 << 10, 160 << 10, optin};
  size_t best_smem = 0;
  int64_t best_slab = 0, best_gx = 0, best_gy = 0, best_upc = 0;
  for (size_t b : budgets) {
    if (b > optin || b < scratch + min_tile) continue;
    const size_t tile_cap = b - scratch;
    const int64_t cap = cooperative_capacity(kernel, kBlockThreads, b, device);
    int64_t upc = 1, gy = 1;
    if (size_t(N) * ub <= tile_cap) {
      upc = std::min<int64_t>(p.units, static_cast<int64_t>(tile_cap / (size_t(N) * ub)));
    } else {
      gy = ceil_div<int64_t>(N, static_cast<int64_t>(tile_cap / ub));
    }
    const int64_t gx = ceil_div<int64_t>(p.units, upc);
    if (gy > std::min<int64_t>(cap, 65535)) continue;
    best_smem = b;
    best_upc = upc;
    best_gx = gx;
    best_gy = gy;
    best_slab = std::min<int64_t>(gx, cap / gy);
    if (best_slab == gx) break;
  }
  if (best_slab == 0) return p;
  const int64_t cap = cooperative_capacity(kernel, kBlockThreads, best_smem, device);
  int64_t gx = best_gx, gy = best_gy, slab = best_slab;
  if (slab == gx && gy == 1) {
    // More columns (fewer units each) while they fit and each keeps min_values: every column
    // gets at least floor(units / gx) >= min_units units.
    const int64_t min_units = ceil_div<int64_t>(min_values, N * unit_values);
    gx = std::max(ceil_div<int64_t>(p.units, best_upc),
                  std::min(cap, std::max<int64_t>(p.units / min_units, 1)));
    slab = gx;
  }
  // More sample ranges while the slab's CTAs fit and each CTA keeps min_values.
  const int64_t units_low = std::max<int64_t>(p.units / gx, 1);  // of the smallest column
  const int64_t min_samples = ceil_div<int64_t>(min_values, units_low * unit_values);
  gy = std::max<int64_t>(gy, std::min<int64_t>({cap / slab, N / min_samples, int64_t{65535}}));
  p.gx = gx;
  p.gx_slab = slab;
  p.gy = gy;
  p.upc = static_cast<int>(ceil_div<int64_t>(p.units, gx));
  p.spc = static_cast<int>(ceil_div<int64_t>(N, gy));
  const size_t tile = (size_t(p.upc) * p.spc * ub + 15) / 16 * 16;
  p.smem = tile + persistent_nchw_scratch_bytes<Partial, acc_t>(p.cbmax);
  p.ok = p.smem <= best_smem && slab * gy <= cap;
  return p;
}

// The persistent pass of Op over the contiguous inputs in0 (and in1, Op::kInputs == 2)
// [N][C][S] -> out: kernel_of(vtag, itag) gives the kernel for the vector width and index type;
// it runs epi (the streaming path's epilogue) once per channel, which writes the coefficients to
// coeffs; chan: the op's per-channel array (GradOp's saved mean), or nullptr. Returns false,
// having written nothing, when no slab fits or a launch is refused (the caller runs the streaming
// path).
// store: the Store policy of the last step (MapStore<Fn>, or the fused activation's); a layout it
// does not accept is left to the streaming path too. ex: the mask of kMaskedIn0 ops (ex.mask,
// ex.slope, ex.mask_zero); the residual, slope and activation of forms_dz ops (ex.in2, ex.slope,
// ex.inv_slope, ex.act).
template <class Op, class Epilogue, class KernelOf, class Store>
bool persistent_nchw_run(KernelOf kernel_of, const at::Tensor& in0, const at::Tensor& in1,
                         const at::Tensor& out, const Geometry& g,
                         const typename Op::acc_t* chan, const Epilogue& epi,
                         const at::Tensor& coeffs, const Store& store,
                         const ReduceExtras& ex = ReduceExtras()) {
  using T = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using Partial = typename Op::Partial;
  constexpr int NI = nchw_reduce_op<Op>::kTiles;
  if (persistent_disabled()) return false;
  constexpr int VM = max_vec<T>();
  const T* p0 = in0.const_data_ptr<T>();
  const T* p1 = NI == 2 ? in1.const_data_ptr<T>() : nullptr;
  T* outp = out.mutable_data_ptr<T>();
  // Vectors need the inputs at one position in their lines (else scalar, as the streaming pass).
  const int mis = common_misalignment<T>({p0, p1});
  const bool aligned = mis >= 0;
  const bool packed_vec = aligned && g.S >= VM && (g.C * g.S) % VM == 0;
  const bool packed = g.S <= (packed_vec ? int64_t{kBlockThreads} * VM - (VM - 1)
                                         : int64_t{kBlockThreads});
  const bool vec = packed ? packed_vec : aligned;
  const bool use64 = !fits_int32(g.numel());
  const int device = in0.get_device();
  bool done = false;
  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec<VM>(vec, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = kernel_of(vtag, itag);
      const int amis = V == 1 ? 0 : mis;
      if (!store.accepts(V, amis, g.C, g.S, packed)) return;
      const PersistentNchwPlan plan = plan_persistent_nchw<T, V, NI, Partial>(
          kernel, g.N, g.C, g.S, packed, device, store.chan_group(g.S), store.seg_align());
      if (!plan.ok) return;
      const Store bound = store.bind(V, amis);
      at::Tensor parts =
          at::empty({g.C * plan.gy * static_cast<int64_t>(sizeof(Partial))},
                    in0.options().dtype(at::kByte));
      PersistentNchwArgs<T, acc_t, Partial> a;
      a.in0 = p0;
      a.in1 = p1;
      a.out = outp;
      a.chan = chan;
      a.shift_stride = g.S;
      a.partials = reinterpret_cast<Partial*>(parts.data_ptr());
      a.coeffs = coeffs.const_data_ptr<acc_t>();
      a.N = g.N;
      a.C = g.C;
      a.S = g.S;
      a.units = plan.units;
      a.ck = plan.ck;
      a.cq = g.C / plan.ck / plan.units;
      a.cr = g.C / plan.ck % plan.units;
      a.gx = plan.gx;
      a.uq = plan.units / plan.gx;
      a.ur = plan.units % plan.gx;
      a.gy = plan.gy;
      a.sq = g.N / plan.gy;
      a.sr = g.N % plan.gy;
      a.nseg = plan.nseg;
      a.seg_len = plan.seg_len;
      a.packed = plan.packed ? 1 : 0;
      a.nq = plan.nq;
      a.upc = plan.upc;
      a.spc = plan.spc;
      a.cbmax = plan.cbmax;
      a.mis = amis;
      a.mask = ex.mask;
      a.mask_slope = static_cast<acc_t>(ex.slope);
      a.mask_zero = ex.mask_zero;
      a.in2 = ex.in2.defined() ? ex.in2.const_data_ptr<T>() : nullptr;
      a.in2_vec = a.in2 != nullptr && (V == 1 || misalignment(a.in2, sizeof(T)) == amis);
      a.act = ex.act;
      a.inv_slope = static_cast<acc_t>(ex.inv_slope);
      a.out_vec = V == 1 || misalignment(outp, sizeof(T)) == mis ? 1 : 0;
      const cudaStream_t stream = current_stream();
      for (int64_t c0 = 0; c0 < plan.gx; c0 += plan.gx_slab) {
        a.col0 = c0;
        const int64_t n = std::min(plan.gx_slab, plan.gx - c0);
        const bool launched = launch_cooperative(
            kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>(plan.gy)),
            dim3(kBlockThreads), plan.smem, stream, a, epi, bound);
        // Refused (an occupancy the query did not foresee): the streaming path the caller runs
        // then rewrites every output, the slabs already done included.
        if (!launched) return;
      }
      done = true;
    });
  });
  return done;
}

// The persistent forward over the contiguous x [N][C][S] -> y, running epi (the streaming path's
// TrainStatsEpilogue) once per channel; coeffs is what epi writes the coefficients to. Returns
// false, having written nothing, when no slab fits or a launch is refused (the caller runs the
// streaming path).
// store: MapStore<AffineFn> (y), or act_forward_train's store (bn_act_forward.cu).
template <typename T, class Epilogue, class Store = MapStore<AffineFn<at::opmath_type<T>>>>
bool persistent_nchw_forward(const at::Tensor& x, const at::Tensor& y, const Geometry& g,
                             const Epilogue& epi, const at::Tensor& coeffs,
                             const Store& store = Store()) {
  auto kernel_of = [](auto vtag, auto itag) {
    return persistent_nchw_kernel<T, decltype(vtag)::value, typename decltype(itag)::type,
                                  Epilogue, Store>;
  };
  return persistent_nchw_run<WelfordOp<T>>(kernel_of, x, at::Tensor(), y, g, nullptr, epi,
                                           coeffs, store);
}

}  // namespace cuda
}  // namespace fusedbn
