// The persistent single-read training forward (issue 15) for the rows layout (channels_last and
// (N, C)): one cooperative launch per slab of channel columns, every CTA of it co-resident, each
// holding its tile of x in shared memory from the one read of x to the write of y:
//   1. the CTA loads its balanced range of rows (cta_rows) of its TX * V channels (TX lanes
//      along C, one V-channel vector each, 32 / TX rows per warp, as the streaming rows kernel of
//      bn_reduce_kernels.cuh lays them out) into shared memory, growing per-thread WelfordOp
//      states on the way (the same shift -- the channel's first value, read once per CTA --, the
//      same groups of K rows, push_all / push, finish), merges them within the warp by the same
//      shuffle tree and across the warps in warp order, and writes one partial per channel:
//      partials[c][y];
//   2. grid barrier;
//   3. the channels of the slab are dealt out to its CTAs (channel j of a column to CTA
//      j % gy of that column); a warp per channel merges its gy partials as the streaming pass 2
//      (merge_partials_kernel) does with a 32-thread group -- lane l merges partials l, l + 32,
//      ... in order, then the warp's shuffle tree --, a fixed order whatever the order the CTAs
//      ran in, and runs the streaming path's epilogue (TrainStatsEpilogue: mean, invstd, var and
//      the split-mean coefficients hi, lo, s, b);
//   4. grid barrier;
//   5. each CTA reads the coefficients of its channels (once per CTA, through shared memory) and
//      hands each vector of the tile it still holds to the Store policy: AffineStore
//      (forward_train) normalizes it, y = ((x - hi) - lo) * s + b as the streaming channel_affine, and writes y;
//      act_forward_train's store (bn_act_forward.cu) adds the residual (read there), applies the
//      activation and writes y and the packed sign mask (store_mask_bits, bn_act_ew.cuh).
// Global traffic: x read once (+ one shift value per channel and CTA), y written once, partials
// C * gy states written and read, coefficients 4 C written and 4 C per CTA column read (+ what
// the Store reads and writes besides y: the act store's residual once, mask once).
// Numerics: the per-thread Welford, the merges and the normalize are the streaming path's
// (WelfordOp of bn_reduce_ops.cuh, the same trees); only the partition of the rows into partials
// differs (contiguous ranges of R rows per CTA instead of interleaved chunks), which changes the
// rounding, not the error bound (Chan's merge of exact states in a tree either way).
// The planner (plan_persistent_rows) sizes the tile from the kernel's dynamic shared memory and
// the occupancy API; a slab that does not fit, or a cooperative launch that is refused, leaves
// the streaming path to the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "bn_reduce.cuh"
#include "bn_reduce_ops.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {

template <typename T, typename acc_t>
struct PersistentRowsArgs {
  const T* x = nullptr;
  fusedbn::WelfordState<acc_t>* partials = nullptr;  // [C][gy]
  const acc_t* coeffs = nullptr;                     // [4][C], written by the epilogue
  int64_t rows = 0, C = 0;
  int64_t col0 = 0;  // the slab's first CTA column (TX channel vectors each)
  int64_t R = 0;     // rows per CTA, at most (the tile's capacity)
  int64_t gy = 1;    // CTAs per column = partials per channel
  int64_t rq = 0, rr = 0;  // rows / gy, rows % gy (cta_rows)
  int32_t tx = 32;   // lanes along channels
};

// Shared memory of the kernel: the tile [R][TX] vectors, then the cross-warp merge [8][TX]
// partials, then the CTA's shifts / coefficients [4][TX * V].
template <typename T, typename acc_t, int V>
constexpr size_t persistent_scratch_bytes(int tx) {
  return size_t{kBlockThreads / kWarpSize} * tx * sizeof(fusedbn::WelfordState<acc_t>) +
         size_t{4} * tx * V * sizeof(acc_t);
}

