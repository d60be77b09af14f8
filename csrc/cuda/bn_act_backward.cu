// fusedbn.act_backward on CUDA. The math is the CPU backend's (csrc/cpu/bn_act_backward.cpp):
// dz = dy * act'(z) is the gradient at the activation's input (and grad_residual); the rest is
// batch norm's backward with dz in place of dy, so after one elementwise pass (bn_act_ew.cuh)
// that writes dz -- and, in memory-saving mode, x_hat / invstd recovered from the output -- this
// calls fusedbn::cuda::backward (bn_backward.cu: split reduction + dx pass). Sources of dz:
//   input:  z = (x - mean) * invstd * w + b + r recomputed, dz = act.grad(z, dy);
//   mask:   dz = bit ? dy : slope * dy   (relu: a select, no multiply);
//   output: z = y > 0 ? y : y / slope, x_hat / invstd = (z - b - r) / (w * invstd),
//           dz = y > 0 ? dy : slope * dy   (identity: slope 1, dz = dy is not rewritten).
// The zero-weight precondition of the output source is the caller's (fusedbn/act_ops.py checks
// it before choosing that source); checking it here would need a host synchronization.
//
// In eval mode with dx and dweight or dbias asked for, the mask source's reduction writes dx = dz *
// w * invstd (and dz as grad_residual) as it forms dz (EvalDxOp of bn_reduce_ops.cuh): dy, x and
// the mask read once, dx written once (3 |x|, 4 with grad_residual); no dx pass (tensors of more
// than 2^30 elements: the dx pass, as in training). So do the input source's (EvalInputDxOp:
// dz formed from dy, x and r once they are loaded, the kFormsIn0 hook) and the output source's
// (EvalOutputDxOp: dz and x_hat / invstd from dy, y and r): 3 |x| + |r| (+ 1).
// With batch norm's gradients asked for, no source stores dz to read it back (7 |x| of traffic,
// 10 for the output source, which also stored x_hat / invstd): dz (and x_hat / invstd) is formed
// where dy (and x or y) are read -- in the split reduction and in the dx pass -- and dz is written
// only as grad_residual, from the dx pass:
//   mask:   MaskedGradOp (the kMaskedIn0 hook of bn_reduce_kernels.cuh), DxFromMaskFn: dy and x
//           read twice, dx written once (5 |x|, 6 with grad_residual), plus the mask twice;
//   input:  InputGradOp (a three-input op over dy, x, r), DxFromInputFn: dy and x (and r) read
//           twice, z and act'(z) computed in both passes (5 |x|, + 2 |r|, + 1 with grad_residual);
//   output: OutputGradOp over dy, y, r, DxFromOutputFn: the same count, y in place of x.
// In training mode with dx asked for, the rows layout (channels_last, (N, C)) of the mask and
// the input sources takes the persistent single-read backward instead where its slab of dy and x
// fits on chip (bn_persistent_backward.cuh with MaskedGradOp / InputGradOp: dz formed from dy and
// the mask -- or from dy, x and r -- as the reduction loads them and kept in the dy tile, the
// same sums, epilogue and dx map, grad_residual = dz written from the dx step): dy, x (the mask,
// r) read once, dx (and grad_residual) written once, 3 |x| (+ 1, + |r|). So does the contiguous
// layout (NCHW, NCDHW, (N, C, L); bn_persistent_nchw_backward.cuh with MaskedGradOp or
// InputGradOp's form_dz_slot, and DxDzNchwStore). The output source does the same with
// OutputGradOp's hooks in both layouts (dz in the dy tile, x_hat / invstd recovered from y in
// the x tile, mean 0): dy, y (r) read once, dx (and grad_residual) written once. The streaming
// passes above are the fallback (too large, the persistent paths off, the cooperative launch
// refused) and the path of eval mode (where the reduction writes dx, see above).
// dz and x_hat / invstd are rounded to the input's dtype where they are formed, as the stored ones
// were, so the results are those of the unfused passes. Identity from the input is batch norm's
// backward of dy itself (bn_backward.cu's persistent path included).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "act_common.h"
#include "bn_act_cuda.h"
#include "bn_act_ew.cuh"
#include "bn_cuda_ops.h"
#include "bn_elementwise.cuh"
#include "bn_persistent_backward.cuh"
#include "bn_persistent_nchw_backward.cuh"
#include "bn_reduce.cuh"

namespace fusedbn {
namespace cuda {
namespace {

// in: dy, x, r; out: dz; params (mean, invstd * w, b).
struct GradFromInputFn {
  static constexpr int kIn = 3, kOut = 1, kParams = 3;
  static constexpr bool kUsesAct = true;
  template <Act A, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    acc_t z = (in[1] - p[0]) * p[1] + p[2];
    if (a.in[2] != nullptr) z += in[2];
    out[0] = ActFn<A>::grad(z, in[0], a.slope);
  }
};

// in: dy; mask in; out: dz.
struct GradFromMaskFn {
  static constexpr int kIn = 1, kOut = 1, kParams = 0;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t*, bool bit,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    out[0] = bit ? in[0] : (a.relu_bits ? acc_t(0) : in[0] * a.slope);
  }
};

// in: dy, y, r; out: dz, x_hat / invstd; params (b, 1 / (w * invstd)).
struct RecoverFn {
  static constexpr int kIn = 3, kOut = 2, kParams = 2;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    out[0] = ActFn<Act::kLeakyRelu>::grad(in[1], in[0], a.slope);
    acc_t z = inverse_leaky(in[1], a.inv_slope) - p[0];
    if (a.in[2] != nullptr) z -= in[2];
    out[1] = z * p[1];
  }
};

