// The per-channel reductions that the split-reduction kernels of bn_reduce.cuh run, as "ops":
//
//   WelfordOp<T>  input x           -> per channel (n, mean, m2)        forward_train statistics
//   GradOp<T>     inputs dy, x      -> per channel (sum dy, sum dy*(x - mean)), compensated:
//                                      backward, the sync backward_reduce, act_backward
//
// An op has a thread-local state (Thread) that a thread grows from groups of values of one
// channel, a partial state (Partial) that threads, warps, blocks and the grid merge in a fixed
// order, and an optional per-channel parameter (Param: GradOp reads the saved mean).
//
// Welford without a division per value: a thread takes its values in groups of L (a 16-byte
// vector of one plane, or L rows of one channel for channels_last), computes the group's own mean
// and M2 exactly (two passes over registers; the mean is sum * (1/L), a constant for full groups),
// and merges the group into its state with Chan's formula, which needs nb/n = L/(n+L): one
// correctly rounded reciprocal per group, not a division per value. Chan's merge of exact group
// states is as accurate as Welford's update (it is the same recurrence with blocks of L values),
// and the cross-thread merges keep the error growth logarithmic.
//
// WelfordOp accumulates x - shift, shift = the channel's first value x[n=0, c, s=0] (ChannelShift:
// every thread of the channel reads it from global memory; 0 if it is not finite), as the CPU
// backend does: Welford and Chan are exact under a shift, and the shifted values are of the
// data's spread, not of its mean, so a float32 mean of data like 1e4 +- 1e-2 keeps its digits
// (unshifted, the group means and the Chan deltas round at ulp(1e4) ~ 1e-3, a tenth of the
// spread: invstd 1.4 % off). Its states hold the shifted mean; the epilogues add the shift back
// for the saved mean and hand the pair (shift, shifted mean) unrounded to the normalize pass
// (bn_elementwise.cuh), which subtracts them one after the other.
// The merges keep a mean of +-Inf (welford_mean_update, welford.h): a channel holding +Inf gets
// mean +Inf and variance NaN, as in torch, not mean NaN.
//
// GradOp needs no shift: x - mean is taken against the saved mean, of the data's magnitude, so
// the terms dy * (x - mean) are of the spread's size. Its two sums are compensated (CompSum,
// two_sum and the FMA product error: each term enters exactly, the sums are rounded once at the
// end), so that float32 sums are as exact as the CPU backend's float64 accumulation; the cost
// per value is in the comment of GradOp.
#pragma once

#include <ATen/OpMathType.h>

#include "bn_utils.cuh"
#include "welford.h"

namespace fusedbn {
namespace cuda {

// The per-channel shift of WelfordOp: x[c * stride], the first value of channel c of the canonical
// input (stride S for (N, C, S), 1 for channels-last rows), or 0 when that value is +-Inf or NaN.
// Pass 1 and the epilogues read it through this one function, so both see the same value.
template <typename T>
struct ChannelShift {
  const T* x = nullptr;
  int64_t stride = 0;
  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t c) const {
    const acc_t v = static_cast<acc_t>(x[c * stride]);
    return fusedbn::welford_isfinite(v) ? v : acc_t(0);
  }
};

template <typename acc_t>
struct WelfordThread {
  acc_t mean;
  acc_t m2;
  int n;
};

template <typename T>
struct WelfordOp {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kInputs = 1;
  using Thread = WelfordThread<acc_t>;
  using Partial = fusedbn::WelfordState<acc_t>;
  struct Param {
    acc_t shift;
  };

  __device__ __forceinline__ static Thread init() { return {acc_t(0), acc_t(0), 0}; }
  // a: the kernel's ReduceArgs (bn_reduce_kernels.cuh).
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return {ChannelShift<T>{a.in0, a.shift_stride}.template load<acc_t>(c)};
  }

  // Chan's merge of an exact group state (cnt values, mean gmean, M2 gm2) into s.
  __device__ __forceinline__ static void combine(Thread& s, acc_t gmean, acc_t gm2, int cnt) {
    const int n = s.n + cnt;
    const acc_t rn = reciprocal(static_cast<acc_t>(n));
    const acc_t nb_over_n = static_cast<acc_t>(cnt) * rn;
    const acc_t delta = gmean - s.mean;
    s.mean = fusedbn::welford_mean_update(s.mean, gmean, delta, static_cast<acc_t>(s.n) * rn,
                                          nb_over_n);
    s.m2 += gm2 + delta * delta * static_cast<acc_t>(s.n) * nb_over_n;
    s.n = n;
  }