// CTA row y's rows [r0, r1) of a persistent rows kernel's arguments a: balanced contiguous
// ranges (the first rows % gy CTAs take one more) from the host's rq = rows / gy, rr = rows % gy,
// so that the kernel has no 64-bit division (a subroutine call, around which ptxas spilled).
template <typename index_t, class Args>
__device__ __forceinline__ void cta_rows(const Args& a, index_t& r0, index_t& r1) {
  const int64_t y = blockIdx.y;
  r0 = static_cast<index_t>(y * a.rq + (y < a.rr ? y : a.rr));
  r1 = r0 + static_cast<index_t>(a.rq + (y < a.rr ? 1 : 0));
}

// ---- the phases both persistent rows kernels share (this forward, bn_persistent_backward.cuh) ---
// The thread mapping: TX lanes along the channels (one V-channel vector each), RW = 32 / TX rows
// per warp; lane = tx + k * TX of warp `warp`.

// The CTA's partial per channel of its column: p[j] (lane's vector slot j) merged within the warp
// over its RW rows by the shuffle tree, then across the warps in warp order through sm
// ([kWarps][TX] partials of shared memory, one slot j at a time), written to
// partials[c][blockIdx.y] for the column's channels c < C.
template <class Op, int V, typename index_t>
__device__ __forceinline__ void write_cta_partials(typename Op::Partial (&p)[V],
                                                   typename Op::Partial* sm,
                                                   typename Op::Partial* partials, int TX,
                                                   int RW, int tx, int k, int warp, index_t col,
                                                   index_t C, int64_t gy) {
  using Partial = typename Op::Partial;
  constexpr int kWarps = kBlockThreads / kWarpSize;
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
  // One vector slot j at a time through the [kWarps][TX] partials (V rounds: a small scratch
  // next to the tile), merged in warp order by the first TX threads.
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (k == 0) sm[warp * TX + tx] = p[j];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < TX) {
      const int x = static_cast<int>(threadIdx.x);
      const index_t cw = col * TX + x;
      if (cw < C / V) {
        Partial acc = sm[x];
        for (int w = 1; w < kWarps; ++w) Op::merge(acc, sm[w * TX + x]);
        partials[(static_cast<int64_t>(cw) * V + j) * gy + blockIdx.y] = acc;
      }
    }
    __syncthreads();
  }
}

// After the grid barrier: the column's TX * V channels dealt out to its gy CTAs (channel q to
// CTA q % gy), a warp per channel merging its gy partials in a fixed order (lane l: partials
// l, l + 32, ..., then the warp's shuffle tree) and running epi(c, merged) once.
template <class Op, typename index_t, class Epilogue>
__device__ __forceinline__ void merge_column_partials(const typename Op::Partial* partials,
                                                      const Epilogue& epi, int TX, int V,
                                                      int lane, int warp, index_t col, index_t C,
                                                      int64_t gy) {
  using Partial = typename Op::Partial;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const index_t g = static_cast<index_t>(gy);
  const index_t nch = min(static_cast<index_t>(TX) * V, C - col * TX * V);
  for (index_t q = static_cast<index_t>(blockIdx.y) + static_cast<index_t>(warp) * g; q < nch;
       q += static_cast<index_t>(kWarps) * g) {
    const int64_t c = static_cast<int64_t>(col) * TX * V + q;
    Partial acc = Op::empty();
    for (int64_t i = lane; i < gy; i += kWarpSize) Op::merge(acc, partials[c * gy + i]);
    acc = warp_reduce<Op>(acc);
    if (lane == 0) epi(c, acc);
  }
}

// After the second grid barrier: the 4 per-channel coefficients [4][C] of the column's TX * V
// channels read once per CTA through chan ([4][TX * V] of shared memory), then cf[j][k] = the
// k-th coefficient of the lane's channel tx * V + j (for active lanes).
template <typename acc_t, int V, typename index_t>
__device__ __forceinline__ void load_column_coeffs(const acc_t* coeffs, acc_t* chan,
                                                   acc_t (&cf)[V][4], int TX, int tx, bool active,
                                                   index_t col, index_t C) {
  const int nc = TX * V;
  for (int i = threadIdx.x; i < 4 * nc; i += kBlockThreads) {
    const int kk = i / nc, q = i % nc;
    const index_t c = col * nc + q;
    if (c < C) chan[i] = coeffs[static_cast<int64_t>(kk) * C + c];
  }
  __syncthreads();
  if (!active) return;
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) cf[j][kk] = chan[kk * nc + tx * V + j];
  }
}