// The dx pass of the mask source: in: dy, x (nullptr in eval mode: not read); mask in; out: dx,
// dz (nullptr: not written); params (k0, k1, k2, k3) of channel_grad (bn_elementwise.cuh), in
// eval mode (0, w * invstd, 0, 0).
struct DxFromMaskFn {
  static constexpr int kIn = 2, kOut = 2, kParams = kGradParams;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool bit,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    acc_t dz = bit ? in[0] : (a.relu_bits ? acc_t(0) : in[0] * a.slope);
    dz = static_cast<acc_t>(static_cast<T>(dz));  // as GradFromMaskFn stores it
    out[0] = grad_dx(dz, in[1], p);
    out[1] = dz;
  }
};

// GradOp over (dz, x) with dz formed from dy and the mask as the reduction loads dy.
template <typename T>
struct MaskedGradOp : GradOp<T> {
  using acc_t = typename GradOp<T>::acc_t;
  static constexpr bool kMaskedIn0 = true;
  // Elements [lo, hi) of the group at `offset`. The group need not start at a multiple of V (a
  // misaligned input keeps its vectors, bn_reduce.cuh), so its bits may span two mask bytes; only
  // bytes holding elements of [lo, hi) are read (lanes outside it may lie before the tensor).
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ static void mask_in0(const Args& a, index_t offset, int lo, int hi,
                                                  Vec<T, V>& r) {
    const index_t e0 = offset + lo;
    const uint8_t* m = a.mask + (e0 >> 3);
    const int sh = static_cast<int>(e0 & 7);
    unsigned bits = static_cast<unsigned>(m[0]) >> sh;
    if (sh + (hi - lo) > 8) bits |= static_cast<unsigned>(m[1]) << (8 - sh);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j >= lo && j < hi && ((bits >> (j - lo)) & 1u) == 0) {
        r.v[j] = static_cast<T>(a.mask_zero ? acc_t(0) : static_cast<acc_t>(r.v[j]) * a.mask_slope);
      }
    }
  }
};

// act'(z) * dy for the run-time activation (uniform over the grid), rounded to T as a stored dz.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t act_grad_rounded(int act, acc_t z, acc_t dy, acc_t slope) {
  acc_t g;
  switch (static_cast<Act>(act)) {
    case Act::kRelu: g = ActFn<Act::kRelu>::grad(z, dy, slope); break;
    case Act::kLeakyRelu: g = ActFn<Act::kLeakyRelu>::grad(z, dy, slope); break;
    case Act::kSilu: g = ActFn<Act::kSilu>::grad(z, dy, slope); break;
    case Act::kGeluTanh: g = ActFn<Act::kGeluTanh>::grad(z, dy, slope); break;
    default: g = dy; break;
  }
  return static_cast<acc_t>(static_cast<T>(g));
}

// The residual of the contiguous persistent backward's slot q (bn_persistent_nchw.cuh): zeros
// where absent, one vector load where it sits in its lines as dy and x do, else lanes [lo, hi).
template <typename T, int V, class Args, typename index_t>
__device__ __forceinline__ Vec<T, V> residual_slot(const Args& a, const NchwSlot<index_t>& q) {
  if (a.in2 == nullptr) return zero_vec<T, V>();
  if (q.lo == 0 && q.hi == V && a.in2_vec) return load_vec<T, V>(a.in2 + q.base);
  return load_partial<T, V>(a.in2 + q.base, q.lo, q.hi);
}