  // All L values of a[] (b[] is unused: one input), shifted by par.shift.
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&a)[L],
                                                  const acc_t (&)[L], Param par) {
    acc_t d[L];
#pragma unroll
    for (int j = 0; j < L; ++j) d[j] = a[j] - par.shift;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < L; ++j) sum += d[j];
    const acc_t gmean = sum * (acc_t(1) / acc_t(L));  // L is a power of two: exact
    acc_t gm2 = acc_t(0);
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const acc_t e = d[j] - gmean;
      gm2 += e * e;
    }
    combine(s, gmean, gm2, L);
  }

  // Values a[lo..hi), 0 <= lo < hi <= L, shifted by par.shift.
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&a)[L], const acc_t (&)[L],
                                              int lo, int hi, Param par) {
    acc_t d[L];
#pragma unroll
    for (int j = 0; j < L; ++j) d[j] = a[j] - par.shift;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < L; ++j)
      if (j >= lo && j < hi) sum += d[j];
    const int cnt = hi - lo;
    const acc_t gmean = sum * reciprocal(static_cast<acc_t>(cnt));
    acc_t gm2 = acc_t(0);
#pragma unroll
    for (int j = 0; j < L; ++j) {
      if (j >= lo && j < hi) {
        const acc_t e = d[j] - gmean;
        gm2 += e * e;
      }
    }
    combine(s, gmean, gm2, cnt);
  }

  __device__ __forceinline__ static Partial finish(const Thread& s) {
    Partial p;
    p.mean = s.mean;
    p.m2 = s.m2;
    p.n = s.n;
    return p;
  }
  __device__ __forceinline__ static Partial empty() { return Partial{}; }
  // welford_merge (welford.h) with one correctly rounded reciprocal 1/n for both
  // weights instead of two IEEE divisions: nb/n = nb * (1/n) rounds twice (within an ulp of the
  // division). The ±Inf handling is welford_mean_update's, as there.
  __device__ __forceinline__ static void merge(Partial& a, const Partial& b) {
    if (b.n == 0) return;
    if (a.n == 0) {
      a = b;
      return;
    }
    const int64_t n = a.n + b.n;
    const acc_t rn = reciprocal(static_cast<acc_t>(n));
    const acc_t na = static_cast<acc_t>(a.n);
    const acc_t nb_over_n = static_cast<acc_t>(b.n) * rn;
    const acc_t delta = b.mean - a.mean;
    a.mean = fusedbn::welford_mean_update(a.mean, b.mean, delta, na * rn, nb_over_n);
    a.m2 += b.m2 + delta * delta * na * nb_over_n;
    a.n = n;
  }
  __device__ __forceinline__ static Partial shfl_down(const Partial& p, int delta) {
    Partial r;
    r.mean = __shfl_down_sync(0xffffffffu, p.mean, delta);
    r.m2 = __shfl_down_sync(0xffffffffu, p.m2, delta);
    r.n = __shfl_down_sync(0xffffffffu, p.n, delta);
    return r;
  }
};

// ---- compensated sums (GradOp) ------------------------------------------------------------
// Error-free transformations in round-to-nearest: two_sum (Knuth: s + e == a + b exactly, 6
// adds, no branch), and the exact error of a product, fma(a, b, -p) == a * b - p. The products
// go through mul_rn (__fmul_rn / __dmul_rn), which nvcc never contracts into an FMA: a product
// fused into the following add would break two_sum's exactness.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename acc_t>
__device__ __forceinline__ acc_t two_sum(acc_t a, acc_t b, acc_t& err) {
  const acc_t s = a + b;
  const acc_t bp = s - a;
  err = (a - (s - bp)) + (b - bp);
  return s;
}

// A sum kept as the unevaluated pair s + c: s the rounded running sum, c the sum of the rounding
// errors two_sum gave back (and of any exact error terms the caller adds). Its error is that of
// c's own plain sum, O(eps^2 * sum|terms|), until value() rounds s + c once.
template <typename acc_t>
struct CompSum {
  acc_t s = acc_t(0);
  acc_t c = acc_t(0);

