// Host side of the split per-channel reduction (kernels and design: bn_reduce_kernels.cuh).
//
// reduce_pass1<Op> picks the kernel from the canonical layout and plans its grid:
//  * rows (channels_last, (N, C)): V = the widest vector that tiles C and is aligned in every
//    input (16 bytes, else 8, 4, ..., 1 element); TX = rows_lanes(C/V) lanes along channels,
//    32/TX rows per warp; grid.x covers the channels, grid.y splits the chunks of rows, each CTA
//    at least kMinRowIterations chunks (K rows per thread each);
//  * packed (contiguous, S < 256 vectors and C*S a multiple of the vector width, else scalar):
//    balanced groups of at most cb whole planes per CTA window (cb*S <= 256*K*V), grid.y splits
//    the samples, grid.x the groups (several per CTA when their samples are too little work);
//  * planes (contiguous, large S): planes cut into segments of at most 256*K vectors,
//    grid.y splits the samples, grid.x the C * segments (several per CTA, as packed).
// The contiguous kernels keep 16-byte vectors for inputs that start inside a 16-byte line (the
// common misalignment, a.mis; scalar only when two inputs sit differently in their lines).
// The split count fills about one wave (SMs x resident blocks of the kernel) while giving each
// CTA at least kMinVectorsPerThread 16-byte vectors per thread (rows: kMinRowIterations chunks),
// so the per-CTA merge stays a small part of its time (plan_units). Splits interleave (split y takes samples / row chunks y,
// y + splits, ...), so a one-wave grid moves through the tensor as one front and ends at its last
// samples / rows: the element-wise pass that follows walks the tensor backwards from there
// (bn_elementwise.cu).
// reduce_pass2<Op> merges the partials per channel and runs the caller's epilogue.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "bn_reduce_kernels.cuh"
#include "common.h"