// GradOp over (dz, x) for the input source: inputs dy, x, r (r absent: zeros, and z + 0 gives
// every activation the same act'(z) as z), dz = act'(z) * dy with z = (x - mean) * scale + bias
// + r formed as the reduction loads them. Param: the channel's (mean, w * invstd, bias) from
// chan [3][C] (GradFromInputFn's), the slope and the activation (ReduceArgs::mask_slope, act).
// The persistent rows backward (bn_persistent_backward.cuh) forms the same dz where it loads dy,
// x and r (form_dz: kept in its dy tile, r not held), its parameters staged per CTA.
template <typename T>
struct InputGradOp : GradOp<T> {
  using Base = GradOp<T>;
  using acc_t = typename Base::acc_t;
  using Thread = typename Base::Thread;
  static constexpr int kInputs = 3;
  static constexpr int kChanRows = 3;
  static constexpr bool kFormsDz = true;
  struct Param {
    acc_t mean, scale, bias, slope;
    int act;
  };
  // Channel c's parameters from chan [3][C].
  __device__ __forceinline__ static Param param_of(const acc_t* chan, int64_t C, int64_t c,
                                                   acc_t slope, int act) {
    return {chan[c], chan[C + c], chan[2 * C + c], slope, act};
  }
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return param_of(a.chan, a.C, c, a.mask_slope, a.act);
  }
  __device__ __forceinline__ static acc_t dz(acc_t dy, acc_t x, acc_t r, const Param& p) {
    const acc_t z = (x - p.mean) * p.scale + p.bias + r;
    return act_grad_rounded<T>(p.act, z, dy, p.slope);
  }
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dy)[L], const acc_t (&x)[L],
                                              const acc_t (&r)[L], int lo, int hi,
                                              const Param& p) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      if (j >= lo && j < hi) Base::push_one(s, dz(dy[j], x[j], r[j], p), x[j], p.mean);
    }
  }
  // dz in place of dy in dv for the channels c0 + j of the CTA's staged chan [3][nc], the
  // residual read at offset (the persistent backward's hook, forms_dz).
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ static void form_dz(const Args& a, index_t offset, const acc_t* chan,
                                                 int nc, int c0, Vec<T, V>& dv,
                                                 const Vec<T, V>& xv) {
    const Vec<T, V> rv = load_vec_or_zero<T, V>(a.in2, offset);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Param p = param_of(chan, nc, c0 + j, a.mask_slope, a.act);
      dv.v[j] = static_cast<T>(dz(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(xv.v[j]),
                                  static_cast<acc_t>(rv.v[j]), p));
    }
  }
  // The same for the contiguous persistent backward's slot q (bn_persistent_nchw.cuh): lanes
  // [lo, hi) of dv, lane j in the unit's local channel nchw_lane_channel(q, j) of the CTA's
  // staged chan [3][cbmax]; the residual read there (vector loads where it sits in its lines as
  // dy and x do).
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ static void form_dz_slot(const Args& a, const NchwSlot<index_t>& q,
                                                      const acc_t* chan, int cbmax,
                                                      Vec<T, V>& dv, const Vec<T, V>& xv) {
    const Vec<T, V> rv = residual_slot<T, V>(a, q);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < q.lo || j >= q.hi) continue;
      const Param p = param_of(chan, cbmax, nchw_lane_channel(q, j), a.mask_slope, a.act);
      dv.v[j] = static_cast<T>(dz(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(xv.v[j]),
                                  static_cast<acc_t>(rv.v[j]), p));
    }
  }
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dy)[L],
                                                  const acc_t (&x)[L], const acc_t (&r)[L],
                                                  const Param& p) {
    push(s, dy, x, r, 0, L, p);
  }
};

// The input source in eval mode with dx and grad_weight or grad_bias asked for: InputGradOp's dz
// formed into dy's vector once dy, x and r are loaded (kFormsIn0), then written as EvalDxOp
// writes it -- dx = dz * w * invstd (the parameter's scale: eval mode's dx needs no sums) and dz
// as grad_residual where ReduceArgs::out1 is set -- and pushed as GradOp's (dz, x): dy, x, r
// read once, dx (and dz) written once. Param: the channel's (mean, w * invstd, bias) from chan
// [3][C]; the slope and the activation, the same for every channel, are read from the arguments
// where dz is formed (not held per vector slot: the packed kernel's scalar instantiations
// spilled with them).
template <typename T>
struct EvalInputDxOp : InputGradOp<T> {
  using In = InputGradOp<T>;
  using Base = GradOp<T>;
  using acc_t = typename Base::acc_t;
  using Thread = typename Base::Thread;
  struct Param {
    acc_t mean, scale, bias;
  };
  static constexpr bool kStoresIn0 = true;
  static constexpr bool kFormsIn0 = true;
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return {a.chan[c], a.chan[a.C + c], a.chan[2 * a.C + c]};
  }
  __device__ __forceinline__ static acc_t out_scale(const Param& p) { return p.scale; }
  template <int V, class Args, class ParamOf>
  __device__ __forceinline__ static void form_in0(const Args& a, int lo, int hi, Vec<T, V>& dv,
                                                  const Vec<T, V>& xv, const Vec<T, V>& rv,
                                                  ParamOf param_of) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j >= lo && j < hi) {
        const Param p = param_of(j);
        const typename In::Param q{p.mean, p.scale, p.bias, a.mask_slope, a.act};
        dv.v[j] = static_cast<T>(In::dz(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(xv.v[j]),
                                        static_cast<acc_t>(rv.v[j]), q));
      }
    }
  }
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dz)[L], const acc_t (&x)[L],
                                              const acc_t (&)[L], int lo, int hi,
                                              const Param& p) {
    Base::push(s, dz, x, lo, hi, p.mean);
  }
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dz)[L],
                                                  const acc_t (&x)[L], const acc_t (&)[L],
                                                  const Param& p) {
    Base::push_all(s, dz, x, p.mean);
  }
};

