// Element-wise batch-norm passes (see bn_elementwise.cuh for the maps and the coefficients).
//
// Contiguous layout: 1D grid of one wave (SMs x resident blocks), grid-stride over 16-byte
// vectors from the last grid iteration back to the first, U = 2 vectors per thread per iteration
// (independent loads in flight). A thread's first element index is divided by S and C once;
// afterwards its (position in plane, channel) moves back by a constant step per iteration,
// precomputed on the host. Inside a vector the channel changes where the plane ends (at most once
// when S >= V), and the coefficients are re-read then. Inputs that start inside a 16-byte line
// at the same position (a sliced x, or dy and x sliced alike) peel the elements before the first
// boundary and keep 16-byte vectors; inputs at different positions fall back to scalars. An
// output that sits differently than the inputs (a fresh output of a sliced input) is stored
// element-wise. Coefficients are read through the read-only cache (C values, shared by all
// threads).
//
// channels_last: 2D blocks (TX threads along C, one vector of V channels each; TY rows),
// coefficients held in registers, U = 4 rows in flight per thread, grid.y striding over rows
// backwards. V is the widest vector that tiles C and is aligned in the inputs (16 bytes, else
// 8, 4, ... bytes: C = 6 floats gets 8-byte vectors); an output not aligned to it is stored
// element-wise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "bn_channel_fns.cuh"
#include "bn_elementwise.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {
namespace {

template <typename T, typename acc_t>
struct EwArgs {
  T* out;
  const T* in0;
  const T* in1;
  const acc_t* params;  // [kParams][C]
  int64_t C, S, numel;
  int64_t step_pos, step_ch;  // contiguous: advance of a thread's position per grid iteration
  int64_t head;      // contiguous: elements before the inputs' first 16-byte boundary (peeled)
  int32_t out_vec;   // 1: out is aligned like the inputs' vectors (vector stores), 0: element-wise
};

template <class Fn, typename acc_t, typename index_t>
__device__ __forceinline__ void load_coeffs(const acc_t* params, index_t C, index_t c,
                                            acc_t (&p)[Fn::kParams]) {
#pragma unroll
  for (int k = 0; k < Fn::kParams; ++k) p[k] = __ldg(params + k * C + c);
}

// out[e] = Fn(in0[e], in1[e]) for one element e of the contiguous layout.
template <class Fn, typename T, typename acc_t, typename index_t>
__device__ __forceinline__ void map_one(const EwArgs<T, acc_t>& a, index_t e) {
  const index_t C = a.C, S = a.S;
  acc_t p[Fn::kParams];
  load_coeffs<Fn>(a.params, C, (e / S) % C, p);
  acc_t b = acc_t(0);
  if constexpr (Fn::kInputs == 2) b = static_cast<acc_t>(a.in1[e]);
  a.out[e] = static_cast<T>(Fn::apply(static_cast<acc_t>(a.in0[e]), b, p));
}

constexpr int kContigU = 2;
constexpr int kRowsU = 4;

// Both kernels walk the tensor backwards, to start where the statistics pass before them
// (bn_reduce_kernels.cuh) ended: its grid is sized to one wave (all CTAs resident at once) and
// its splits interleave, so its CTAs move through the tensor as one front and the lines still in
// L2 when it finishes are the tensor's last ones. Per pass-1 shape:
//  * planes (contiguous, large planes): CTAs (channel, segment) x splits of the samples, split y
//    taking samples y, y + splits, ...: pass 1 ends with every channel of the last samples, i.e.
//    the last elements of the flat (N, C, S) tensor, where ew_contig_kernel's backward walk
//    starts;
//  * packed (contiguous, small planes): CTAs (group of channels) x interleaved samples: the same,
//    every channel group of the last samples;
//  * rows (channels_last, (N, C)): CTAs (channel vectors) x splits of the chunks of rows, split y
//    taking chunks y, y + splits, ...: pass 1 ends at the last rows, where ew_rows_kernel's
//    backward walk (by chunks of rows) starts.
// A forward walk would evict those lines before reaching them; backwards, up to L2 / |x| of this
// pass's reads hit. When pass 1's grid exceeds a wave (one split: more channel CTAs than fit at
// once, e.g. planes with C * segments > SMs x blocks per SM), its CTAs run in channel order and it
// ends at the highest channels of every sample instead: the backward walk reaches the last
// sample's part of them first, and costs nothing elsewhere. forward_eval and the eval backward
// (channel_affine without a statistics pass) have no pass 1: the order is immaterial there.

// Contiguous: elements [0, head) and the tail after the last whole vector element-wise; the
// vectors in between start at element head, aligned in the inputs (which share their position in
// a 16-byte line); the output is stored by vectors too when it shares that position, else element
// by element (coalesced across the warp all the same).
template <class Fn, typename T, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    ew_contig_kernel(const EwArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int U = kContigU;
  const index_t S = a.S, C = a.C, numel = a.numel, head = a.head;
  const index_t nvec = (numel - head) / V;
  const index_t stride = static_cast<index_t>(gridDim.x) * kBlockThreads * U;
  const index_t q_first = static_cast<index_t>(blockIdx.x) * kBlockThreads * U + threadIdx.x;
  if (nvec > 0) {
    // The grid's last iteration first, then backwards.
    index_t q0 = q_first + (nvec - 1) / stride * stride;
    index_t pos[U], ch[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t e = head + (q0 + u * kBlockThreads) * V;
      const index_t plane = e / S;
      pos[u] = e - plane * S;
      ch[u] = plane % C;
    }
    const index_t step_pos = a.step_pos, step_ch = a.step_ch;
    const bool out_vec = a.out_vec != 0;

    for (; q0 >= q_first; q0 -= stride) {
      Vec<T, V> x0[U], x1[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const index_t q = q0 + u * kBlockThreads;
        if (q < nvec) {
          x0[u] = load_vec<T, V>(a.in0 + head + q * V);
          if constexpr (Fn::kInputs == 2) x1[u] = load_vec<T, V>(a.in1 + head + q * V);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const index_t q = q0 + u * kBlockThreads;
        if (q < nvec) {
          acc_t p[Fn::kParams];
          index_t pp = pos[u], cc = ch[u];
          load_coeffs<Fn>(a.params, C, cc, p);
          Vec<T, V> y;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (j > 0 && ++pp == S) {  // the vector crosses into the next plane
              pp = 0;
              cc = cc + 1 == C ? 0 : cc + 1;
              load_coeffs<Fn>(a.params, C, cc, p);
            }
            acc_t b = acc_t(0);
            if constexpr (Fn::kInputs == 2) b = static_cast<acc_t>(x1[u].v[j]);
            y.v[j] = static_cast<T>(Fn::apply(static_cast<acc_t>(x0[u].v[j]), b, p));
          }
          store_vec_or_elems<T, V>(a.out + head + q * V, y, out_vec);
        }
        // One grid iteration back: (pos, ch) -= (step_pos, step_ch), borrowing.
        pos[u] -= step_pos;
        ch[u] -= step_ch;
        if (pos[u] < 0) {
          pos[u] += S;
          --ch[u];
        }
        if (ch[u] < 0) ch[u] += C;
      }
    }
  }

  // The peeled head and the last (numel - head) % V elements: fewer than 2 V, block 0.
  if constexpr (V > 1) {
    if (blockIdx.x == 0) {
      const index_t t = threadIdx.x;
      const index_t e = t < head ? t : head + nvec * V + (t - head);
      if (e < numel) map_one<Fn, T, acc_t, index_t>(a, e);
    }
  }
}

// channels_last: threads along C (one vector of V channels each), rows in chunks of TY * U; block
// y takes chunks y, y + gridDim.y, ..., walked from the last.
template <class Fn, typename T, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    ew_rows_kernel(const EwArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int U = kRowsU;
  const index_t C = a.C;
  const index_t cv = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  const index_t rows = a.numel / C;
  const index_t TY = blockDim.y;
  const index_t base0 = static_cast<index_t>(blockIdx.y) * TY * U;
  if (base0 >= rows) return;
  acc_t p[V][Fn::kParams];
#pragma unroll
  for (int j = 0; j < V; ++j) load_coeffs<Fn>(a.params, C, cv * V + j, p[j]);
  const index_t stride = static_cast<index_t>(gridDim.y) * TY * U;
  const bool out_vec = a.out_vec != 0;
  for (index_t b = base0 + (rows - 1 - base0) / stride * stride; b >= base0; b -= stride) {
    const index_t r = b + threadIdx.y;
    Vec<T, V> x0[U], x1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t rr = r + u * TY;
      if (rr < rows) {
        x0[u] = load_vec<T, V>(a.in0 + rr * C + cv * V);
        if constexpr (Fn::kInputs == 2) x1[u] = load_vec<T, V>(a.in1 + rr * C + cv * V);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t rr = r + u * TY;
      if (rr < rows) {
        Vec<T, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc_t bv = acc_t(0);
          if constexpr (Fn::kInputs == 2) bv = static_cast<acc_t>(x1[u].v[j]);
          y.v[j] = static_cast<T>(Fn::apply(static_cast<acc_t>(x0[u].v[j]), bv, p[j]));
        }
        store_vec_or_elems<T, V>(a.out + rr * C + cv * V, y, out_vec);
      }
    }
  }
}