// The forward's last step, the plain one: y = ((x - hi) - lo) * s + b (the streaming
// channel_affine's map) of the vector xv of V channels at element offset off. A Store policy
// provides store<V>(xv, cf, off, lane) (lane: the thread's lane in its warp; every lane of a row
// of the warp calls it for the same rows), ptrs() (the pointers the vector width must suit) and
// accepts(V, tx, C) (false: the streaming path).
template <typename T>
struct AffineStore {
  T* y;

  std::array<const void*, 2> ptrs() const { return {y, nullptr}; }
  bool accepts(int /*V*/, int /*tx*/, int64_t /*C*/) const { return true; }
  template <int V, typename acc_t, typename index_t>
  __device__ __forceinline__ void store(const Vec<T, V>& xv, const acc_t (&cf)[V][4], index_t off,
                                        int /*lane*/) const {
    Vec<T, V> yv;
#pragma unroll
    for (int j = 0; j < V; ++j)
      yv.v[j] = static_cast<T>(affine_split(static_cast<acc_t>(xv.v[j]), cf[j]));
    store_vec<T, V>(y + off, yv);
  }
};

// At least one block per SM (the tile makes it one or two in practice): without the minimum
// ptxas held some instantiations to 48-64 registers (more blocks per SM than the tile allows)
// and spilled.
template <typename T, int V, typename index_t, class Epilogue, class Store>
__global__ void __launch_bounds__(kBlockThreads, 1)
    persistent_rows_kernel(const PersistentRowsArgs<T, at::opmath_type<T>> a, const Epilogue epi,
                           const Store out) {
  using Op = WelfordOp<T>;
  using acc_t = typename Op::acc_t;
  using Partial = typename Op::Partial;
  constexpr int K = kReduceK;
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const int TX = a.tx, RW = kWarpSize / TX, TY = kWarps * RW;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int tx = lane % TX, k = lane / TX;
  const int ty = warp * RW + k;
  const index_t C = a.C;
  const index_t col = static_cast<index_t>(a.col0) + static_cast<index_t>(blockIdx.x);
  const index_t cv = col * TX + tx;  // vector of channels
  const bool active = k < RW && cv < C / V;
  // Balanced contiguous ranges (cta_rows): at most R = ceil(rows / gy) rows per CTA, at least
  // floor(rows / gy).
  index_t r0, r1;
  cta_rows(a, r0, r1);
  const index_t R = a.R;

  unsigned char* smem = dynamic_shared_memory();
  Vec<T, V>* tile = reinterpret_cast<Vec<T, V>*>(smem);  // [R][TX]
  const size_t tile_bytes =
      (static_cast<size_t>(R) * TX * sizeof(Vec<T, V>) + 15) / 16 * 16;
  Partial* sm = reinterpret_cast<Partial*>(smem + tile_bytes);  // [kWarps][TX]
  acc_t* chan = reinterpret_cast<acc_t*>(sm + kWarps * TX);      // [4][TX * V]

  // The shift of each channel, read once per CTA (by the lanes of row 0).
  if (ty == 0 && cv < C / V) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      chan[tx * V + j] = ChannelShift<T>{a.x, 1}.template load<acc_t>(cv * V + j);
  }
  __syncthreads();

  typename Op::Param par[V];
  typename Op::Thread st[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    par[j] = typename Op::Param{active ? chan[tx * V + j] : acc_t(0)};
    st[j] = Op::init();
  }
  if (active) {
    for (index_t r = r0 + ty; r < r1; r += static_cast<index_t>(TY) * K) {
      const int cnt = static_cast<int>(min(static_cast<index_t>(K), (r1 - r + TY - 1) / TY));
      Vec<T, V> v[K];
#pragma unroll
      for (int u = 0; u < K; ++u) {
        if (u < cnt) {
          const index_t rr = r + static_cast<index_t>(u) * TY;
          v[u] = load_vec<T, V>(a.x + rr * C + cv * V);
          tile[(rr - r0) * TX + tx] = v[u];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t x0[K];
#pragma unroll
        for (int u = 0; u < K; ++u) x0[u] = u < cnt ? static_cast<acc_t>(v[u].v[j]) : acc_t(0);
        if (cnt == K) {
          Op::push_all(st[j], x0, x0, par[j]);
        } else {
          Op::push(st[j], x0, x0, 0, cnt, par[j]);
        }
      }
    }
  }

  // The CTA's partial per channel: within the warp over its RW rows, then the warps in order.
  Partial p[V];
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = Op::finish(st[j]);
  write_cta_partials<Op, V, index_t>(p, sm, a.partials, TX, RW, tx, k, warp, col, C, a.gy);

  FUSEDBN_GRID_SYNC();

  merge_column_partials<Op, index_t>(a.partials, epi, TX, V, lane, warp, col, C, a.gy);

  FUSEDBN_GRID_SYNC();

  // Normalize the tile (the Store's map): the coefficients once per CTA through shared memory.
  acc_t cf[V][4];
  load_column_coeffs<acc_t, V, index_t>(a.coeffs, chan, cf, TX, tx, active, col, C);
  if (active) {
    for (index_t r = r0 + ty; r < r1; r += TY)
      out.template store<V>(tile[(r - r0) * TX + tx], cf, r * C + cv * V, lane);
  }
}