  __device__ __forceinline__ void add(acc_t v) {
    acc_t e;
    s = two_sum(s, v, e);
    c += e;
  }
  __device__ __forceinline__ void merge(const CompSum& o) {
    add(o.s);
    c += o.c;
  }
  // A non-finite s (an Inf or NaN term, or an overflow) is the plain sum's result; its c is NaN.
  __device__ __forceinline__ acc_t value() const {
    return fusedbn::welford_isfinite(s) ? s + c : s;
  }
};

template <typename acc_t>
struct GradPartial {
  CompSum<acc_t> sum_dy;
  CompSum<acc_t> sum_dy_xmu;  // sum of dy * (x - mean); times invstd gives sum of dy * xhat
};

// Inputs: a = grad_output, b = input. Param: the channel's saved mean.
//
// Both sums are compensated per value, and each term dy * (x - mean) enters exactly: d = x - mean
// with its two_sum error de, the product p = dy * d with its FMA error, so that the term is
// p + (fma(dy, d, -p) + dy * de) up to O(eps^2). The result is the exact sum of the terms
// rounded once (plus O(eps^2) of sum|terms|), whatever the number of values and the split of the
// reduction -- which the CPU backend reaches by accumulating float32 in float64; a plain float32
// sum is off by O(eps sqrt(M)) of its terms' size, several times the rule's bound (issue 13).
// Cost per value: 6 adds for sum dy, 1 sub + 5 adds (de) + 1 mul + 1 FMA + 1 FMA (dy * de) +
// 6 adds + 1 add for sum dy * (x - mean): about 23 flops where the plain sums take 4, and four
// registers of state instead of two. That is cheap on a GPU: this pass is bound by memory (a
// float32 value pair is 8 bytes: an H100's ~3 TB/s is ~375 G values/s, ~9 TFLOP/s at 23 flops,
// against ~60 TFLOP/s of float32; half/bfloat16, 4 bytes, ~18 TFLOP/s), and the adds of a
// thread's K*V values in flight are independent across its two sums. The merges across lanes,
// warps, blocks and partials are two_sum merges too, in the same fixed order as before: the
// same bits for every run, SM count and occupancy. Generic over acc_t (float for float32, half
// and bfloat16 input; double for float64).
template <typename T>
struct GradOp {
  using scalar_t = T;
  using acc_t = at::opmath_type<T>;
  static constexpr int kInputs = 2;
  using Thread = GradPartial<acc_t>;
  using Partial = GradPartial<acc_t>;
  using Param = acc_t;

  __device__ __forceinline__ static Thread init() { return Thread{}; }
  template <class Args>
  __device__ __forceinline__ static Param param(const Args& a, int64_t c) {
    return a.chan[c];
  }

  __device__ __forceinline__ static void push_one(Thread& s, acc_t dy, acc_t x, acc_t mean) {
    s.sum_dy.add(dy);
    acc_t de;
    const acc_t d = two_sum(x, -mean, de);  // d + de == x - mean
    const acc_t p = mul_rn(dy, d);
    s.sum_dy_xmu.add(p);
    s.sum_dy_xmu.c += fma_rn(dy, d, -p) + dy * de;
  }

  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dy)[L],
                                                  const acc_t (&x)[L], Param mean) {
#pragma unroll
    for (int j = 0; j < L; ++j) push_one(s, dy[j], x[j], mean);
  }

  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dy)[L], const acc_t (&x)[L],
                                              int lo, int hi, Param mean) {
#pragma unroll
    for (int j = 0; j < L; ++j)
      if (j >= lo && j < hi) push_one(s, dy[j], x[j], mean);
  }

  __device__ __forceinline__ static Partial finish(const Thread& s) { return s; }
  __device__ __forceinline__ static Partial empty() { return Partial{}; }
  __device__ __forceinline__ static void merge(Partial& a, const Partial& b) {
    a.sum_dy.merge(b.sum_dy);
    a.sum_dy_xmu.merge(b.sum_dy_xmu);
  }
  __device__ __forceinline__ static Partial shfl_down(const Partial& p, int delta) {
    Partial r;
    r.sum_dy.s = __shfl_down_sync(0xffffffffu, p.sum_dy.s, delta);
    r.sum_dy.c = __shfl_down_sync(0xffffffffu, p.sum_dy.c, delta);
    r.sum_dy_xmu.s = __shfl_down_sync(0xffffffffu, p.sum_dy_xmu.s, delta);
    r.sum_dy_xmu.c = __shfl_down_sync(0xffffffffu, p.sum_dy_xmu.c, delta);
    return r;
  }
};