// Launches Fn over the canonical layout: out = Fn(in0[, in1]).
template <template <typename> class FnT, typename T>
void launch_channel_map(const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& out,
                        const Geometry& g, const at::Tensor& params) {
  using acc_t = at::opmath_type<T>;
  using Fn = FnT<acc_t>;
  constexpr int VM = max_vec<T>();
  EwArgs<T, acc_t> a{};
  a.out = out.mutable_data_ptr<T>();
  a.in0 = in0.const_data_ptr<T>();
  a.in1 = Fn::kInputs == 2 ? in1.const_data_ptr<T>() : nullptr;
  a.params = params.const_data_ptr<acc_t>();
  a.C = g.C;
  a.S = g.S;
  a.numel = g.numel();
  const bool use64 = !fits_int32(a.numel);
  const int64_t sms = sm_count(in0.get_device());
  const cudaStream_t stream = current_stream();

  if (g.layout == Layout::kChannelsLast) {
    // The widest vector of channels that tiles C and is aligned in the inputs; the output is
    // stored element-wise when it is not aligned to it.
    const int vw = widest_vec<T>(g.C, {a.in0, a.in1});
    a.out_vec = aligned_to(a.out, vw * static_cast<int>(sizeof(T))) ? 1 : 0;
    dispatch_index(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec_width<VM>(vw, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        auto kernel = ew_rows_kernel<Fn, T, V, index_t>;
        const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
        const int64_t cvecs = g.C / V;
        const int tx = static_cast<int>(std::min<int64_t>(cvecs, kWarpSize));
        const int ty = kBlockThreads / tx;
        const int64_t gx = ceil_div<int64_t>(cvecs, tx);
        int64_t gy = ceil_div<int64_t>(g.rows(), int64_t{ty} * kRowsU);
        gy = std::max<int64_t>(1, std::min({gy, sms * bps / gx, int64_t{65535}}));
        launch_kernel(kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                      dim3(tx, ty), 0, stream, a);
      });
    });
    return;
  }

  // Contiguous: inputs that share their position in a 16-byte line peel the elements before the
  // first boundary and run 16-byte vectors over the rest (stored as vectors when the output sits
  // alike, else element-wise); inputs at different positions: scalar.
  const int mis = common_misalignment<T>({a.in0, a.in1});
  const bool vec = mis >= 0;
  a.head = vec ? std::min<int64_t>((VM - mis) % VM, a.numel) : 0;
  a.out_vec = vec && misalignment(a.out, static_cast<int>(sizeof(T))) == mis ? 1 : 0;
  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec<VM>(vec, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = ew_contig_kernel<Fn, T, V, index_t>;
      const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
      const int64_t nvec = (a.numel - a.head) / V;
      const int64_t blocks = std::max<int64_t>(
          1, std::min(ceil_div<int64_t>(nvec, int64_t{kBlockThreads} * kContigU), sms * bps));
      const int64_t step = blocks * kBlockThreads * kContigU * V;  // elements per grid iteration
      a.step_pos = step % g.S;
      a.step_ch = (step / g.S) % g.C;
      launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream, a);
    });
  });
}

}  // namespace

void channel_affine(const at::Tensor& in, const at::Tensor& out, const Geometry& g,
                    const at::Tensor& params) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(),
                                  "fusedbn_channel_affine", [&] {
    launch_channel_map<AffineFn, scalar_t>(in, at::Tensor(), out, g, params);
  });
}

void channel_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& dx,
                  const Geometry& g, const at::Tensor& params) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_channel_grad", [&] {
    launch_channel_map<GradFn, scalar_t>(dy, x, dx, g, params);
  });
}

}  // namespace cuda
}  // namespace fusedbn
