// The persistent single-read training backward (issue 15) for the rows layout (channels_last and
// (N, C)): the forward's scheme (bn_persistent.cuh) with two tiles, dy and x, held in shared
// memory from their one read to the write of dx. One cooperative launch per slab of channel
// columns, every CTA of it co-resident:
//   1. the CTA reads the saved mean of its TX * V channels once (through shared memory: GradOp's
//      parameter), loads its balanced range of rows (cta_rows) of dy and x (the streaming
//      rows kernel's lanes: TX along C, one V-channel vector each, 32 / TX rows per warp) into
//      the two tiles, growing per-thread GradOp states on the way (the compensated sums of dy and
//      dy * (x - mean), groups of K rows, push_all / push, as reduce_rows_kernel), merges them
//      within the warp by the same shuffle tree and across the warps in warp order, and writes
//      one partial per channel: partials[c][y];
//   2. grid barrier;
//   3. the channels of the slab dealt out to its CTAs (channel j of a column to CTA j % gy); a
//      warp per channel merges its gy partials as the forward does (lane l: partials l, l + 32,
//      ... in order, then the warp's shuffle tree) -- a fixed order whatever the order the CTAs
//      ran in -- and runs the streaming path's epilogue (BackwardEpilogue of bn_backward.cu:
//      GradEpilogueBase's grad_weight, grad_bias and the dx coefficients k0, a, mean, k3);
//   4. grid barrier;
//   5. each CTA reads the coefficients of its channels (once per CTA, through shared memory) and
//      computes dx = (dy - k0) * a - (x - mean) * k3 (channel_grad's map, grad_dx; the Store
//      policy GradDxStore) from the tiles it holds, and writes dx.
// act_backward (bn_act_backward.cu) runs the same kernel with its op in place of GradOp: dz is
// formed from dy as the streaming reduction forms it (MaskedGradOp: from the mask, read once;
// InputGradOp: act'(z) * dy with z from x and the residual, read once, and the op's [3][C]
// parameters staged like the mean) where dy is loaded, kept in the dy tile, summed by GradOp's
// sums as (dz, x), and written as grad_residual from step 5 when asked (GradDxStore::dz).
// Global traffic: dy and x read once each, dx written once; per channel: the mean read once per
// CTA (gy C values) and once by the epilogue, invstd and weight once, grad_weight / grad_bias
// written once, partials C * gy written and read, coefficients 4 C written and 4 C per CTA read.
// Numerics: the per-thread sums, the merges and the dx map are the streaming path's (GradOp of
// bn_reduce_ops.cuh, the same trees, the same epilogue and formula); only the partition of the
// rows into partials differs (contiguous ranges per CTA instead of interleaved chunks), which
// changes the rounding of the compensated sums at O(eps^2), not their error bound.
// Used for training mode with dx asked for (bn_backward.cu); without dx the streaming reduction
// already reads dy and x once each, and eval mode's dx reads dy alone.
// The planner (plan_persistent_tiles) sizes the tiles: 2 * TX * V * sizeof(T) bytes per row, so
// half the rows of the forward's fit; a slab that does not fit, or a cooperative launch that is
// refused, leaves the streaming path to the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bn_persistent.cuh"
#include "bn_reduce.cuh"
#include "bn_reduce_ops.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {

template <typename T, typename acc_t>
struct PersistentGradArgs {
  const T* dy = nullptr;
  const T* x = nullptr;
  // The Op's per-channel parameters [chan_rows<Op>][C], row 0 the saved mean (GradOp's
  // parameter; InputGradOp's rows: mean, w * invstd, b).
  const acc_t* chan = nullptr;
  GradPartial<acc_t>* partials = nullptr;  // [C][gy]
  const acc_t* coeffs = nullptr;           // [4][C] (k0, a, mean, k3), written by the epilogue
  int64_t rows = 0, C = 0;
  int64_t col0 = 0;  // the slab's first CTA column (TX channel vectors each)
  int64_t R = 0;     // rows per CTA, at most (the tiles' capacity)
  int64_t gy = 1;    // CTAs per column = partials per channel
  int64_t rq = 0, rr = 0;  // rows / gy, rows % gy (cta_rows)
  int32_t tx = 32;   // lanes along channels
  // act_backward's ops (bn_act_backward.cu), the fields of ReduceArgs they read: the mask of
  // kMaskedIn0 ops and what dy becomes where its bit is clear (0: mask_zero, or dy * mask_slope);
  // the third input of InputGradOp (the residual, nullptr: zeros), the activation and its slope.
  const uint8_t* mask = nullptr;
  acc_t mask_slope = acc_t(0);
  bool mask_zero = false;
  const T* in2 = nullptr;
  int act = 0;
  acc_t inv_slope = acc_t(1);  // OutputGradOp's 1 / slope
};