// Eval mode with grad_weight or grad_bias asked for: Base (GradOp, or an op over (dz, x) whose
// parameter is GradOp's, the mean) that also writes dx = in0 * a (a = w * invstd: eval mode's dx
// needs no sums) and, where ReduceArgs::out1 is set, in0 itself (dz, as grad_residual) as the
// reduction loads in0 (the kStoresIn0 hook of bn_reduce_kernels.cuh): one pass reads dy and x and
// writes dx. Param: the channel's (mean, a) from chan [2][C] (eval_dx_params_kernel).
template <class Base>
struct EvalDxOp : Base {
  using acc_t = typename Base::acc_t;
  using Thread = typename Base::Thread;
  struct Param {
    acc_t mean, a;
  };
  static constexpr bool kStoresIn0 = true;

  template <class Args>
  __device__ __forceinline__ static Param param(const Args& args, int64_t c) {
    return {args.chan[c], args.chan[args.C + c]};
  }
  __device__ __forceinline__ static acc_t out_scale(const Param& p) { return p.a; }
  template <int L>
  __device__ __forceinline__ static void push_all(Thread& s, const acc_t (&dy)[L],
                                                  const acc_t (&x)[L], const Param& p) {
    Base::push_all(s, dy, x, p.mean);
  }
  template <int L>
  __device__ __forceinline__ static void push(Thread& s, const acc_t (&dy)[L], const acc_t (&x)[L],
                                              int lo, int hi, const Param& p) {
    Base::push(s, dy, x, lo, hi, p.mean);
  }
};

// EvalDxOp's parameters [2][C]: the saved mean, a = w * invstd.
template <typename acc_t>
__global__ void eval_dx_params_kernel(ChannelPtr weight, const acc_t* mean, const acc_t* invstd,
                                      acc_t* params, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  params[c] = mean[c];
  params[C + c] = weight.load<acc_t>(c, acc_t(1)) * invstd[c];
}

// ---- batch norm's backward per channel, from GradOp's merged sums ------------------------
// With M values per channel and a = w * invstd (the CPU backend's formulas, bn_backward.cu):
// grad_weight = invstd * sum dy (x - mean), grad_bias = sum dy, and the dx coefficients of
// channel_grad (bn_elementwise.cuh) k0 = sum dy / M, k1 = a, k3 = a * invstd^2 * sum dy (x - mean)
// / M, from the compensated sums rounded once. The one place of these formulas: the epilogues of
// backward (bn_backward.cu) and act_backward (bn_act_backward.cu) derive from GradEpilogueBase
// and only place the coefficients where their dx pass reads them.
template <typename acc_t>
struct ChannelDx {
  acc_t k0, a, k3;
};

template <typename acc_t>
struct GradEpilogueBase {
  const acc_t* invstd;
  ChannelPtr weight;
  ChannelPtr grad_weight;  // kNone when not asked for
  ChannelPtr grad_bias;    // kNone when not asked for
  acc_t inv_m;             // 1 / M

  // Stores channel c's grad_weight and grad_bias (those asked for); returns its dx coefficients.
  __device__ __forceinline__ ChannelDx<acc_t> grads(int64_t c, const GradPartial<acc_t>& s) const {
    const acc_t is = invstd[c];
    const acc_t sum_dy = s.sum_dy.value(), sum_dy_xmu = s.sum_dy_xmu.value();
    grad_weight.store(c, sum_dy_xmu * is);
    grad_bias.store(c, sum_dy);
    ChannelDx<acc_t> d;
    d.a = weight.load<acc_t>(c, acc_t(1)) * is;
    d.k0 = sum_dy * inv_m;
    d.k3 = d.a * is * is * sum_dy_xmu * inv_m;
    return d;
  }
};

// Tree merge across a full warp in a fixed order; the result is valid in lane 0.
template <class Op>
__device__ __forceinline__ typename Op::Partial warp_reduce(typename Op::Partial p) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const typename Op::Partial other = Op::shfl_down(p, offset);
    Op::merge(p, other);
  }
  return p;
}

}  // namespace cuda
}  // namespace fusedbn