// GradOp over (dz, x_hat / invstd) for the output source (identity: slope 1, or leaky_relu):
// inputs dy, y, r; z = y > 0 ? y : y / slope, x_hat / invstd = (z - b - r) / (w * invstd),
// dz = y > 0 ? dy : slope * dy (RecoverFn's), both rounded to T; the mean is 0 (x_hat / invstd
// is centred). Param: (b, 1 / (w * invstd)) from chan [2][C], the slope and its inverse.
// The persistent backward kernels form dz and x_hat / invstd where they load dy, y and r (the
// forms_dz hooks: kept in the dy and x tiles, so that GradOp's sums and the dx map, with mean 0,
// run on them), from their staged chan [3][nc]: (0 -- GradOp's mean --, b, 1 / (w * invstd)).
template <typename T>
struct OutputGradOp : GradOp<T> {
  using Base = GradOp<T>;
  using acc_t = typename Base::acc_t;
  using Thread = typename Base::Thread;
  static constexpr int kInputs = 3;
  static constexpr int kChanRows = 3;
  static constexpr bool kFormsDz = true;
  struct Param {
    acc_t bias, inv_scale, slope, inv_slope;
  };
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return {a.chan[c], a.chan[a.C + c], a.mask_slope, a.inv_slope};
  }
  // Channel c's parameters from a persistent kernel's staged chan [3][nc].
  template <class Args>
  __device__ __forceinline__ static Param staged(const Args& a, const acc_t* chan, int nc, int c) {
    return {chan[nc + c], chan[2 * nc + c], a.mask_slope, a.inv_slope};
  }
  // dz and x_hat / invstd of one element, each rounded to T.
  __device__ __forceinline__ static void recover(acc_t dy, acc_t y, acc_t r, const Param& p,
                                                 acc_t& dz, acc_t& xc) {
    dz = static_cast<acc_t>(static_cast<T>(ActFn<Act::kLeakyRelu>::grad(y, dy, p.slope)));
    const acc_t z = inverse_leaky(y, p.inv_slope) - p.bias - r;
    xc = static_cast<acc_t>(static_cast<T>(z * p.inv_scale));
  }
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dy)[L], const acc_t (&y)[L],
                                              const acc_t (&r)[L], int lo, int hi,
                                              const Param& p) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      if (j >= lo && j < hi) {
        acc_t dz, xc;
        recover(dy[j], y[j], r[j], p, dz, xc);
        Base::push_one(s, dz, xc, acc_t(0));
      }
    }
  }
  // dz in place of dy in dv, x_hat / invstd in place of y in yv, for the channels c0 + j (the
  // persistent rows backward's hook); the residual read at offset.
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ static void form_dz(const Args& a, index_t offset, const acc_t* chan,
                                                 int nc, int c0, Vec<T, V>& dv, Vec<T, V>& yv) {
    const Vec<T, V> rv = load_vec_or_zero<T, V>(a.in2, offset);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t dz, xc;
      recover(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(yv.v[j]),
              static_cast<acc_t>(rv.v[j]), staged(a, chan, nc, c0 + j), dz, xc);
      dv.v[j] = static_cast<T>(dz);
      yv.v[j] = static_cast<T>(xc);
    }
  }
  // The same for the contiguous persistent backward's slot q: lanes [lo, hi), lane j in the
  // unit's local channel nchw_lane_channel(q, j).
  template <int V, class Args, typename index_t>
  __device__ __forceinline__ static void form_dz_slot(const Args& a, const NchwSlot<index_t>& q,
                                                      const acc_t* chan, int cbmax,
                                                      Vec<T, V>& dv, Vec<T, V>& yv) {
    const Vec<T, V> rv = residual_slot<T, V>(a, q);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < q.lo || j >= q.hi) continue;
      acc_t dz, xc;
      recover(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(yv.v[j]),
              static_cast<acc_t>(rv.v[j]), staged(a, chan, cbmax, nchw_lane_channel(q, j)), dz,
              xc);
      dv.v[j] = static_cast<T>(dz);
      yv.v[j] = static_cast<T>(xc);
    }
  }
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dy)[L],
                                                  const acc_t (&y)[L], const acc_t (&r)[L],
                                                  const Param& p) {
    push(s, dy, y, r, 0, L, p);
  }
};

// The output source in eval mode with dx and grad_weight or grad_bias asked for: OutputGradOp's
// dz and x_hat / invstd formed into dy's and y's vectors once dy, y and r are loaded
// (kFormsIn0), dx = dz * w * invstd (and dz as grad_residual) written as EvalDxOp writes it, and
// GradOp's (dz, x_hat / invstd) pushed with mean 0: dy, y, r read once, dx (and dz) written
// once. Param: OutputGradOp's and a = w * invstd, from chan [3][C] (b, 1 / (w * invstd), a).
template <typename T>
struct EvalOutputDxOp : OutputGradOp<T> {
  using Out = OutputGradOp<T>;
  using Base = GradOp<T>;
  using acc_t = typename Base::acc_t;
  using Thread = typename Base::Thread;
  struct Param {
    typename Out::Param out;
    acc_t a;
  };
  static constexpr bool kStoresIn0 = true;
  static constexpr bool kFormsIn0 = true;
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return {Out::param(a, c), a.chan[2 * a.C + c]};
  }
  __device__ __forceinline__ static acc_t out_scale(const Param& p) { return p.a; }
  template <int V, class Args, class ParamOf>
  __device__ __forceinline__ static void form_in0(const Args&, int lo, int hi, Vec<T, V>& dv,
                                                  Vec<T, V>& yv, const Vec<T, V>& rv,
                                                  ParamOf param_of) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j >= lo && j < hi) {
        acc_t dz, xc;
        Out::recover(static_cast<acc_t>(dv.v[j]), static_cast<acc_t>(yv.v[j]),
                     static_cast<acc_t>(rv.v[j]), param_of(j).out, dz, xc);
        dv.v[j] = static_cast<T>(dz);
        yv.v[j] = static_cast<T>(xc);
      }
    }
  }
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dz)[L],
                                              const acc_t (&xc)[L], const acc_t (&)[L], int lo,
                                              int hi, const Param&) {
    Base::push(s, dz, xc, lo, hi, acc_t(0));
  }
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dz)[L],
                                                  const acc_t (&xc)[L], const acc_t (&)[L],
                                                  const Param&) {
    Base::push_all(s, dz, xc, acc_t(0));
  }
};