namespace fusedbn {
namespace cuda {

struct Partials {
  at::Tensor buffer;  // bytes: [C][P] Op::Partial
  int64_t P = 0;
};

// planes, packed: 16-byte vectors of each input per thread and CTA, at least (two iterations of
// K = 4 loads in flight), so that the CTA's merge stays a small part of its time.
constexpr int64_t kMinVectorsPerThread = 8;
constexpr int64_t kMinRowIterations = 4;  // rows: chunks (K rows per thread each) per CTA

// Values of T per CTA, at least, for the planes and packed kernels (whatever vector width the
// inputs allow: the bound is in bytes).
template <typename T>
constexpr int64_t min_block_values() {
  return int64_t{kBlockThreads} * kMinVectorsPerThread * max_vec<T>();
}

// Offset between the first values of consecutive channels of a canonical input (common.h).
inline int64_t first_value_stride(const Geometry& g) {
  return g.layout == Layout::kChannelsLast ? 1 : g.S;
}

// The per-channel shift WelfordOp accumulates around (bn_reduce_ops.cuh), for the epilogues
// that add it back: x is the canonical input pass 1 read.
template <typename T>
ChannelShift<T> channel_shift(const at::Tensor& x, const Geometry& g) {
  return ChannelShift<T>{x.const_data_ptr<T>(), first_value_stride(g)};
}

// Splits of the `units` work units of a CTA column (samples, or chunks of rows): enough CTAs
// for one wave (target_blocks over blocks_x columns), each split at least min_units units.
inline int64_t choose_splits(int64_t blocks_x, int64_t target_blocks, int64_t units,
                             int64_t min_units) {
  int64_t s = ceil_div<int64_t>(target_blocks, std::max<int64_t>(blocks_x, 1));
  const int64_t by_work = std::max<int64_t>(1, units / std::max<int64_t>(min_units, 1));
  s = std::min({s, units, by_work, int64_t{65535}});
  return std::max<int64_t>(s, 1);
}

// The grid of the planes and packed kernels over `units` work units (plane segments, channel
// groups) of at least unit_values values per sample: splits along the N samples as
// choose_splits gives them and, when a unit of the fewest samples a split gets is still less
// than min_values (few samples, e.g. N = 2), several units per CTA, so that every CTA gets
// min_values (or the whole tensor): gx CTA columns take units [x * units / gx, ...) each.
struct UnitGrid {
  int64_t gx = 1, splits = 1;
};
inline UnitGrid plan_units(int64_t units, int64_t unit_values, int64_t N, int64_t target_blocks,
                           int64_t min_values) {
  UnitGrid r;
  unit_values = std::max<int64_t>(unit_values, 1);
  r.splits = choose_splits(units, target_blocks, N, ceil_div(min_values, unit_values));
  const int64_t per_unit = unit_values * (N / r.splits);  // the CTA with the fewest samples
  const int64_t per_block = ceil_div(min_values, per_unit);
  r.gx = std::max<int64_t>(1, units / per_block);  // every CTA >= per_block units
  return r;
}

// Lanes along channels (TX) of the rows kernel for cvecs channel vectors: the block's lanes
// cover ceil(cvecs / TX) * TX vectors, of which cvecs are real, and a warp uses (32 / TX) * TX
// of its 32 lanes; TX maximizes the product of the two (larger TX on ties). TX == cvecs keeps a
// warp's access one contiguous run; other TX at least 8 vectors (a warp's rows are then runs of
// >= 128 bytes for 16-byte vectors).
inline int rows_lanes(int64_t cvecs) {
  if (cvecs >= kWarpSize && cvecs % kWarpSize == 0) return kWarpSize;
  int best = 1;
  double best_use = -1.0;
  for (int t = kWarpSize; t >= 1; --t) {
    if (t != cvecs && t < 8) continue;
    if (t > cvecs) continue;
    const double cover =
        static_cast<double>(cvecs) / static_cast<double>(ceil_div<int64_t>(cvecs, t) * t);
    const double use = cover * static_cast<double>((kWarpSize / t) * t) / kWarpSize;
    if (use > best_use + 1e-12) {
      best = t;
      best_use = use;
    }
  }
  return best;
}

template <class Op, typename Kernel>
Partials launch_pass1(Kernel kernel, ReduceArgs<typename Op::scalar_t, typename Op::acc_t> a,
                      dim3 grid, dim3 block, size_t smem, const at::TensorOptions& opts,
                      cudaStream_t stream) {
  Partials out;
  out.P = a.P;
  out.buffer = at::empty({a.C * a.P * static_cast<int64_t>(sizeof(typename Op::Partial))},
                         opts.dtype(at::kByte));
  a.partials = out.buffer.data_ptr();
  launch_kernel(kernel, grid, block, smem, stream, a);
  return out;
}

// What some ops read beyond in0, in1 and chan (ReduceArgs): the third input of three-input ops
// (undefined: zeros), the mask of kMaskedIn0 ops, the activation of act_backward's ops; and
// what kStoresIn0 ops write: out0 (and out1, or undefined), of in0's shape and strides.
struct ReduceExtras {
  at::Tensor in2;
  at::Tensor out0, out1;
  const uint8_t* mask = nullptr;
  double slope = 0.0;
  double inv_slope = 1.0;
  bool mask_zero = false;
  int act = 0;
};

// dispatch_index for pass 1: kStoresIn0 ops are built for 32-bit indices only (their 64-bit
// kernels spilled; a tensor of more than 2^30 elements takes the caller's unfused path, which
// has them).
template <class Op, typename F>
void dispatch_pass1_index(bool use64, F&& f) {
  if constexpr (stores_in0<Op>::value) {
    TORCH_INTERNAL_ASSERT(!use64, "fusedbn: a kStoresIn0 reduction with 64-bit indices");
    f(TypeTag<int32_t>{});
  } else {
    dispatch_index(use64, std::forward<F>(f));
  }
}

// Pass 1 over the canonical input(s) (in1 undefined for one-input ops). chan: per-channel op
// parameters of the accumulation type, or nullptr. Requires numel > 0.
template <class Op>
Partials reduce_pass1(const at::Tensor& in0, const at::Tensor& in1,
                      const typename Op::acc_t* chan, const Geometry& g,
                      const ReduceExtras& ex = ReduceExtras()) {
  using T = typename Op::scalar_t;
  using Partial = typename Op::Partial;
  constexpr int VM = max_vec<T>();
  ReduceArgs<T, typename Op::acc_t> a;
  a.mask = ex.mask;
  a.mask_slope = static_cast<typename Op::acc_t>(ex.slope);
  a.inv_slope = static_cast<typename Op::acc_t>(ex.inv_slope);
  a.mask_zero = ex.mask_zero;
  a.act = ex.act;
  const at::Tensor& in2 = ex.in2;
  a.in0 = in0.const_data_ptr<T>();
  a.in1 = in1.defined() ? in1.const_data_ptr<T>() : nullptr;
  a.in2 = in2.defined() ? in2.const_data_ptr<T>() : nullptr;
  TORCH_INTERNAL_ASSERT(stores_in0<Op>::value == ex.out0.defined());
  a.out0 = ex.out0.defined() ? ex.out0.mutable_data_ptr<T>() : nullptr;
  a.out1 = ex.out1.defined() ? ex.out1.mutable_data_ptr<T>() : nullptr;
  a.chan = chan;
  a.shift_stride = first_value_stride(g);
  a.N = g.N;
  a.C = g.C;
  a.S = g.S;
  const bool use64 = !fits_int32(g.numel());
  const int sms = sm_count(in0.get_device());
  const cudaStream_t stream = current_stream();
  const auto opts = in0.options();
  Partials result;

  if (g.layout == Layout::kChannelsLast) {
    // The widest vector of channels that tiles C and is aligned in both inputs.
    const int vw = widest_vec<T>(g.C, {a.in0, a.in1, a.in2});
    dispatch_pass1_index<Op>(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec_width<VM>(vw, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto kernel = reduce_rows_kernel<Op, V, index_t>;
        const int64_t cvecs = g.C / V;
        const int tx = rows_lanes(cvecs);
        const int ty = kBlockThreads / kWarpSize * (kWarpSize / tx);  // rows per step
        const size_t smem = size_t{kBlockThreads} / kWarpSize * tx * V * sizeof(Partial);
        const int bps = blocks_per_sm(kernel, kBlockThreads, smem);
        const int64_t gx = ceil_div<int64_t>(cvecs, tx);
        const int64_t chunks = ceil_div<int64_t>(g.rows(), int64_t{ty} * kReduceK);
        a.tx = tx;
        a.out_vec = widest_vec<T>(g.C, {a.out0, a.out1}) >= V;
        a.splits = choose_splits(gx, int64_t{sms} * bps, chunks, kMinRowIterations);
        a.P = a.splits;
        result = launch_pass1<Op>(
            kernel, a, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(a.splits)),
            dim3(kBlockThreads), smem, opts, stream);
      });
    });
    return result;
  }

  // Contiguous: vectors aligned to the address, so an input that starts inside a 16-byte line
  // keeps them (the planes and packed kernels mask the elements before a run's first boundary);
  // two inputs need the same position in their lines (else scalar).
  const int mis = common_misalignment<T>({a.in0, a.in1, a.in2});
  const bool vec = mis >= 0;
  a.mis = vec ? mis : 0;
  a.out_vec = vec && common_misalignment<T>({a.in0, a.out0, a.out1}) == mis;

  // Packed when a group of whole small planes fits one CTA window.
  constexpr int KP = 2 * kBlockThreads * kReduceK * sizeof(Partial) <= 32768 ? kReduceK : 2;
  const bool packed_vec = vec && g.S >= VM && (g.C * g.S) % VM == 0;
  const int64_t packed_cap = packed_vec ? window_capacity<VM>(KP) : window_capacity<1>(KP);
  if (g.S < int64_t{kBlockThreads} * VM && g.S <= packed_cap) {
    dispatch_pass1_index<Op>(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec<VM>(packed_vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto kernel = reduce_packed_kernel<Op, V, KP, index_t>;
        const size_t smem = size_t{2} * kBlockThreads * KP * sizeof(Partial);
        const int bps = blocks_per_sm(kernel, kBlockThreads, smem);
        // Balanced groups: group u holds channels [u * C / groups, (u + 1) * C / groups), of
        // C / groups or cb = ceil(C / groups) <= packed_cap / S channels.
        const int64_t groups = ceil_div<int64_t>(g.C, std::max<int64_t>(packed_cap / g.S, 1));
        a.units = groups;
        a.cb = ceil_div<int64_t>(g.C, groups);
        const UnitGrid grid = plan_units(groups, g.C / groups * g.S, g.N, int64_t{sms} * bps,
                                         min_block_values<T>());
        a.splits = grid.splits;
        a.P = a.splits;
        result = launch_pass1<Op>(
            kernel, a, dim3(static_cast<unsigned>(grid.gx), static_cast<unsigned>(a.splits)),
            dim3(kBlockThreads), smem, opts, stream);
      });
    });
    return result;
  }

  dispatch_pass1_index<Op>(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec<VM>(vec, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = reduce_planes_kernel<Op, V, index_t>;
      const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
      const int64_t cap = V == 1 ? int64_t{kBlockThreads} * kReduceK
                                 : int64_t{kBlockThreads} * kReduceK * V - V;
      a.nseg = ceil_div<int64_t>(g.S, cap);
      a.seg_len = ceil_div<int64_t>(ceil_div<int64_t>(g.S, a.nseg), V) * V;
      a.nseg = ceil_div<int64_t>(g.S, a.seg_len);
      // Vector slots per sample: a segment spans at most ceil((V - 1 + seg_len) / V) vectors.
      const int64_t seg_vecs = ceil_div<int64_t>(V - 1 + a.seg_len, V);
      a.kq = std::min<int64_t>(kReduceK, ceil_div<int64_t>(seg_vecs, kBlockThreads));
      a.units = g.C * a.nseg;
      const int64_t last_seg = g.S - (a.nseg - 1) * a.seg_len;  // the shortest
      const UnitGrid grid = plan_units(a.units, std::min(a.seg_len, last_seg), g.N,
                                       int64_t{sms} * bps, min_block_values<T>());
      a.splits = grid.splits;
      a.P = a.nseg * a.splits;
      result = launch_pass1<Op>(
          kernel, a, dim3(static_cast<unsigned>(grid.gx), static_cast<unsigned>(a.splits)),
          dim3(kBlockThreads), 0, opts, stream);
    });
  });
  return result;
}