// Rows of PersistentGradArgs::chan an op reads per channel: 1 (the saved mean) unless it
// declares kChanRows.
template <class Op, class = void>
struct chan_rows : std::integral_constant<int, 1> {};
template <class Op>
struct chan_rows<Op, std::void_t<decltype(Op::kChanRows)>>
    : std::integral_constant<int, Op::kChanRows> {};

// Ops that form dz from what the load step read (forms_dz, bn_reduce_kernels.cuh: InputGradOp,
// OutputGradOp): Op::form_dz<V>(a, offset, chan, nc, c0, dv, xv) rewrites dv (dy) into dz from
// dv, xv and what else it reads at offset, with channel c0 + j's parameters at chan[i * nc + c0
// + j]; OutputGradOp also xv (y) into x_hat / invstd (and its chan's row 0, GradOp's mean, is 0).

// dz in place of dy in the loaded vector dv (x: xv) of the V channels c0.. at offset, as the
// streaming reduction forms it (GradOp: dz = dy; MaskedGradOp: its mask_in0; InputGradOp:
// form_dz); the CTA's staged parameters chan [rows][nc].
template <class Op, int V, typename T, typename acc_t, typename index_t>
__device__ __forceinline__ void persistent_dz(const PersistentGradArgs<T, acc_t>& a,
                                              index_t offset, const acc_t* chan, int nc, int c0,
                                              Vec<T, V>& dv, Vec<T, V>& xv) {
  if constexpr (masks_in0<Op>::value) Op::template mask_in0<V>(a, offset, 0, V, dv);
  if constexpr (forms_dz<Op>::value) Op::template form_dz<V>(a, offset, chan, nc, c0, dv, xv);
}

// The last step's map (Store policy of the kernel): dx = (dz - k0) * a - (x - mean) * k3 (the
// streaming channel_grad's map, grad_dx) of the tiles' vectors at element offset off, and dz
// itself to dz (act_backward's grad_residual) unless nullptr.
template <typename T>
struct GradDxStore {
  T* dx;
  T* dz = nullptr;

  template <int V, typename acc_t, typename index_t>
  __device__ __forceinline__ void store(const Vec<T, V>& dv, const Vec<T, V>& xv,
                                        const acc_t (&cf)[V][4], index_t off) const {
    Vec<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j)
      out.v[j] = static_cast<T>(
          grad_dx(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(xv.v[j]), cf[j]));
    store_vec<T, V>(dx + off, out);
    if (dz != nullptr) store_vec<T, V>(dz + off, dv);
  }
};

// Shared memory of the kernel: the tiles [R][TX] vectors of dy, then of x, then the cross-warp
// merge [8][TX] partials, then the CTA's means / coefficients [4][TX * V].
template <typename T, typename acc_t, int V>
constexpr size_t persistent_grad_scratch_bytes(int tx) {
  return size_t{kBlockThreads / kWarpSize} * tx * sizeof(GradPartial<acc_t>) +
         size_t{4} * tx * V * sizeof(acc_t);
}

