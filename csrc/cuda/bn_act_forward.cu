// fusedbn.act_forward_train and fusedbn.act_forward_eval on CUDA:
//   y = act((x - mean) * invstd * w + b + r), and the packed sign mask when asked.
//
// Training: the batch statistics and the normalize coefficients [4][C] exactly as forward_train
// computes them (train_stats in bn_forward.cu: split Welford reduction + per-channel epilogue),
// then ONE elementwise pass (bn_act_ew.cuh) that reads x and r and writes y and the mask: the
// residual add and the activation cost no extra pass over memory (3 |x| + |r| + mask).
// The rows layout (channels_last, (N, C)) takes forward_train's persistent single-read path
// instead where it fits (bn_persistent.cuh with ActStore: x read once into shared memory, the
// same statistics and epilogue, then ApplyFn's map with r read and y and the mask written from
// the tile: 2 |x| + |r| + mask); the mask needs C % 8 == 0 and the lanes of a mask byte in one
// warp row there (rows_mask_bytes_fit). The contiguous layout (NCHW, NCDHW, (N, C, L)) takes the
// persistent contiguous forward (bn_persistent_nchw.cuh with ActNchwStore: the same map from the
// tile, 2 |x| + |r| + mask); the mask needs whole mask bytes in every window there (x at the
// start of its 16-byte line or scalar vectors, C * S and the packed units' windows multiples of
// 8 values, planes with S % 8 == 0). Where these do not hold -- or where the slab does not fit,
// the persistent paths are off or the cooperative launch is refused -- the streaming passes
// above run. Eval: eval_coeffs, then the same pass. No host synchronization; the checks and wording are the CPU backend's
// (act_common.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <tuple>

#include "act_common.h"
#include "bn_act_cuda.h"
#include "bn_act_ew.cuh"
#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"
#include "bn_persistent.cuh"
#include "bn_persistent_nchw.cuh"
#include "bn_train_stats.cuh"

namespace fusedbn {
namespace cuda {
namespace {

// in: x, r; out: y; params (hi, lo, scale, shift) of channel_affine (bn_elementwise.cuh: the
// mean split as hi + lo); bit: the sign of the (rounded) output.
struct ApplyFn {
  static constexpr int kIn = 2, kOut = 1, kParams = kAffineParams;
  static constexpr bool kUsesAct = true;
  template <Act A, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool& bit,
                                               const ActEwArgs<T>& a) {
    out[0] = act_affine<A, T>(in[0], p, a.in[1] != nullptr, in[1], a.slope, a.relu_bits, bit);
  }
};

// The persistent rows forward's last step for act_forward_train (bn_persistent.cuh's Store): on
// each vector of x the tile holds, ApplyFn's map (act_affine) with the residual read there, y
// written, and the mask bits (store_mask_bits: the lanes of a byte combine theirs) when asked.
template <typename T>
struct ActStore {
  using acc_t = at::opmath_type<T>;
  T* y;
  const T* r;     // nullptr: no residual
  uint8_t* mask;  // nullptr: not saved
  acc_t slope;
  int act;
  bool relu_bits;

  std::array<const void*, 2> ptrs() const { return {y, r}; }
  bool accepts(int V, int tx, int64_t C) const {
    return mask == nullptr || rows_mask_bytes_fit(V, tx, C);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void store(const Vec<T, V>& xv, const acc_t (&cf)[V][4], index_t off,
                                        int lane) const {
    const Vec<T, V> rv = load_vec_or_zero<T, V>(r, off);
    Vec<T, V> yv;
    unsigned bits = 0;
    dispatch_act(static_cast<Act>(act), [&](auto A) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        bool bit = false;
        yv.v[j] = static_cast<T>(act_affine<decltype(A)::value, T>(
            static_cast<acc_t>(xv.v[j]), cf[j], r != nullptr, static_cast<acc_t>(rv.v[j]), slope,
            relu_bits, bit));
        bits |= static_cast<unsigned>(bit) << j;
      }
    });
    store_vec<T, V>(y + off, yv);
    if (mask != nullptr) store_mask_bits<V>(mask, off, bits, lane);
  }
};

// The persistent contiguous forward's last step for act_forward_train (bn_persistent_nchw.cuh's
// Store): on each vector of x the tile holds, act_affine with the residual read there (vector
// loads where r sits in its lines as x does, else element-wise), y written, and the mask bits
// (store_mask_bits). A thread's vector is V consecutive elements, so the mask needs the bytes
// whole within a unit's windows: the vectors at byte boundaries (x at the start of its 16-byte
// line, or scalars), packed units of whole blocks of 8 / gcd(S, 8) channels (8 values' worth)
// with C a multiple of that, planes of S % 8 == 0 values cut into segments of multiples of 8;
// then the G = 8 / V consecutive lanes of a byte are whole in one warp and all have elements.
template <typename T>
struct ActNchwStore {
  using acc_t = at::opmath_type<T>;
  const T* r;     // nullptr: no residual
  uint8_t* mask;  // nullptr: not saved
  acc_t slope;
  int act;
  bool relu_bits;
  bool r_vec = false;  // r sits in its lines as x does (bind)