// EvalDxOp's parameters [2][C] (bn_reduce_ops.cuh): the saved mean, a = w * invstd (mean and
// invstd contiguous, of the accumulation type acc_t).
template <typename acc_t>
at::Tensor eval_dx_params(const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                          const at::Tensor& invstd) {
  const int64_t C = mean.numel();
  at::Tensor params = at::empty({2 * C}, mean.options());
  const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(C, kBlockThreads));
  launch_kernel(eval_dx_params_kernel<acc_t>, blocks, kBlockThreads, 0, current_stream(),
                channel_ptr(weight), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                params.mutable_data_ptr<acc_t>(), C);
  return params;
}

// Pass 2: merges each channel's partials and runs epi(c, merged) once per channel.
template <class Op, class Epilogue>
void reduce_pass2(const Partials& parts, int64_t C, const Epilogue& epi) {
  int group = kWarpSize;
  while (group < kBlockThreads && group * 4 < parts.P) group <<= 1;
  const int64_t per_block = kBlockThreads / group;
  const cudaStream_t stream = current_stream();
  const auto blocks = static_cast<unsigned>(ceil_div<int64_t>(C, per_block));
  launch_kernel(merge_partials_kernel<Op, Epilogue>, blocks, kBlockThreads, 0, stream,
                reinterpret_cast<const typename Op::Partial*>(parts.buffer.const_data_ptr()), C,
                parts.P, group, epi);
}

}  // namespace cuda
}  // namespace fusedbn