// The dx pass of the input source: in: dy, x, r; out: dx (nullptr: not written), dz (nullptr:
// not written); params (mean, w * invstd, b, k0, k3): z's, then channel_grad's k0 and k3 (its
// k1 = w * invstd, k2 = mean) in training mode; in eval mode dx = dz * w * invstd.
struct DxFromInputFn {
  static constexpr int kIn = 3, kOut = 2, kParams = 5;
  static constexpr bool kUsesAct = true;
  template <Act A, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    acc_t z = (in[1] - p[0]) * p[1] + p[2];
    if (a.in[2] != nullptr) z += in[2];
    const acc_t dz = static_cast<acc_t>(static_cast<T>(ActFn<A>::grad(z, in[0], a.slope)));
    out[0] = a.dx_train ? (dz - p[3]) * p[1] - (in[1] - p[0]) * p[4] : dz * p[1];
    out[1] = dz;
  }
};

// The dx pass of the output source: in: dy, y, r; out: dx, dz; params (b, 1 / (w * invstd), k0,
// k1, k3): RecoverFn's, then channel_grad's with k2 = 0 in training mode; eval: dx = dz * k1.
struct DxFromOutputFn {
  static constexpr int kIn = 3, kOut = 2, kParams = 5;
  static constexpr bool kUsesAct = false;
  template <Act, typename acc_t, typename T>
  __device__ __forceinline__ static void apply(const acc_t (&in)[kIn], const acc_t* p, bool,
                                               acc_t (&out)[kOut], bool&,
                                               const ActEwArgs<T>& a) {
    const acc_t dz =
        static_cast<acc_t>(static_cast<T>(ActFn<Act::kLeakyRelu>::grad(in[1], in[0], a.slope)));
    acc_t z = inverse_leaky(in[1], a.inv_slope) - p[0];
    if (a.in[2] != nullptr) z -= in[2];
    const acc_t xc = static_cast<acc_t>(static_cast<T>(z * p[1]));
    out[0] = a.dx_train ? (dz - p[2]) * p[3] - xc * p[4] : dz * p[3];
    out[1] = dz;
  }
};

// The dx coefficients of the merged sums (GradEpilogueBase, bn_reduce_ops.cuh) at coeffs[row * C
// + c] for the rows k0, k1, k2, k3 given (-1: not stored; k2 is the channel's mean, or 0 when mean
// is nullptr); in eval mode k0, k2, k3 are 0. coeffs nullptr: dx not asked for.
template <typename acc_t>
struct ActEpilogue : GradEpilogueBase<acc_t> {
  const acc_t* mean;
  acc_t* coeffs;
  int64_t C;
  int rows[4];
  bool train;

  __device__ void operator()(int64_t c, const GradPartial<acc_t>& s) const {
    const ChannelDx<acc_t> d = this->grads(c, s);
    if (coeffs == nullptr) return;
    const acc_t k[4] = {train ? d.k0 : acc_t(0), d.a,
                        train && mean != nullptr ? mean[c] : acc_t(0),
                        train ? d.k3 : acc_t(0)};
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (rows[i] >= 0) coeffs[rows[i] * C + c] = k[i];
  }
};

// act_backward's outputs (dx, dweight, dbias, grad_residual) allocated for output_mask, like the
// saved tensor (x or y), and what the reductions' epilogue needs of them.
struct ActGrads {
  bool need_dx, need_dw, need_db, need_dr;
  bool need_sums;  // batch norm's sums: train and dx asked for, or dweight / dbias
  at::TensorOptions acc_opts;
  at::Tensor dx, dw, db, dz, mean, invstd;  // mean / invstd: contiguous

  ActGrads(const at::Tensor& saved, const Geometry& g, const c10::optional<at::Tensor>& weight,
           const at::Tensor& mean_in, const at::Tensor& invstd_in, bool train,
           std::array<bool, 4> output_mask)
      : need_dx(output_mask[0]),
        need_dw(output_mask[1]),
        need_db(output_mask[2]),
        need_dr(output_mask[3]),
        need_sums((train && need_dx) || need_dw || need_db),
        acc_opts(saved.options().dtype(acc_dtype(saved.scalar_type()))),
        mean(mean_in.contiguous()),
        invstd(invstd_in.contiguous()) {
    const auto param_opts =
        defined(weight) ? saved.options().dtype(weight->scalar_type()) : acc_opts;
    dx = need_dx ? empty_output(saved) : at::empty({0}, saved.options());
    dw = at::empty({need_dw ? g.C : 0}, param_opts);
    db = at::empty({need_db ? g.C : 0}, param_opts);
    dz = need_dr ? empty_output(saved) : at::empty({0}, saved.options());
  }

  // GradEpilogueBase's part of the epilogue: dweight / dbias where asked for.
  template <typename acc_t>
  GradEpilogueBase<acc_t> grads(const c10::optional<at::Tensor>& weight,
                                const Geometry& g) const {
    return {invstd.const_data_ptr<acc_t>(), channel_ptr(weight),
            need_dw ? channel_ptr(dw) : ChannelPtr{}, need_db ? channel_ptr(db) : ChannelPtr{},
            acc_t(1) / static_cast<acc_t>(g.rows())};
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {dx, dw, db, dz};
  }
};