// The plan of one persistent forward over rows: V, TX, the CTA columns per slab launch, the CTAs
// per column (gy), rows per CTA (R) and the dynamic shared memory; ok = false: the streaming path.
struct PersistentRowsPlan {
  bool ok = false;
  int64_t gx = 0;       // CTA columns in all
  int64_t gx_slab = 0;  // CTA columns per cooperative launch
  int64_t gy = 0, R = 0;
  size_t smem = 0;
};

// Tile capacity: a CTA holds R rows of row_bytes each (the forward: TX * V channels of x,
// R * TX * V * sizeof(T) bytes; the backward, bn_persistent_backward.cuh: those of dy and x, twice
// that) of dynamic shared memory next to the kernel's scratch (scratch bytes). Every CTA gets at
// least min_rows = 8 * TY rows (8 vectors per thread, the streaming reductions' rule of work per
// block) or the whole column. The candidate budgets run from small to the device's opt-in
// maximum; for each, the occupancy API says how many CTAs can be co-resident (SMs x blocks per
// SM); the first budget whose tile holds min_rows rows and at which every column fits in one
// launch (gx * ceil(rows / R_max) co-resident CTAs) wins -- the least shared memory, the most
// CTAs per SM --, else the largest at which a slab of at least one column fits (slabs of as many
// columns as fit, one launch each). Then the rows are spread over as many CTAs per column as the
// slab leaves room for, down to min_rows each.
template <typename Kernel>
PersistentRowsPlan plan_persistent_tiles(Kernel kernel, int64_t rows, int64_t cvecs, int tx,
                                         size_t row_bytes, size_t scratch_bytes, int device) {
  PersistentRowsPlan plan;
  plan.gx = ceil_div<int64_t>(cvecs, tx);
  const int rw = kWarpSize / tx;
  const int64_t ty = int64_t{kBlockThreads / kWarpSize} * rw;
  const int64_t min_rows = std::min<int64_t>(rows, 8 * ty);
  const size_t scratch = scratch_bytes + 16;  // + the tile's rounding to 16 bytes
  const size_t optin = max_dynamic_shared_memory(device);
  if (optin <= scratch + row_bytes * min_rows) return plan;
  set_max_dynamic_shared_memory(kernel, static_cast<int>(optin));
  const size_t budgets[] = {24 << 10, 48 << 10, 96 << 10, 160 << 10, optin};
  int64_t best_gy = 0, best_slab = 0;
  size_t best_smem = 0;
  for (size_t b : budgets) {
    if (b > optin || b < scratch + row_bytes * min_rows) continue;
    const int64_t r_max = static_cast<int64_t>((b - scratch) / row_bytes);
    const int64_t cap = cooperative_capacity(kernel, kBlockThreads, b, device);
    const int64_t gy_min = ceil_div<int64_t>(rows, r_max);
    if (gy_min > std::min<int64_t>(cap, 65535)) continue;
    best_gy = gy_min;
    best_slab = std::min<int64_t>(plan.gx, cap / gy_min);
    best_smem = b;
    if (best_slab == plan.gx) break;
  }
  if (best_slab == 0) return plan;
  const int64_t cap = cooperative_capacity(kernel, kBlockThreads, best_smem, device);
  plan.gx_slab = best_slab;
  const int64_t gy = std::max<int64_t>(
      best_gy, std::min<int64_t>({cap / best_slab, rows / min_rows, int64_t{65535}}));
  plan.gy = gy;
  plan.R = ceil_div<int64_t>(rows, gy);  // <= r_max of the budget, as gy >= its gy_min
  plan.smem = (size_t(plan.R) * row_bytes + 15) / 16 * 16 + scratch_bytes;
  plan.ok = plan.smem <= best_smem;
  return plan;
}