// At least one block per SM (the two tiles make it one in practice): without the minimum ptxas
// held the half V = 8 instantiations to 128 registers (two blocks per SM) and spilled.
template <typename T, int V, typename index_t, class Epilogue, class Op, class Store>
__global__ void __launch_bounds__(kBlockThreads, 1)
    persistent_rows_backward_kernel(const PersistentGradArgs<T, at::opmath_type<T>> a,
                                    const Epilogue epi, const Store out) {
  using Base = GradOp<T>;  // the sums of (dz, x): every op's Thread, Partial and merges
  using acc_t = typename Base::acc_t;
  using Partial = typename Base::Partial;
  constexpr int K = kReduceK;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  constexpr int NR = chan_rows<Op>::value;
  static_assert(NR <= 4, "the staged parameters share the coefficients' [4][TX * V]");
  const int TX = a.tx, RW = kWarpSize / TX, TY = kWarps * RW;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int tx = lane % TX, k = lane / TX;
  const int ty = warp * RW + k;
  const index_t C = a.C;
  const index_t col = static_cast<index_t>(a.col0) + static_cast<index_t>(blockIdx.x);
  const index_t cv = col * TX + tx;  // vector of channels
  const bool active = k < RW && cv < C / V;
  // Balanced contiguous ranges, as the forward: at most R = ceil(rows / gy) rows per CTA.
  index_t r0, r1;
  cta_rows(a, r0, r1);
  const index_t R = a.R;

  unsigned char* smem = dynamic_shared_memory();
  Vec<T, V>* tile_dy = reinterpret_cast<Vec<T, V>*>(smem);  // [R][TX]
  Vec<T, V>* tile_x = tile_dy + static_cast<size_t>(R) * TX;  // [R][TX]
  const size_t tile_bytes =
      (size_t{2} * static_cast<size_t>(R) * TX * sizeof(Vec<T, V>) + 15) / 16 * 16;
  Partial* sm = reinterpret_cast<Partial*>(smem + tile_bytes);  // [kWarps][TX]
  acc_t* chan = reinterpret_cast<acc_t*>(sm + kWarps * TX);      // [4][TX * V]

  // The op's parameters of each channel (the saved mean first), read once per CTA (by the lanes
  // of row 0).
  const int nc = TX * V;
  if (ty == 0 && cv < C / V) {
#pragma unroll
    for (int i = 0; i < NR; ++i) {
#pragma unroll
      for (int j = 0; j < V; ++j) chan[i * nc + tx * V + j] = a.chan[i * C + cv * V + j];
    }
  }
  __syncthreads();

  acc_t mu[V];
  typename Base::Thread st[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mu[j] = active ? chan[tx * V + j] : acc_t(0);
    st[j] = Base::init();
  }
  if (active) {
    for (index_t r = r0 + ty; r < r1; r += static_cast<index_t>(TY) * K) {
      // Rows of this group in u-steps (32-bit division, as reduce_rows_kernel: r1 - r <= R).
      const index_t left = r1 - r;
      const int cnt = left >= static_cast<index_t>(K) * TY
                          ? K
                          : (static_cast<int>(left) + TY - 1) / TY;
      Vec<T, V> dv[K], xv[K];
#pragma unroll
      for (int u = 0; u < K; ++u) {
        if (u < cnt) {
          const index_t rr = r + static_cast<index_t>(u) * TY;
          const index_t offset = rr * C + cv * V;
          dv[u] = load_vec<T, V>(a.dy + offset);
          xv[u] = load_vec<T, V>(a.x + offset);
          persistent_dz<Op, V>(a, offset, chan, nc, tx * V, dv[u], xv[u]);
          tile_dy[(rr - r0) * TX + tx] = dv[u];
          tile_x[(rr - r0) * TX + tx] = xv[u];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t d0[K], x0[K];
#pragma unroll
        for (int u = 0; u < K; ++u) {
          d0[u] = u < cnt ? static_cast<acc_t>(dv[u].v[j]) : acc_t(0);
          x0[u] = u < cnt ? static_cast<acc_t>(xv[u].v[j]) : acc_t(0);
        }
        if (cnt == K) {
          Base::push_all(st[j], d0, x0, mu[j]);
        } else {
          Base::push(st[j], d0, x0, 0, cnt, mu[j]);
        }
      }
    }
  }

  // The CTA's partial per channel: within the warp over its RW rows, then the warps in order.
  Partial p[V];
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = Base::finish(st[j]);
  write_cta_partials<Base, V, index_t>(p, sm, a.partials, TX, RW, tx, k, warp, col, C, a.gy);

  FUSEDBN_GRID_SYNC();

  // The column's channels dealt out to its gy CTAs: merge + the backward epilogue.
  merge_column_partials<Base, index_t>(a.partials, epi, TX, V, lane, warp, col, C, a.gy);

  FUSEDBN_GRID_SYNC();

  // dx from the tiles: the coefficients once per CTA through shared memory.
  acc_t cf[V][4];
  load_column_coeffs<acc_t, V, index_t>(a.coeffs, chan, cf, TX, tx, active, col, C);
  if (active) {
    for (index_t r = r0 + ty; r < r1; r += TY) {
      const index_t i = (r - r0) * TX + tx;
      out.template store<V>(tile_dy[i], tile_x[i], cf, r * C + cv * V);
    }
  }
}

// The persistent training backward over the rows dy, x [rows][C] with the op Op (GradOp:
// backward; act_backward's MaskedGradOp / InputGradOp, bn_act_backward.cu, with ex their
// ReduceExtras: the mask, the residual in2, the activation), running epi (the streaming path's
// epilogue: grad_weight / grad_bias as asked and the dx coefficients (k0, a, mean, k3) to
// coeffs) once per channel and out (GradDxStore: dx, and dz where asked) on the tiles; chan: the
// op's parameters [chan_rows<Op>][C] (the saved mean first). Returns false, having written
// nothing, when the slab does not fit or a launch is refused (the caller runs the streaming
// path, which rewrites every output).
template <typename T, class Op, class Epilogue, class Store>
bool persistent_rows_backward_op(const at::Tensor& dy, const at::Tensor& x, int64_t rows,
                                 int64_t C, const at::opmath_type<T>* chan, const Epilogue& epi,
                                 const at::Tensor& coeffs, const Store& out,
                                 const ReduceExtras& ex = ReduceExtras()) {
  using acc_t = at::opmath_type<T>;
  if (persistent_disabled()) return false;
  constexpr int VM = max_vec<T>();
  const T* dyp = dy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* in2 = ex.in2.defined() ? ex.in2.const_data_ptr<T>() : nullptr;
  const int vw = widest_vec<T>(C, {dyp, xp, out.dx, out.dz, in2});
  const bool use64 = !fits_int32(rows * C);
  const int device = x.get_device();
  bool done = false;
  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec_width<VM>(vw, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = persistent_rows_backward_kernel<T, V, index_t, Epilogue, Op, Store>;
      const int tx = rows_lanes(C / V);
      const PersistentRowsPlan plan = plan_persistent_tiles(
          kernel, rows, C / V, tx, size_t{2} * tx * V * sizeof(T),
          persistent_grad_scratch_bytes<T, acc_t, V>(tx), device);
      if (!plan.ok) return;
      at::Tensor parts = at::empty(
          {C * plan.gy * static_cast<int64_t>(sizeof(GradPartial<acc_t>))},
          x.options().dtype(at::kByte));
      PersistentGradArgs<T, acc_t> a;
      a.dy = dyp;
      a.x = xp;
      a.chan = chan;
      a.partials = reinterpret_cast<GradPartial<acc_t>*>(parts.data_ptr());
      a.coeffs = coeffs.const_data_ptr<acc_t>();
      a.rows = rows;
      a.C = C;
      a.R = plan.R;
      a.gy = plan.gy;
      a.rq = rows / plan.gy;
      a.rr = rows % plan.gy;
      a.tx = tx;
      a.mask = ex.mask;
      a.mask_slope = static_cast<acc_t>(ex.slope);
      a.mask_zero = ex.mask_zero;
      a.in2 = in2;
      a.act = ex.act;
      a.inv_slope = static_cast<acc_t>(ex.inv_slope);
      const cudaStream_t stream = current_stream();
      for (int64_t c0 = 0; c0 < plan.gx; c0 += plan.gx_slab) {
        a.col0 = c0;
        const int64_t n = std::min(plan.gx_slab, plan.gx - c0);
        const bool launched = launch_cooperative(
            kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>(plan.gy)),
            dim3(kBlockThreads), plan.smem, stream, a, epi, out);
        if (!launched) return;
      }
      done = true;
    });
  });
  return done;
}

// backward's persistent path (bn_backward.cu): GradOp, dx only; mean: the saved mean.
template <typename T, class Epilogue>
bool persistent_rows_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                              int64_t rows, int64_t C, const at::opmath_type<T>* mean,
                              const Epilogue& epi, const at::Tensor& coeffs) {
  return persistent_rows_backward_op<T, GradOp<T>>(
      dy, x, rows, C, mean, epi, coeffs, GradDxStore<T>{dx.mutable_data_ptr<T>()});
}

}  // namespace cuda
}  // namespace fusedbn