template <class Fn, typename T>
void launch(const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& in2,
            const at::Tensor& out0, const at::Tensor& out1, const at::Tensor& mask,
            const at::Tensor& params, const Geometry& g, Act act, double slope,
            bool dx_train = false) {
  using acc_t = at::opmath_type<T>;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  auto mut = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; };
  ActEwArgs<T> a;
  a.in[0] = ptr(in0);
  a.in[1] = ptr(in1);
  a.in[2] = ptr(in2);
  a.out[0] = mut(out0);
  a.out[1] = mut(out1);
  a.mask_in = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  a.params = params.defined() ? params.const_data_ptr<acc_t>() : nullptr;
  a.slope = static_cast<acc_t>(act == Act::kIdentity ? 1.0 : slope);
  a.inv_slope = static_cast<acc_t>(act == Act::kIdentity ? 1.0 : 1.0 / slope);
  a.act = static_cast<int>(act);
  a.relu_bits = act == Act::kRelu;
  a.dx_train = dx_train;
  launch_act_ew<Fn, T>(a, g, in0.get_device());
}

// The persistent contiguous backward's last step for act_backward's mask source
// (bn_persistent_nchw.cuh's Store): dx from the tiles (the dy tile holds dz) as MapStore<GradFn>
// writes it, and dz itself as grad_residual unless dz is nullptr (vector stores where it sits
// in its lines as the inputs do).
template <typename T>
struct DxDzNchwStore : MapStore<GradFn<at::opmath_type<T>>> {
  T* dz = nullptr;
  bool dz_vec = false;

  DxDzNchwStore bind(int V, int mis) const {
    DxDzNchwStore b = *this;
    b.dz_vec = dz != nullptr && (V == 1 || misalignment(dz, sizeof(T)) == mis);
    return b;
  }
  template <int V, class Args, typename index_t, typename acc_t = typename Args::acc_type>
  __device__ __forceinline__ void store(const Args& a, const NchwSlot<index_t>& q,
                                        const Vec<T, V>& dv, const Vec<T, V>& xv,
                                        const acc_t* chan, int lane) const {
    MapStore<GradFn<acc_t>>::template store<V>(a, q, dv, xv, chan, lane);
    if (dz == nullptr) return;
    if (q.lo == 0 && q.hi == V && dz_vec) {
      store_vec<T, V>(dz + q.base, dv);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j >= q.lo && j < q.hi) dz[q.base + j] = dv.v[j];
    }
  }
};

// The persistent backward with Op (MaskedGradOp, InputGradOp) for training mode with dx asked
// for: the rows layout through bn_persistent_backward.cuh, the contiguous one through
// bn_persistent_nchw_backward.cuh (InputGradOp's form_dz_slot there: a vector may span two
// channels). dy, x (the mask, r) read once, dx (and grad_residual = dz) written once; epi writes
// the dx coefficients (k0, a, mean, k3) to coeffs [4][C]; chan: the op's parameters. False
// (nothing written) where it does not apply or fit.
template <class Op, typename T>
bool persistent_act_backward(const at::Tensor& dy, const at::Tensor& x, const ActGrads& o,
                             const Geometry& g, const at::opmath_type<T>* chan,
                             const ActEpilogue<at::opmath_type<T>>& epi, const at::Tensor& coeffs,
                             const ReduceExtras& ex) {
  T* dz = o.need_dr ? o.dz.mutable_data_ptr<T>() : nullptr;
  if (g.layout != Layout::kChannelsLast) {
    DxDzNchwStore<T> out;
    out.dz = dz;
    return persistent_nchw_backward<T, ActEpilogue<at::opmath_type<T>>, Op>(
        dy, x, o.dx, g, chan, epi, coeffs, out, ex);
  }
  const GradDxStore<T> out{o.dx.mutable_data_ptr<T>(), dz};
  return persistent_rows_backward_op<T, Op>(dy, x, g.rows(), g.C, chan, epi, coeffs, out, ex);
}

// The mask source with some of batch norm's gradients asked for (numel > 0); see the top.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_from_mask(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask, const Geometry& g,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    bool train, Act act, double slope, std::array<bool, 4> output_mask) {
  ActGrads o(x, g, weight, mean, invstd, train, output_mask);
  at::Tensor coeffs;
  if (o.need_dx) coeffs = at::empty({kGradParams * g.C}, o.acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "fusedbn_act_backward_mask", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (o.need_sums) {
      using Op = MaskedGradOp<scalar_t>;
      ReduceExtras ex;
      ex.mask = mask.const_data_ptr<uint8_t>();
      ex.slope = slope;
      ex.mask_zero = act == Act::kRelu;
      if (!train && o.need_dx && fits_int32(g.numel())) {
        // Eval mode: dx = dz * w * invstd (and dz as grad_residual) written by the reduction as
        // it forms dz (EvalDxOp): dy, x and the mask read once, dx (and dz) written once.
        const at::Tensor params = eval_dx_params<acc_t>(weight, o.mean, o.invstd);
        ex.out0 = o.dx;
        if (o.need_dr) ex.out1 = o.dz;
        ActEpilogue<acc_t> epi{o.grads<acc_t>(weight, g), nullptr, nullptr, g.C, {-1, -1, -1, -1},
                               train};
        reduce_pass2<Op>(reduce_pass1<EvalDxOp<Op>>(dy, x, params.const_data_ptr<acc_t>(), g, ex),
                         g.C, epi);
        return;
      }
      // DxFromMaskFn's (k0, k1, k2, k3): channel_grad's; eval (0, a, 0, 0).
      ActEpilogue<acc_t> epi{o.grads<acc_t>(weight, g),
                             o.mean.const_data_ptr<acc_t>(),
                             o.need_dx ? coeffs.mutable_data_ptr<acc_t>() : nullptr,
                             g.C,
                             {0, 1, 2, 3},
                             train};
      if (train && o.need_dx &&
          persistent_act_backward<Op, scalar_t>(dy, x, o, g, o.mean.const_data_ptr<acc_t>(), epi,
                                                coeffs, ex)) {
        return;
      }
      reduce_pass2<Op>(reduce_pass1<Op>(dy, x, o.mean.const_data_ptr<acc_t>(), g, ex), g.C, epi);
    } else {  // eval mode, dx only
      const auto& opts = o.acc_opts;
      const at::Tensor w = defined(weight) ? weight->to(opts) : at::ones({g.C}, opts);
      coeffs = at::cat({at::zeros({g.C}, opts), w * o.invstd, at::zeros({2 * g.C}, opts)});
    }
    if (o.need_dx) {
      launch<DxFromMaskFn, scalar_t>(dy, train ? x : at::Tensor(), at::Tensor(), o.dx,
                                     o.need_dr ? o.dz : at::Tensor(), mask, coeffs, g, act,
                                     slope);
    } else if (o.need_dr) {
      launch<GradFromMaskFn, scalar_t>(dy, at::Tensor(), at::Tensor(), o.dz, at::Tensor(), mask,
                                       at::Tensor(), g, act, slope);
    }
  });
  return o.outputs();
}