// The forward's plan: a tile of x.
template <typename T, int V, typename Kernel>
PersistentRowsPlan plan_persistent_rows(Kernel kernel, int64_t rows, int64_t C, int tx,
                                        int device) {
  using acc_t = at::opmath_type<T>;
  return plan_persistent_tiles(kernel, rows, C / V, tx, size_t(tx) * V * sizeof(T),
                               persistent_scratch_bytes<T, acc_t, V>(tx), device);
}

// The persistent forward over the rows x [rows][C], running epi (the streaming path's
// TrainStatsEpilogue) once per channel and out (AffineStore: y; act_forward_train's store) on
// every vector of the tiles; coeffs is what epi writes the coefficients to. Returns false, having
// written nothing, when the Store does not accept the layout, the slab does not fit or a launch is
// refused (the caller runs the streaming path).
template <typename T, class Epilogue, class Store>
bool persistent_rows_forward(const at::Tensor& x, int64_t rows, int64_t C, const Epilogue& epi,
                             const at::Tensor& coeffs, const Store& out) {
  using acc_t = at::opmath_type<T>;
  if (persistent_disabled()) return false;
  constexpr int VM = max_vec<T>();
  const T* xp = x.const_data_ptr<T>();
  int vw = widest_vec<T>(C, {xp});
  for (const void* p : out.ptrs()) vw = std::min(vw, widest_vec<T>(C, {p}));
  const bool use64 = !fits_int32(rows * C);
  const int device = x.get_device();
  bool done = false;
  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec_width<VM>(vw, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = persistent_rows_kernel<T, V, index_t, Epilogue, Store>;
      const int tx = rows_lanes(C / V);
      if (!out.accepts(V, tx, C)) return;
      const PersistentRowsPlan plan = plan_persistent_rows<T, V>(kernel, rows, C, tx, device);
      if (!plan.ok) return;
      at::Tensor parts = at::empty(
          {C * plan.gy * static_cast<int64_t>(sizeof(fusedbn::WelfordState<acc_t>))},
          x.options().dtype(at::kByte));
      PersistentRowsArgs<T, acc_t> a;
      a.x = xp;
      a.partials = reinterpret_cast<fusedbn::WelfordState<acc_t>*>(parts.data_ptr());
      a.coeffs = coeffs.const_data_ptr<acc_t>();
      a.rows = rows;
      a.C = C;
      a.R = plan.R;
      a.gy = plan.gy;
      a.rq = rows / plan.gy;
      a.rr = rows % plan.gy;
      a.tx = tx;
      const cudaStream_t stream = current_stream();
      for (int64_t c0 = 0; c0 < plan.gx; c0 += plan.gx_slab) {
        a.col0 = c0;
        const int64_t n = std::min(plan.gx_slab, plan.gx - c0);
        const bool launched = launch_cooperative(
            kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>(plan.gy)),
            dim3(kBlockThreads), plan.smem, stream, a, epi, out);
        // Refused (an occupancy the query did not foresee): the streaming path the caller runs
        // then rewrites every output, the slabs already done included.
        if (!launched) return;
      }
      done = true;
    });
  });
  return done;
}

}  // namespace cuda
}  // namespace fusedbn
