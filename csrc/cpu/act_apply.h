// CPU building blocks of the fused batch norm + activation kernels:
//  * VMath for at::vec::Vectorized, so that the formulas of activation.h run on SIMD vectors;
//  * apply_all: an elementwise pass with per-channel constants over a whole canonical tensor
//    (apply_run per NCHW plane, apply_row per channels-last row) in parallel, in units that own
//    whole bytes of a packed per-element mask, with an epilogue per unit;
//  * the packed sign mask: pack_mask (from the output) and grad_from_mask (dz from it).
#pragma once

#include "activation.h"
#include "apply.h"
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace fusedbn {

template <typename T>
struct VMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Cond = V;  // all bits set in the lanes where the condition holds
  static V exp(V v) { return v.exp(); }
  static V tanh(V v) { return v.tanh(); }
  static Cond le0(V v) { return v <= V(T(0)); }
  static Cond gt0(V v) { return v > V(T(0)); }
  static V select(Cond c, V a, V b) { return V::blendv(b, a, c); }
};

namespace cpu {

// Elements per task of the elementwise passes.
constexpr int64_t kApplyGrain = 32768;

template <int NIn, typename T>
inline std::array<const T*, NIn> offset_all(const std::array<const T*, NIn>& p, int64_t off) {
  std::array<const T*, NIn> r;
  for (int a = 0; a < NIn; ++a) r[a] = p[a] + off;
  return r;
}

// out = op(in..., k...) over the canonical tensor g; k are per-channel arrays. Units: NCHW groups
// of planes holding a multiple of 8 elements (1 plane when S % 8 == 0, else 8), channels-last
// groups of 8 rows; epi(e0, e1) runs after each unit on its element range [e0, e1) (e0 % 8 == 0).
template <int NIn, int NK, typename scalar_t, typename Op, typename Epi>
void apply_all(const std::array<const scalar_t*, NIn>& in, scalar_t* out, const Geometry& g,
               const std::array<const acc_type<scalar_t>*, NK>& k, const Op& op, const Epi& epi) {
  using acc_t = acc_type<scalar_t>;
  const int64_t numel = g.numel();
  if (numel == 0) return;
  if (g.layout == Layout::kChannelsLast) {
    const int64_t R = g.rows(), C = g.C;
    const int64_t units = (R + 7) / 8;
    const int64_t grain = std::max<int64_t>(1, kApplyGrain / std::max<int64_t>(8 * C, 1));
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t r1 = std::min(R, 8 * u + 8);
        for (int64_t r = 8 * u; r < r1; ++r)
          apply_row<NIn, NK, scalar_t>(offset_all<NIn>(in, r * C), out + r * C, C, k, op);
        epi(8 * u * C, r1 * C);
      }
    });
    return;
  }
  const int64_t S = g.S, planes = g.N * g.C;
  const int64_t per_unit = S % 8 == 0 ? 1 : 8;
  const int64_t units = (planes + per_unit - 1) / per_unit;
  const int64_t grain = std::max<int64_t>(1, kApplyGrain / std::max<int64_t>(per_unit * S, 1));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p0 = u * per_unit, p1 = std::min(planes, (u + 1) * per_unit);
      for (int64_t p = p0, c = p0 % g.C; p < p1; ++p, c = c + 1 == g.C ? 0 : c + 1) {
        std::array<acc_t, NK> kc;
        for (int j = 0; j < NK; ++j) kc[j] = k[j][c];
        apply_run<NIn, NK, scalar_t>(offset_all<NIn>(in, p * S), out + p * S, S, kc, op);
      }
      epi(u * per_unit * S, p1 * S);
    }
  });
}

struct NoEpilogue {
  void operator()(int64_t, int64_t) const {}
};