// The input source (act not identity) and the output source with some of batch norm's gradients
// asked for (numel > 0); see the top. saved: x (input) or y (output); r: the residual or
// undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_recomputed(
    const at::Tensor& dy, const at::Tensor& saved, const at::Tensor& r, const Geometry& g,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, Act act, double slope,
    ActSource src, std::array<bool, 4> output_mask) {
  const bool from_output = src == ActSource::kOutput;
  ActGrads o(saved, g, weight, mean, invstd, train, output_mask);
  const auto& acc_opts = o.acc_opts;
  const at::Tensor w = defined(weight) ? weight->to(acc_opts) : at::ones({g.C}, acc_opts);
  const at::Tensor b = defined(bias) ? bias->to(acc_opts) : at::zeros({g.C}, acc_opts);
  const at::Tensor zeros = at::zeros({g.C}, acc_opts);
  // [5][C]: the first rows are the reduction's chan (GradFromInputFn's / RecoverFn's params),
  // the dx pass's k0 and k3 are the epilogue's (zeros in eval mode).
  //   input:  (mean, w * invstd, b, k0, k3);   output: (b, 1 / (w * invstd), k0, k1, k3).
  const at::Tensor params =
      from_output ? at::cat({b, (w * o.invstd).reciprocal(), zeros, w * o.invstd, zeros})
                  : at::cat({o.mean, o.invstd * w, b, zeros, zeros});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(),
                                  "fusedbn_act_backward_recomputed", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* p = params.mutable_data_ptr<acc_t>();
    if (o.need_sums) {
      ReduceExtras ex;
      ex.in2 = r;
      ex.slope = act == Act::kIdentity ? 1.0 : slope;
      ex.inv_slope = act == Act::kIdentity ? 1.0 : 1.0 / slope;
      ex.act = static_cast<int>(act);
      if (!train && o.need_dx && fits_int32(g.numel())) {
        // Eval mode: dx = dz * w * invstd (and dz as grad_residual) written by the reduction as
        // it forms dz (EvalInputDxOp, EvalOutputDxOp): dy, x (y) and r read once, dx (and dz)
        // written once.
        ex.out0 = o.dx;
        if (o.need_dr) ex.out1 = o.dz;
        ActEpilogue<acc_t> eepi{o.grads<acc_t>(weight, g), nullptr, nullptr, g.C,
                                {-1, -1, -1, -1}, train};
        if (from_output) {
          using Op = EvalOutputDxOp<scalar_t>;
          // (b, 1 / (w * invstd), w * invstd): params' rows 0, 1 and 3.
          const at::Tensor ochan =
              at::cat({params.narrow(0, 0, 2 * g.C), params.narrow(0, 3 * g.C, g.C)});
          reduce_pass2<Op>(reduce_pass1<Op>(dy, saved, ochan.const_data_ptr<acc_t>(), g, ex),
                           g.C, eepi);
        } else {
          using Op = EvalInputDxOp<scalar_t>;
          reduce_pass2<Op>(reduce_pass1<Op>(dy, saved, p, g, ex), g.C, eepi);
        }
        return;
      }
      if (train && o.need_dx) {
        // The persistent path, dx from channel_grad's (k0, a, mean, k3): the input source's chan
        // is params' (mean, w * invstd, b); the output source's (0, b, 1 / (w * invstd)), its
        // tiles holding x_hat / invstd (mean 0 in the sums and in the map).
        const at::Tensor coeffs = at::empty({kGradParams * g.C}, acc_opts);
        const ActEpilogue<acc_t> pepi{o.grads<acc_t>(weight, g),
                                      from_output ? nullptr : o.mean.const_data_ptr<acc_t>(),
                                      coeffs.mutable_data_ptr<acc_t>(),
                                      g.C,
                                      {0, 1, 2, 3},
                                      true};
        if (from_output) {
          const at::Tensor pchan = at::cat({zeros, params.narrow(0, 0, 2 * g.C)});
          if (persistent_act_backward<OutputGradOp<scalar_t>, scalar_t>(
                  dy, saved, o, g, pchan.const_data_ptr<acc_t>(), pepi, coeffs, ex)) {
            return;
          }
        } else if (persistent_act_backward<InputGradOp<scalar_t>, scalar_t>(dy, saved, o, g, p,
                                                                            pepi, coeffs, ex)) {
          return;
        }
      }
      ActEpilogue<acc_t> epi{o.grads<acc_t>(weight, g),
                             nullptr,
                             o.need_dx ? p : nullptr,
                             g.C,
                             {from_output ? 2 : 3, -1, -1, 4},
                             train};
      if (from_output) {
        using Op = OutputGradOp<scalar_t>;
        reduce_pass2<Op>(reduce_pass1<Op>(dy, saved, p, g, ex), g.C, epi);
      } else {
        using Op = InputGradOp<scalar_t>;
        reduce_pass2<Op>(reduce_pass1<Op>(dy, saved, p, g, ex), g.C, epi);
      }
    }
    const at::Tensor dz_out = o.need_dr ? o.dz : at::Tensor();
    if (o.need_dx && from_output) {
      launch<DxFromOutputFn, scalar_t>(dy, saved, r, o.dx, dz_out, at::Tensor(), params, g, act,
                                       slope, train);
    } else if (o.need_dx) {
      launch<DxFromInputFn, scalar_t>(dy, saved, r, o.dx, dz_out, at::Tensor(), params, g, act,
                                      slope, train);
    } else if (o.need_dr && from_output) {
      launch<RecoverFn, scalar_t>(dy, saved, r, o.dz, at::Tensor(), at::Tensor(), params, g, act,
                                  slope);
    } else if (o.need_dr) {
      launch<GradFromInputFn, scalar_t>(dy, saved, r, o.dz, at::Tensor(), at::Tensor(), params, g,
                                        act, slope);
    }
  });
  return o.outputs();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> act_backward(
    const at::Tensor& grad_output, const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool train, int64_t activation,
    double negative_slope, int64_t source, std::array<bool, 4> output_mask) {
  constexpr const char* op = "act_backward";
  Act act;
  ActSource src;
  std::tie(act, src) = check_act_backward_args(grad_output, saved, residual, mask, weight, bias,
                                               mean, invstd, activation, negative_slope, source, op);
  const DeviceGuard guard(saved.device());
  Geometry g;
  const at::Tensor x = canonicalize(saved, g);
  const at::Tensor dy = match_layout(grad_output, x);
  const at::Tensor r = defined(residual) ? match_layout(*residual, x) : at::Tensor();
  const bool need_bn = output_mask[0] || output_mask[1] || output_mask[2];
  if (src == ActSource::kMask && need_bn && g.numel() > 0) {
    return backward_from_mask(dy, x, *mask, g, weight, mean, invstd, train, act, negative_slope,
                              output_mask);
  }
  if (need_bn && g.numel() > 0 && (src == ActSource::kOutput || act != Act::kIdentity)) {
    return backward_recomputed(dy, x, r, g, weight, bias, mean, invstd, train, act,
                               negative_slope, src, output_mask);
  }
  const auto acc_opts = saved.options().dtype(acc_dtype(saved.scalar_type()));
  const at::Tensor w = defined(weight) ? weight->to(acc_opts) : at::ones({g.C}, acc_opts);
  const at::Tensor b = defined(bias) ? bias->to(acc_opts) : at::zeros({g.C}, acc_opts);

  at::Tensor dz = act == Act::kIdentity ? (output_mask[3] ? dy.clone() : dy) : empty_output(x);
  at::Tensor xc;
  if (src == ActSource::kOutput && need_bn) xc = empty_output(x);
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "fusedbn_act_backward", [&] {
      if (src == ActSource::kInput && act != Act::kIdentity) {
        const at::Tensor params = at::cat({mean, invstd * w, b});
        launch<GradFromInputFn, scalar_t>(dy, x, r, dz, at::Tensor(), at::Tensor(), params, g,
                                          act, negative_slope);
      } else if (src == ActSource::kMask) {
        launch<GradFromMaskFn, scalar_t>(dy, at::Tensor(), at::Tensor(), dz, at::Tensor(), *mask,
                                         at::Tensor(), g, act, negative_slope);
      } else if (src == ActSource::kOutput && (need_bn || act != Act::kIdentity)) {
        const at::Tensor params = at::cat({b, (w * invstd).reciprocal()});
        launch<RecoverFn, scalar_t>(dy, x, r, act == Act::kIdentity ? at::Tensor() : dz, xc,
                                    at::Tensor(), params, g, act, negative_slope);
      }
    });
  }

  at::Tensor dx, dw, db;
  if (need_bn) {
    const bool from_output = src == ActSource::kOutput;
    std::tie(dx, dw, db) =
        backward(dz, from_output ? xc : x, weight, from_output ? at::zeros_like(mean) : mean,
                 invstd, train, {output_mask[0], output_mask[1], output_mask[2]});
  } else {
    const auto param_opts = defined(weight) ? saved.options().dtype(weight->scalar_type()) : acc_opts;
    dx = at::empty({0}, saved.options());
    dw = at::empty({0}, param_opts);
    db = at::empty({0}, param_opts);
  }
  at::Tensor dr = output_mask[3] ? dz : at::empty({0}, saved.options());
  return {dx, dw, db, dr};
}

}  // namespace cuda
}  // namespace fusedbn
