// Element-wise batch-norm passes (see bn_elementwise.cuh for the maps and the coefficients).
//
// Contiguous layout: 1D grid of one wave (SMs x resident blocks), grid-stride over 16-byte
// vectors, U = 2 vectors per thread per iteration (independent loads in flight). A thread's
// first element index is divided by S and C once; afterwards its (position in plane, channel)
// advances by a constant step per iteration, precomputed on the host. Inside a vector the channel
// changes where the plane ends (at most once when S >= V), and the coefficients are re-read then.
// Coefficients are read through the read-only cache (C values, shared by all threads).
//
// channels_last: 2D blocks (TX threads along C, one vector of V channels each; TY rows),
// coefficients held in registers, U = 4 rows in flight per thread, grid.y striding over rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "bn_elementwise.cuh"
#include "bn_utils.cuh"

namespace fusedbn {
namespace cuda {
namespace {

template <typename acc_t>
struct AffineFn {
  static constexpr int kInputs = 1;
  static constexpr int kParams = kAffineParams;
  __device__ __forceinline__ static acc_t apply(acc_t x, acc_t, const acc_t (&p)[kParams]) {
    return ((x - p[0]) - p[1]) * p[2] + p[3];
  }
};

template <typename acc_t>
struct GradFn {
  static constexpr int kInputs = 2;
  static constexpr int kParams = kGradParams;
  __device__ __forceinline__ static acc_t apply(acc_t dy, acc_t x, const acc_t (&p)[kParams]) {
    return (dy - p[0]) * p[1] - (x - p[2]) * p[3];
  }
};

template <typename T, typename acc_t>
struct EwArgs {
  T* out;
  const T* in0;
  const T* in1;
  const acc_t* params;  // [kParams][C]
  int64_t C, S, numel;
  int64_t step_pos, step_ch;  // contiguous: advance of a thread's position per grid iteration
};

template <class Fn, typename acc_t, typename index_t>
__device__ __forceinline__ void load_coeffs(const acc_t* params, index_t C, index_t c,
                                            acc_t (&p)[Fn::kParams]) {
#pragma unroll
  for (int k = 0; k < Fn::kParams; ++k) p[k] = __ldg(params + k * C + c);
}

constexpr int kContigU = 2;
constexpr int kRowsU = 4;

template <class Fn, typename T, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    ew_contig_kernel(const EwArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int U = kContigU;
  const index_t S = a.S, C = a.C, numel = a.numel;
  const index_t nvec = numel / V;
  const index_t stride = static_cast<index_t>(gridDim.x) * kBlockThreads * U;
  index_t q0 = static_cast<index_t>(blockIdx.x) * kBlockThreads * U + threadIdx.x;
  index_t pos[U], ch[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const index_t e = (q0 + u * kBlockThreads) * V;
    const index_t plane = e / S;
    pos[u] = e - plane * S;
    ch[u] = plane % C;
  }
  const index_t step_pos = a.step_pos, step_ch = a.step_ch;

  for (; q0 < nvec; q0 += stride) {
    Vec<T, V> x0[U], x1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t q = q0 + u * kBlockThreads;
      if (q < nvec) {
        x0[u] = load_vec<T, V>(a.in0 + q * V);
        if constexpr (Fn::kInputs == 2) x1[u] = load_vec<T, V>(a.in1 + q * V);
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
        store_vec<T, V>(a.out + q * V, y);
      }
      pos[u] += step_pos;
      ch[u] += step_ch;
      if (pos[u] >= S) {
        pos[u] -= S;
        ++ch[u];
      }
      if (ch[u] >= C) ch[u] -= C;
    }
  }

  if constexpr (V > 1) {  // the last numel % V elements
    const index_t e = nvec * V + threadIdx.x;
    if (blockIdx.x == 0 && e < numel) {
      acc_t p[Fn::kParams];
      load_coeffs<Fn>(a.params, C, (e / S) % C, p);
      acc_t b = acc_t(0);
      if constexpr (Fn::kInputs == 2) b = static_cast<acc_t>(a.in1[e]);
      a.out[e] = static_cast<T>(Fn::apply(static_cast<acc_t>(a.in0[e]), b, p));
    }
  }
}

template <class Fn, typename T, int V, typename index_t>
__global__ void __launch_bounds__(kBlockThreads)
    ew_rows_kernel(const EwArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int U = kRowsU;
  const index_t C = a.C;
  const index_t cv = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= C / V) return;
  acc_t p[V][Fn::kParams];
#pragma unroll
  for (int j = 0; j < V; ++j) load_coeffs<Fn>(a.params, C, cv * V + j, p[j]);
  const index_t rows = a.numel / C;
  const index_t TY = blockDim.y;
  const index_t stride = static_cast<index_t>(gridDim.y) * TY * U;
  for (index_t r = static_cast<index_t>(blockIdx.y) * TY * U + threadIdx.y; r < rows; r += stride) {
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
          acc_t b = acc_t(0);
          if constexpr (Fn::kInputs == 2) b = static_cast<acc_t>(x1[u].v[j]);
          y.v[j] = static_cast<T>(Fn::apply(static_cast<acc_t>(x0[u].v[j]), b, p[j]));
        }
        store_vec<T, V>(a.out + rr * C + cv * V, y);
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
  const bool aligned = aligned_to(a.out, 16) && aligned_to(a.in0, 16) &&
                       (a.in1 == nullptr || aligned_to(a.in1, 16));
  const bool use64 = !fits_int32(a.numel);
  const int64_t sms = sm_count(in0.get_device());
  const cudaStream_t stream = current_stream();

  if (g.layout == Layout::kChannelsLast) {
    dispatch_index(use64, [&](auto itag) {
      using index_t = typename decltype(itag)::type;
      dispatch_vec<VM>(aligned && g.C % VM == 0, [&](auto vtag) {
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

  dispatch_index(use64, [&](auto itag) {
    using index_t = typename decltype(itag)::type;
    dispatch_vec<VM>(aligned, [&](auto vtag) {
      constexpr int V = decltype(vtag)::value;
      auto kernel = ew_contig_kernel<Fn, T, V, index_t>;
      const int bps = blocks_per_sm(kernel, kBlockThreads, 0);
      const int64_t nvec = a.numel / V;
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
