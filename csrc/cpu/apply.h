// Elementwise passes with per-channel constants: over one contiguous run of a single channel
// (an NCHW plane) or over one channels-last row of C values.
//
// The functor sees accumulation-type vectors: vf(const AVec* in, const AVec* k) -> AVec, with NIn
// inputs and NK per-channel constants. A partial last unit is loaded zero-padded and stored partially.
#pragma once

#include "vec_io.h"

#include <algorithm>
#include <array>

namespace fusedbn::cpu {

// out[i] = f(in[0][i], ..., k) over len values of one channel (constants k are scalars).
template <int NIn, int NK, typename scalar_t, typename VF>
C10_ALWAYS_INLINE void apply_run(const std::array<const scalar_t*, NIn>& in, scalar_t* out,
                                 int64_t len, const std::array<acc_type<scalar_t>, NK>& k,
                                 const VF& vf) {
  using IO = VecIO<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = acc_type<scalar_t>;
  AVec kv[NK > 0 ? NK : 1];
  for (int j = 0; j < NK; ++j) kv[j] = AVec(k[j]);
  auto unit = [&](int64_t i) {
    AVec v[NIn][IO::kVecs];
    for (int a = 0; a < NIn; ++a) IO::load(in[a] + i, v[a]);
    AVec r[IO::kVecs];
    for (int j = 0; j < IO::kVecs; ++j) {
      AVec args[NIn];
      for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
      r[j] = vf(args, kv);
    }
    IO::store(out + i, r);
  };
  int64_t i = 0;
  for (; i + IO::kUnit <= len; i += IO::kUnit) unit(i);
  const int64_t rem = len - i;
  if (rem == 0) return;
  if (rem <= IO::kUnit / 4) {
    // A few values (a 7x7 plane ends with 1): one at a time, broadcast into a vector, is cheaper
    // than a whole extra unit with its conversions.
    for (; i < len; ++i) {
      AVec args[NIn];
      for (int a = 0; a < NIn; ++a) args[a] = AVec(static_cast<acc_t>(in[a][i]));
      // (A whole-vector store and a scalar load of lane 0: a partial store is a masked store,
      // which the load could not forward from.)
      acc_t r[AVec::size()];
      vf(args, kv).store(r);
      out[i] = static_cast<scalar_t>(r[0]);
    }
    return;
  }
  bool in_place = false;
  for (int a = 0; a < NIn; ++a) in_place = in_place || static_cast<const void*>(in[a]) == out;
  if (len >= IO::kUnit && !in_place) {
    // The last values as one whole unit that overlaps the previous one: rewriting a few outputs
    // with the same values is cheaper than a partial (copied) load and store. (Not in place:
    // the overlap would read outputs as inputs.)
    unit(len - IO::kUnit);
    return;
  }
  AVec v[NIn][IO::kVecs];
  for (int a = 0; a < NIn; ++a) IO::load_partial(in[a] + i, rem, v[a]);
  AVec r[IO::kVecs];
  for (int j = 0; j < IO::kVecs; ++j) {
    AVec args[NIn];
    for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
    r[j] = vf(args, kv);
  }
  IO::store_partial(out + i, rem, r);
}

// apply_run over a run of a long plane, in blocks of 1 KB, asking before each block for the output
// lines kRunAheadBytes further on (up to the run's end; vec_io.h): the per-channel passes, whose
// inputs are still in cache, write a plane at a time, and their stores wait on the lines' reads.
template <int NIn, int NK, typename scalar_t, typename VF>
C10_ALWAYS_INLINE void apply_run_ahead(const std::array<const scalar_t*, NIn>& in, scalar_t* out,
                                       int64_t len,
                                       const std::array<acc_type<scalar_t>, NK>& k, const VF& vf) {
  constexpr int64_t kBlock = 1024 / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t D = run_ahead_values<scalar_t>();
  static_assert(kBlock % VecIO<scalar_t>::kUnit == 0, "blocks of whole units");
  for (int64_t i = 0; i < len; i += kBlock) {
    const int64_t n = std::min(kBlock, len - i);
    const int64_t ahead = std::min(len, i + D + n) - (i + D);
    if (ahead > 0) prefetch_plane<true>(out + i + D, ahead);
    std::array<const scalar_t*, NIn> block;
    for (int a = 0; a < NIn; ++a) block[a] = in[a] + i;
    apply_run<NIn, NK, scalar_t>(block, out + i, n, k, vf);
  }
}

// out[c] = f(in[0][c], ..., k[0][c], ...) over one row of C channels (constants are arrays).
// The pointers are copied into locals first: stores through `out` may alias the caller's arrays,
// and reloading them (and spilling the vectors) around every store cost a third of the pass.
template <int NIn, int NK, typename scalar_t, typename VF>
C10_ALWAYS_INLINE void apply_row(const std::array<const scalar_t*, NIn>& in_arr, scalar_t* out,
                                 int64_t C,
                                 const std::array<const acc_type<scalar_t>*, NK>& k_arr,
                                 const VF& vf) {
  using IO = VecIO<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t L = AVec::size();
  const scalar_t* in[NIn > 0 ? NIn : 1];
  const acc_t* k[NK > 0 ? NK : 1];
  for (int a = 0; a < NIn; ++a) in[a] = in_arr[a];
  for (int b = 0; b < NK; ++b) k[b] = k_arr[b];
  int64_t c = 0;
  for (; c + IO::kUnit <= C; c += IO::kUnit) {
    AVec v[NIn][IO::kVecs];
    for (int a = 0; a < NIn; ++a) IO::load(in[a] + c, v[a]);
    AVec r[IO::kVecs];
    for (int j = 0; j < IO::kVecs; ++j) {
      AVec args[NIn], kv[NK > 0 ? NK : 1];
      for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
      for (int b = 0; b < NK; ++b) kv[b] = AVec::loadu(k[b] + c + j * L);
      r[j] = vf(args, kv);
    }
    IO::store(out + c, r);
  }
  if (c == C) return;
  const int64_t n = C - c;  // a partial last unit: zero-padded loads, partial store
  AVec v[NIn][IO::kVecs];
  for (int a = 0; a < NIn; ++a) IO::load_partial(in[a] + c, n, v[a]);
  AVec r[IO::kVecs];
  for (int j = 0; j < IO::kVecs; ++j) {
    const int64_t nj = std::clamp<int64_t>(n - j * L, 0, L);
    if (nj == 0) {
      r[j] = AVec(0);
      continue;
    }
    AVec args[NIn], kv[NK > 0 ? NK : 1];
    for (int a = 0; a < NIn; ++a) args[a] = v[a][j];
    for (int b = 0; b < NK; ++b)
      kv[b] = nj == L ? AVec::loadu(k[b] + c + j * L) : AVec::loadu(k[b] + c + j * L, nj);
    r[j] = vf(args, kv);
  }
  IO::store_partial(out + c, n, r);
}

}  // namespace fusedbn::cpu
