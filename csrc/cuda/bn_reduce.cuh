// Host side of the split per-channel reduction (kernels and design: bn_reduce_kernels.cuh).
//
// reduce_pass1<Op> picks the kernel from the canonical layout and plans its grid:
//  * rows (channels_last): TX = min(C/V, 32) threads along channels, TY = 256/TX rows; grid.x
//    covers the channels, grid.y splits the N*S rows;
//  * packed (contiguous, S < 256 vectors and C*S a multiple of the vector width, else scalar):
//    groups of cb whole planes per CTA window (cb*S <= 256*K*V), grid.x = channel groups,
//    grid.y splits the samples;
//  * planes (contiguous, large S): planes cut into segments of at most 256*K vectors,
//    grid.x = C * segments, grid.y splits the samples.
// The split count fills about one wave (SMs x resident blocks of the kernel) while giving each
// CTA at least kMinValuesPerBlock values, so the per-CTA merge stays a small part of its time.
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

constexpr int64_t kMinValuesPerBlock = 8192;

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

inline int64_t choose_splits(int64_t blocks_x, int64_t target_blocks, int64_t max_splits,
                             int64_t values_per_split_unit) {
  int64_t s = ceil_div<int64_t>(target_blocks, std::max<int64_t>(blocks_x, 1));
  const int64_t by_work = std::max<int64_t>(
      1, max_splits * values_per_split_unit / kMinValuesPerBlock);
  s = std::min({s, max_splits, by_work, int64_t{65535}});
  return std::max<int64_t>(s, 1);
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

// Pass 1 over the canonical input(s) (in1 undefined for one-input ops). chan: per-channel op
// parameter of the accumulation type, or nullptr. Requires numel > 0. mask, mask_slope,
// mask_zero: for ops with kMaskedIn0 (ReduceArgs).
template <class Op>
Partials reduce_pass1(const at::Tensor& in0, const at::Tensor& in1,
                      const typename Op::acc_t* chan, const Geometry& g,
                      const uint8_t* mask = nullptr, double mask_slope = 0.0,
                      bool mask_zero = false) {
  using T = typename Op::scalar_t;
  using Partial = typename Op::Partial;
  constexpr int VM = max_vec<T>();
  ReduceArgs<T, typename Op::acc_t> a;
  a.mask = mask;
  a.mask_slope = static_cast<typename Op::acc_t>(mask_slope);
  a.mask_zero = mask_zero;
  a.in0 = in0.const_data_ptr<T>();
  a.in1 = in1.defined() ? in1.const_data_ptr<T>() : nullptr;
  a.chan = chan;
  a.shift_stride = first_value_stride(g);
  a.N = g.N;
  a.C = g.C;
  a.S = g.S;
  const bool aligned = aligned_to(a.in0, 16) && (a.in1 == nullptr || aligned_to(a.in1, 16));
  const bool use64 = !fits_int32(g.numel());
  const int sms = sm_count(in0.get_device());
  const cudaStream_t stream = current_stream();
  const auto opts = in0.options();
  Partials result;

  if (g.layout == Layout::kChannelsLast) {
    dispatch_index(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec<VM>(aligned && g.C % VM == 0, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto kernel = reduce_rows_kernel<Op, V, index_t>;
        const int bps =
            blocks_per_sm(kernel, kBlockThreads, size_t{kBlockThreads} * V * sizeof(Partial));
        const int64_t cvecs = g.C / V;
        const int tx = static_cast<int>(std::min<int64_t>(cvecs, kWarpSize));
        const int ty = kBlockThreads / tx;
        const int64_t gx = ceil_div<int64_t>(cvecs, tx);
        a.splits = choose_splits(gx, int64_t{sms} * bps, ceil_div<int64_t>(g.rows(), ty),
                                 int64_t{ty} * tx * V);
        a.P = a.splits;
        result = launch_pass1<Op>(
            kernel, a, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(a.splits)),
            dim3(tx, ty), size_t{kBlockThreads} * V * sizeof(Partial), opts, stream);
      });
    });
    return result;
  }

  // Contiguous: packed when a group of whole small planes fits one CTA window.
  constexpr int KP = 2 * kBlockThreads * kReduceK * sizeof(Partial) <= 32768 ? kReduceK : 2;
  const bool packed_vec = aligned && g.S >= VM && (g.C * g.S) % VM == 0;
  const int64_t packed_cap = packed_vec ? window_capacity<VM>(KP) : window_capacity<1>(KP);
  if (g.S < int64_t{kBlockThreads} * VM && g.S <= packed_cap) {
    dispatch_index(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec<VM>(packed_vec, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto kernel = reduce_packed_kernel<Op, V, KP, index_t>;
        const size_t smem = size_t{2} * kBlockThreads * KP * sizeof(Partial);
        const int bps = blocks_per_sm(kernel, kBlockThreads, smem);
        const int64_t groups0 = ceil_div<int64_t>(g.C, std::max<int64_t>(packed_cap / g.S, 1));
        a.cb = ceil_div<int64_t>(g.C, groups0);  // balanced groups
        const int64_t groups = ceil_div<int64_t>(g.C, a.cb);
        a.splits = choose_splits(groups, int64_t{sms} * bps, g.N, a.cb * g.S);
        a.P = a.splits;
        result = launch_pass1<Op>(
            kernel, a, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(a.splits)),
            dim3(kBlockThreads), smem, opts, stream);
      });
    });
    return result;
  }

  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec<VM>(aligned, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = reduce_planes_kernel<Op, V, index_t>;
      const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
      const int64_t cap = V == 1 ? int64_t{kBlockThreads} * kReduceK
                                 : int64_t{kBlockThreads} * kReduceK * V - V;
      a.nseg = ceil_div<int64_t>(g.S, cap);
      a.seg_len = ceil_div<int64_t>(ceil_div<int64_t>(g.S, a.nseg), V) * V;
      a.nseg = ceil_div<int64_t>(g.S, a.seg_len);
      const int64_t gx = g.C * a.nseg;
      a.splits = choose_splits(gx, int64_t{sms} * bps, g.N, a.seg_len);
      a.P = a.nseg * a.splits;
      result = launch_pass1<Op>(kernel, a,
                                dim3(static_cast<unsigned>(gx), static_cast<unsigned>(a.splits)),
                                dim3(kBlockThreads), 0, opts, stream);
    });
  });
  return result;
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
