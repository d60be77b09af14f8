// Elementwise passes with per-channel constants: over one contiguous run of a single channel
// (an NCHW plane) or over one channels-last row of C values.
//
// The functors see accumulation-type values: vf(const AVec* in, const AVec* k) -> AVec and
// sf(const acc_t* in, const acc_t* k) -> acc_t, with NIn inputs and NK per-channel constants.
#pragma once

#include "vec_io.h"

#include <array>

namespace fusedbn::cpu {

// out[i] = f(in[0][i], ..., k) over len values of one channel (constants k are scalars).
template <int NIn, int NK, typename scalar_t, typename VF, typename SF>
inline void apply_run(const std::array<const scalar_t*, NIn>& in, scalar_t* out, int64_t len,
                      const std::array<acc_type<scalar_t>, NK>& k, const VF& vf, const SF& sf) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  AVec kv[NK > 0 ? NK : 1];
  for (int j = 0; j < NK; ++j) kv[j] = AVec(k[j]);
  int64_t i = 0;
  for (; i + IO::kUnit <= len; i += IO::kUnit) {
    AVec v[NIn][IO::kVecs];
    for (int a = 0; a < NIn; ++a) IO::load(in[a] + i, v[a]);
    AVec r[IO::kVecs];
    for (int j = 0; j < IO::kVecs; ++j) {
      AVec args[NIn];
      for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
      r[j] = vf(args, kv);
    }
    IO::store(out + i, r);
  }
  for (; i < len; ++i) {
    acc_t args[NIn];
    for (int a = 0; a < NIn; ++a) args[a] = static_cast<acc_t>(in[a][i]);
    out[i] = static_cast<scalar_t>(sf(args, k.data()));
  }
}

// out[c] = f(in[0][c], ..., k[0][c], ...) over one row of C channels (constants are arrays).
template <int NIn, int NK, typename scalar_t, typename VF, typename SF>
inline void apply_row(const std::array<const scalar_t*, NIn>& in, scalar_t* out, int64_t C,
                      const std::array<const acc_type<scalar_t>*, NK>& k, const VF& vf,
                      const SF& sf) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  int64_t c = 0;
  for (; c + IO::kUnit <= C; c += IO::kUnit) {
    AVec v[NIn][IO::kVecs];
    for (int a = 0; a < NIn; ++a) IO::load(in[a] + c, v[a]);
    AVec r[IO::kVecs];
    for (int j = 0; j < IO::kVecs; ++j) {
      AVec args[NIn];
      for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
      AVec kv[NK > 0 ? NK : 1];
      for (int b = 0; b < NK; ++b) kv[b] = AVec::loadu(k[b] + c + j * L);
      r[j] = vf(args, kv);
    }
    IO::store(out + c, r);
  }
  for (; c < C; ++c) {
    acc_t args[NIn], kc[NK > 0 ? NK : 1];
    for (int a = 0; a < NIn; ++a) args[a] = static_cast<acc_t>(in[a][c]);
    for (int b = 0; b < NK; ++b) kc[b] = k[b][c];
    out[c] = static_cast<scalar_t>(sf(args, kc));
  }
}

}  // namespace fusedbn::cpu
