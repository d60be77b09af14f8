// The activations that follow a fused batch norm, written once for the C++ (scalar and SIMD) and
// the CUDA kernels.
//
// Every formula is a template over a value type V: float or double (host and device), or a SIMD
// vector (the CPU kernels specialize VMath for at::vec::Vectorized in cpu/act_vec.h). VMath<V>
// gives the few primitives the formulas need (exp, tanh, comparisons with 0 and a select).
//
//   act         f(z)                                  grad(z, g) = g * f'(z)
//   identity    z                                     g
//   relu        z <= 0 ? 0 : z   (NaN stays NaN)      z <= 0 ? 0 : g   (a select, as torch's
//                                                       threshold_backward: NaN passes g, and an
//                                                       infinite g is not turned into 0 * inf)
//   leaky_relu  z > 0 ? z : slope * z                 z > 0 ? g : g * slope   (torch's convention)
//   silu        z / (1 + exp(-z))                     g s (1 + z (1 - s)),  s = 1 / (1 + exp(-z))
//   gelu_tanh   z/2 (1 + tanh(k0 (z + k1 z^3)))       torch's GeluBackward (approximate='tanh')
//
// The sign of the activation's input, the only thing relu/leaky_relu's backward needs, is also
// the sign of the output (for slope >= 0): positive_output(y) is the bit that the forward stores in
// the packed mask and that the memory-saving backward reads from the output. The invertible ones
// (identity, leaky_relu with slope > 0) give z back from y: inverse(y) = y > 0 ? y : y / slope.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "welford.h"  // FUSEDBN_HOST_DEVICE

namespace fusedbn {

// The integer codes of the `activation` argument of the act_* operators (fusedbn/act_ops.py
// has the same table).
enum class Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kSilu = 3,
  kGeluTanh = 4,
};
constexpr int64_t kNumActs = 5;

// Where the backward finds what it needs (the `source` argument of act_backward):
enum class ActSource : int64_t {
  kInput = 0,   // saved = x (and residual): z is recomputed, f'(z) evaluated
  kMask = 1,    // saved = x and the packed sign mask of z (relu, leaky_relu)
  kOutput = 2,  // saved = y (and residual): memory-saving, z = inverse(y), x_hat recovered
};

template <typename V>
struct VMath;  // primitives for a value type; float and double here, SIMD vectors in cpu/act_vec.h

template <typename T>
struct ScalarMath {
  using Cond = bool;
  static FUSEDBN_HOST_DEVICE T exp(T v);
  static FUSEDBN_HOST_DEVICE T tanh(T v);
  static FUSEDBN_HOST_DEVICE Cond le0(T v) { return v <= T(0); }
  static FUSEDBN_HOST_DEVICE Cond gt0(T v) { return v > T(0); }
  static FUSEDBN_HOST_DEVICE T select(Cond c, T a, T b) { return c ? a : b; }
};
template <>
FUSEDBN_HOST_DEVICE float ScalarMath<float>::exp(float v) { return expf(v); }
template <>
FUSEDBN_HOST_DEVICE float ScalarMath<float>::tanh(float v) { return tanhf(v); }
template <>
FUSEDBN_HOST_DEVICE double ScalarMath<double>::exp(double v) { return ::exp(v); }
template <>
FUSEDBN_HOST_DEVICE double ScalarMath<double>::tanh(double v) { return ::tanh(v); }

template <>
struct VMath<float> : ScalarMath<float> {};
template <>
struct VMath<double> : ScalarMath<double> {};

template <Act A>
struct ActFn;

template <>
struct ActFn<Act::kIdentity> {
  template <typename V>
  static FUSEDBN_HOST_DEVICE V f(V z, V) { return z; }
  template <typename V>
  static FUSEDBN_HOST_DEVICE V grad(V, V g, V) { return g; }
};

template <>
struct ActFn<Act::kRelu> {
  template <typename V>
  static FUSEDBN_HOST_DEVICE V f(V z, V) { return VMath<V>::select(VMath<V>::le0(z), V(0), z); }
  template <typename V>
  static FUSEDBN_HOST_DEVICE V grad(V z, V g, V) {
    return VMath<V>::select(VMath<V>::le0(z), V(0), g);
  }
};

template <>
struct ActFn<Act::kLeakyRelu> {
  template <typename V>
  static FUSEDBN_HOST_DEVICE V f(V z, V slope) {
    return VMath<V>::select(VMath<V>::gt0(z), z, z * slope);
  }
  template <typename V>
  static FUSEDBN_HOST_DEVICE V grad(V z, V g, V slope) {
    return VMath<V>::select(VMath<V>::gt0(z), g, g * slope);
  }
};

template <>
struct ActFn<Act::kSilu> {
  template <typename V>
  static FUSEDBN_HOST_DEVICE V f(V z, V) { return z / (V(1) + VMath<V>::exp(V(0) - z)); }
  template <typename V>
  static FUSEDBN_HOST_DEVICE V grad(V z, V g, V) {
    const V s = V(1) / (V(1) + VMath<V>::exp(V(0) - z));
    return g * s * (V(1) + z * (V(1) - s));
  }
};

template <>
struct ActFn<Act::kGeluTanh> {
  // torch's constants: k0 = sqrt(2 / pi), k1 = 0.044715.
  static constexpr double kBeta = 0.7978845608028654;
  static constexpr double kKappa = 0.044715;
  template <typename V>
  static FUSEDBN_HOST_DEVICE V f(V z, V) {
    const V inner = V(kBeta) * (z + V(kKappa) * z * z * z);
    return V(0.5) * z * (V(1) + VMath<V>::tanh(inner));
  }
  template <typename V>
  static FUSEDBN_HOST_DEVICE V grad(V z, V g, V) {
    const V z2 = z * z;
    const V t = VMath<V>::tanh(V(kBeta) * (z + V(kKappa) * z2 * z));
    const V left = V(0.5) * z;
    const V right = V(1) + t;
    return g * (V(0.5) * right + left * (V(1) - t * t) * V(kBeta) * (V(1) + V(3 * kKappa) * z2));
  }
};

// The mask bit of an output value y: set where the backward takes the activation's identity
// branch (relu: !(y <= 0), so NaN passes the gradient as in torch; leaky_relu: y > 0).
template <typename T>
FUSEDBN_HOST_DEVICE bool positive_output(T y, bool relu) {
  return relu ? !(y <= T(0)) : y > T(0);
}

// z from y for leaky_relu (slope > 0); identity is slope = 1.
template <typename V>
FUSEDBN_HOST_DEVICE V inverse_leaky(V y, V inv_slope) {
  return VMath<V>::select(VMath<V>::gt0(y), y, y * inv_slope);
}

// Calls f(std::integral_constant<Act, A>{}) for the run-time activation code (host and device).
template <typename F>
FUSEDBN_HOST_DEVICE void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kIdentity: f(std::integral_constant<Act, Act::kIdentity>{}); break;
    case Act::kRelu: f(std::integral_constant<Act, Act::kRelu>{}); break;
    case Act::kLeakyRelu: f(std::integral_constant<Act, Act::kLeakyRelu>{}); break;
    case Act::kSilu: f(std::integral_constant<Act, Act::kSilu>{}); break;
    case Act::kGeluTanh: f(std::integral_constant<Act, Act::kGeluTanh>{}); break;
  }
}

}  // namespace fusedbn