#if defined(CPU_CAPABILITY_AVX2)
// 8 values as float lanes (bfloat16 and half widened exactly).
inline __m256 load8_float(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_float(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8_float(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The mask bits of 8 consecutive values: a compare and a movemask.
template <typename scalar_t>
inline unsigned positive_bits8(const scalar_t* y, bool relu) {
  const __m256 v = load8_float(y), zero = _mm256_setzero_ps();
  return static_cast<unsigned>(_mm256_movemask_ps(
      relu ? _mm256_cmp_ps(v, zero, _CMP_NLE_UQ) : _mm256_cmp_ps(v, zero, _CMP_GT_OQ)));
}
template <>
inline unsigned positive_bits8<double>(const double* y, bool relu) {
  const __m256d zero = _mm256_setzero_pd();
  const __m256d lo = _mm256_loadu_pd(y), hi = _mm256_loadu_pd(y + 4);
  const __m256d clo = relu ? _mm256_cmp_pd(lo, zero, _CMP_NLE_UQ) : _mm256_cmp_pd(lo, zero, _CMP_GT_OQ);
  const __m256d chi = relu ? _mm256_cmp_pd(hi, zero, _CMP_NLE_UQ) : _mm256_cmp_pd(hi, zero, _CMP_GT_OQ);
  return static_cast<unsigned>(_mm256_movemask_pd(clo) | (_mm256_movemask_pd(chi) << 4));
}
#endif

// Mask bits [e0, e1) from the output y (e0 % 8 == 0; e1 % 8 == 0 or e1 == numel): one byte per
// 8 values, with a vector compare under AVX2.
template <typename scalar_t>
inline void pack_mask(const scalar_t* y, uint8_t* mask, int64_t e0, int64_t e1, bool relu) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t e = e0; e < e1; e += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, e1 - e));
    unsigned bits = 0;
#if defined(CPU_CAPABILITY_AVX2)
    if (n == 8) {
      mask[e >> 3] = static_cast<uint8_t>(positive_bits8(y + e, relu));
      continue;
    }
#endif
    for (int j = 0; j < n; ++j)
      bits |= static_cast<unsigned>(positive_output(static_cast<acc_t>(y[e + j]), relu)) << j;
    mask[e >> 3] = static_cast<uint8_t>(bits);
  }
}

// Same-size unsigned integer, to move values without converting them.
template <int Bytes>
struct RawBits;
template <> struct RawBits<2> { using type = uint16_t; };
template <> struct RawBits<4> { using type = uint32_t; };
template <> struct RawBits<8> { using type = uint64_t; };

#if defined(CPU_CAPABILITY_AVX2)
// 32 bytes of dy with the values whose mask bit is clear zeroed: the mask bits of the 32 / Bytes
// values, broadcast to every lane, ANDed with the lane's own bit and compared.
template <int Bytes>
inline __m256i keep_masked(__m256i v, uint32_t bits);
template <>
inline __m256i keep_masked<2>(__m256i v, uint32_t bits) {  // 16 values, 2 mask bytes
  const __m256i lane = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                         8192, 16384, static_cast<int16_t>(-32768));
  const __m256i sel = _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits)), lane);
  return _mm256_and_si256(v, _mm256_cmpeq_epi16(sel, lane));
}
template <>
inline __m256i keep_masked<4>(__m256i v, uint32_t bits) {  // 8 values, 1 mask byte
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(static_cast<int32_t>(bits)), lane);
  return _mm256_and_si256(v, _mm256_cmpeq_epi32(sel, lane));
}
template <>
inline __m256i keep_masked<8>(__m256i v, uint32_t bits) {  // 4 values, half a mask byte
  const __m256i lane = _mm256_setr_epi64x(1, 2, 4, 8);
  const __m256i sel = _mm256_and_si256(_mm256_set1_epi64x(bits), lane);
  return _mm256_and_si256(v, _mm256_cmpeq_epi64(sel, lane));
}
#endif

// dz over the flat tensor from the packed mask: relu dz = bit ? dy : 0 (a select on the raw
// bits, like torch's threshold_backward), leaky_relu dz = bit ? dy : slope * dy.
template <typename scalar_t>
void grad_from_mask(const scalar_t* dy, const uint8_t* mask, scalar_t* dz, int64_t numel,
                    bool relu, acc_type<scalar_t> slope) {
  using acc_t = acc_type<scalar_t>;
  using raw_t = typename RawBits<sizeof(scalar_t)>::type;
  at::parallel_for(0, (numel + 7) / 8, kApplyGrain / 8, [&](int64_t b0, int64_t b1) {
    const int64_t e1 = std::min(numel, 8 * b1);
    if (relu) {
      const raw_t* src = reinterpret_cast<const raw_t*>(dy);
      raw_t* dst = reinterpret_cast<raw_t*>(dz);
      int64_t e = 8 * b0;
#if defined(CPU_CAPABILITY_AVX2)
      constexpr int64_t kPer = 32 / sizeof(raw_t);  // values per 32 bytes: 16, 8 or 4
      for (; e + 16 <= e1; e += 16) {  // 2 mask bytes = 16 values = 1, 2 or 4 vectors
        const uint32_t bits = mask[e >> 3] | (static_cast<uint32_t>(mask[(e >> 3) + 1]) << 8);
        for (int64_t k = 0; k < 16; k += kPer) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + e + k));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + e + k),
                              keep_masked<sizeof(raw_t)>(v, bits >> k));
        }
      }
#endif
      for (; e < e1; ++e) dst[e] = ((mask[e >> 3] >> (e & 7)) & 1u) ? src[e] : raw_t(0);
    } else {
      for (int64_t e = 8 * b0; e < e1; ++e) {
        const acc_t g = static_cast<acc_t>(dy[e]);
        dz[e] = static_cast<scalar_t>(((mask[e >> 3] >> (e & 7)) & 1u) ? g : g * slope);
      }
    }
  });
}

}  // namespace cpu
}  // namespace fusedbn