  int chan_group(int64_t S) const {
    if (mask == nullptr) return 1;
    int64_t g = kGroup;
    while (S % g != 0) g /= 2;  // gcd(S, 8)
    return static_cast<int>(kGroup / g);
  }
  int seg_align() const { return mask != nullptr ? kGroup : 1; }
  bool accepts(int V, int mis, int64_t C, int64_t S, bool packed) const {
    if (mask == nullptr) return true;
    if (V > 1 && mis != 0) return false;
    return packed ? C % chan_group(S) == 0 : S % kGroup == 0;
  }
  ActNchwStore bind(int V, int mis) const {
    ActNchwStore b = *this;
    b.r_vec = r != nullptr && V > 1 && misalignment(r, sizeof(T)) == mis;
    return b;
  }
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ void store(const Args& a, const NchwSlot<index_t>& q,
                                        const Vec<T, V>& xv, const Vec<T, V>& /*unused*/,
                                        const acc_t* chan, int lane) const {
    const bool full = q.lo == 0 && q.hi == V;
    Vec<T, V> rv;
    if (r == nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) rv.v[j] = static_cast<T>(0.0f);
    } else if (full && r_vec) {
      rv = load_vec<T, V>(r + q.base);
    } else {
      rv = load_partial<T, V>(r + q.base, q.lo, q.hi);
    }
    Vec<T, V> yv;
    unsigned bits = 0;
    dispatch_act(static_cast<Act>(act), [&](auto A) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t p[4];
        nchw_coeffs(chan, a.cbmax, nchw_lane_channel(q, j), p);
        bool bit = false;
        yv.v[j] = static_cast<T>(act_affine<decltype(A)::value, T>(
            static_cast<acc_t>(xv.v[j]), p, r != nullptr, static_cast<acc_t>(rv.v[j]), slope,
            relu_bits, bit));
        bits |= static_cast<unsigned>(bit && j >= q.lo && j < q.hi) << j;
      }
    });
    if (full && a.out_vec) {
      store_vec<T, V>(a.out + q.base, yv);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j >= q.lo && j < q.hi) a.out[q.base + j] = yv.v[j];
    }
    if (mask != nullptr) store_mask_bits<V>(mask, q.base, bits, lane);
  }
};

void apply_act(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, at::Tensor& mask,
               const Geometry& g, const at::Tensor& coeffs, Act act, double slope) {
  if (g.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_act_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ActEwArgs<scalar_t> a;
    a.in[0] = x.const_data_ptr<scalar_t>();
    a.in[1] = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    a.out[0] = y.mutable_data_ptr<scalar_t>();
    a.mask_out = mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    a.params = coeffs.const_data_ptr<acc_t>();
    a.slope = static_cast<acc_t>(slope);
    a.act = static_cast<int>(act);
    a.relu_bits = act == Act::kRelu;
    launch_act_ew<ApplyFn, scalar_t>(a, g, x.get_device());
  });
}

// The persistent single-read forward (bn_persistent.cuh with ActStore for the rows layout,
// bn_persistent_nchw.cuh with ActNchwStore for the contiguous one), or false (nothing written)
// where it does not apply: the caller takes the streaming path.
bool persistent_act_train(const at::Tensor& x, const at::Tensor& r, at::Tensor& y,
                          at::Tensor& mask, const Geometry& g,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, at::Tensor& mean,
                          at::Tensor& invstd, at::Tensor& var, at::Tensor& coeffs, Act act,
                          double slope) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_act_forward_train_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    uint8_t* mp = mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    const auto slope_acc = static_cast<acc_t>(slope);
    const auto epi =
        train_stats_epilogue<scalar_t>(x, g, weight, bias, eps, mean, invstd, var, coeffs);
    if (g.layout == Layout::kChannelsLast) {
      const ActStore<scalar_t> out{y.mutable_data_ptr<scalar_t>(), rp, mp, slope_acc,
                                   static_cast<int>(act), act == Act::kRelu};
      done = persistent_rows_forward<scalar_t>(x, g.rows(), g.C, epi, coeffs, out);
    } else {
      const ActNchwStore<scalar_t> out{rp, mp, slope_acc, static_cast<int>(act),
                                       act == Act::kRelu};
      done = persistent_nchw_forward<scalar_t>(x, y, g, epi, coeffs, out);
    }
  });
  return done;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
    double eps, int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_train";
  const Act act = check_act_forward_args(input, weight, bias, residual, activation,
                                         negative_slope, save_mask, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const auto stat_opts = input.options().dtype(acc);
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  if (g.C == 0) return {y, mean, invstd, var, mask};
  if (g.numel() == 0) {  // empty batch: no statistics to take
    mean.zero_();
    var.zero_();
    invstd.fill_(empty_invstd(eps, acc));
    return {y, mean, invstd, var, mask};
  }
  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  if (!persistent_act_train(x, r, y, mask, g, weight, bias, eps, mean, invstd, var, coeffs, act,
                            negative_slope)) {
    train_stats(x, g, weight, bias, eps, mean, invstd, var, coeffs);
    apply_act(x, r, y, mask, g, coeffs, act, negative_slope);
  }
  return {y, mean, invstd, var, mask};
}

std::tuple<at::Tensor, at::Tensor> act_forward_eval(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual, double eps,
    int64_t activation, double negative_slope, bool save_mask) {
  constexpr const char* op = "act_forward_eval";
  const Act act = check_act_forward_args(input, weight, bias, residual, activation,
                                         negative_slope, save_mask, op);
  check_eval_stats_args(running_mean, running_var, input, eps, op);
  const DeviceGuard guard(input.device());
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  at::Tensor y = empty_output(x);
  at::Tensor mask = new_mask(input, save_mask);
  if (g.numel() == 0) return {y, mask};
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor coeffs = at::empty({kAffineParams * g.C}, stat_opts);
  eval_coeffs(g, running_mean, running_var, weight, bias, eps, coeffs);
  apply_act(x, r, y, mask, g, coeffs, act, negative_slope);
  return {y, mask};
}

}  // namespace cuda
}  // namespace fusedbn
