// Per-channel reductions over contiguous runs of one channel's values, vectorized.
//
// Statistics: Welford in every SIMD lane of four independent accumulators (so four dependency
// chains are in flight), all lanes in lockstep so that one reciprocal 1/n serves 4 vectors; units
// that do not fill a whole step go to a fifth single-unit accumulator and the last few values to a
// scalar Welford state. Values are shifted by a per-channel constant (the channel's first value)
// before accumulation: Welford is exact under a shift, and the shifted values are small, so a
// float32 mean of data like 1e4 +- 1e-2 does not absorb its own updates. Lanes are merged with
// Chan's formula in a fixed order; a channel is cut into chunks of kChunk values whose states are
// merged pairwise (tree_merge), which keeps rounding error growth logarithmic in the channel size
// and makes the result independent of the number of threads.
#pragma once

#include "vec_io.h"
#include "welford.h"

#include <vector>

namespace fusedbn::cpu {

// Values of one channel per reduction chunk (a multiple of every unit size).
constexpr int64_t kChunk = 16384;

template <typename scalar_t>
struct LaneWelford {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  static constexpr int kAcc = 4;                     // accumulation vectors per step
  static constexpr int kUnitsPerStep = kAcc / IO::kVecs;
  static constexpr int64_t kStep = kUnitsPerStep * IO::kUnit;

  AVec mean[kAcc], m2[kAcc];
  int64_t steps = 0;
  AVec mean1[IO::kVecs], m21[IO::kVecs];
  int64_t steps1 = 0;
  WelfordState<acc_t> tail;
  AVec shift;
  acc_t shift_s;

  explicit LaneWelford(acc_t k) : shift(k), shift_s(k) {
    for (int a = 0; a < kAcc; ++a) mean[a] = m2[a] = AVec(acc_t(0));
    for (int j = 0; j < IO::kVecs; ++j) mean1[j] = m21[j] = AVec(acc_t(0));
  }

  static inline void update(AVec& m, AVec& q, const AVec& x, const AVec& rn) {
    const AVec d = x - m;
    m = at::vec::fmadd(d, rn, m);
    q = at::vec::fmadd(d, x - m, q);
  }

  // Adds len contiguous values.
  inline void push_run(const scalar_t* p, int64_t len) {
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      ++steps;
      const AVec rn(acc_t(1) / static_cast<acc_t>(steps));
      AVec v[kAcc];
      for (int u = 0; u < kUnitsPerStep; ++u) IO::load(p + i + u * IO::kUnit, v + u * IO::kVecs);
      for (int a = 0; a < kAcc; ++a) update(mean[a], m2[a], v[a] - shift, rn);
    }
    for (; i + IO::kUnit <= len; i += IO::kUnit) {
      ++steps1;
      const AVec rn(acc_t(1) / static_cast<acc_t>(steps1));
      AVec v[IO::kVecs];
      IO::load(p + i, v);
      for (int j = 0; j < IO::kVecs; ++j) update(mean1[j], m21[j], v[j] - shift, rn);
    }
    for (; i < len; ++i) welford_push(tail, static_cast<acc_t>(p[i]) - shift_s);
  }

  // The state of everything pushed, in shifted coordinates.
  WelfordState<acc_t> finish() const {
    constexpr int L = AVec::size();
    acc_t mb[kAcc][L], qb[kAcc][L];
    for (int a = 0; a < kAcc; ++a) {
      mean[a].store(mb[a]);
      m2[a].store(qb[a]);
    }
    // Lanes of the four accumulators, merged pairwise: (0,1) (2,3) then the two halves.
    WelfordState<acc_t> acc;
    for (int l = 0; l < L; ++l) {
      WelfordState<acc_t> lane[kAcc];
      for (int a = 0; a < kAcc; ++a) lane[a] = {mb[a][l], qb[a][l], steps};
      welford_merge(lane[0], lane[1]);
      welford_merge(lane[2], lane[3]);
      welford_merge(lane[0], lane[2]);
      welford_merge(acc, lane[0]);
    }
    for (int j = 0; j < IO::kVecs; ++j) {
      acc_t m1[L], q1[L];
      mean1[j].store(m1);
      m21[j].store(q1);
      for (int l = 0; l < L; ++l) welford_merge(acc, WelfordState<acc_t>{m1[l], q1[l], steps1});
    }
    welford_merge(acc, tail);
    return acc;
  }
};

// Pairwise (tree) merge of states[0..n) in a fixed order; the result is left in states[0].
template <typename acc_t>
void tree_merge(WelfordState<acc_t>* states, int64_t n) {
  for (int64_t stride = 1; stride < n; stride *= 2)
    for (int64_t i = 0; i + stride < n; i += 2 * stride) welford_merge(states[i], states[i + stride]);
}

// Pairwise sum of values[k * step] for k in [0, n); the result is left in values[0].
template <typename acc_t>
void tree_sum(acc_t* values, int64_t n, int64_t step = 1) {
  for (int64_t stride = 1; stride < n; stride *= 2)
    for (int64_t i = 0; i + stride < n; i += 2 * stride) values[i * step] += values[(i + stride) * step];
}

// Sums of dy and of dy * (x - mean) over contiguous runs of one channel (the backward reductions).
template <typename scalar_t>
struct LaneGradSums {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  static constexpr int kAcc = 4;
  static constexpr int kUnitsPerStep = kAcc / IO::kVecs;
  static constexpr int64_t kStep = kUnitsPerStep * IO::kUnit;

  AVec sdy[kAcc], sdyx[kAcc];
  acc_t tail_dy = 0, tail_dyx = 0;
  AVec mean;
  acc_t mean_s;

  explicit LaneGradSums(acc_t m) : mean(m), mean_s(m) {
    for (int a = 0; a < kAcc; ++a) sdy[a] = sdyx[a] = AVec(acc_t(0));
  }

  inline void push_run(const scalar_t* dy, const scalar_t* x, int64_t len) {
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      AVec g[kAcc], v[kAcc];
      for (int u = 0; u < kUnitsPerStep; ++u) {
        IO::load(dy + i + u * IO::kUnit, g + u * IO::kVecs);
        IO::load(x + i + u * IO::kUnit, v + u * IO::kVecs);
      }
      for (int a = 0; a < kAcc; ++a) {
        sdy[a] = sdy[a] + g[a];
        sdyx[a] = at::vec::fmadd(g[a], v[a] - mean, sdyx[a]);
      }
    }
    for (; i + IO::kUnit <= len; i += IO::kUnit) {
      AVec g[IO::kVecs], v[IO::kVecs];
      IO::load(dy + i, g);
      IO::load(x + i, v);
      for (int j = 0; j < IO::kVecs; ++j) {
        sdy[j] = sdy[j] + g[j];
        sdyx[j] = at::vec::fmadd(g[j], v[j] - mean, sdyx[j]);
      }
    }
    for (; i < len; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      tail_dy += g;
      tail_dyx += g * (static_cast<acc_t>(x[i]) - mean_s);
    }
  }

  // (sum dy, sum dy * (x - mean)) of everything pushed.
  void finish(acc_t& out_dy, acc_t& out_dyx) const {
    constexpr int L = AVec::size();
    acc_t a[kAcc * L], b[kAcc * L];
    for (int k = 0; k < kAcc; ++k) {
      sdy[k].store(a + k * L);
      sdyx[k].store(b + k * L);
    }
    tree_sum(a, kAcc * L);
    tree_sum(b, kAcc * L);
    out_dy = a[0] + tail_dy;
    out_dyx = b[0] + tail_dyx;
  }
};

// Calls f(ptr_offset, len) for the contiguous runs that make up values [begin, end) of channel c
// in a (N, C, S) tensor, where value i of the channel lives at (i / S) * C * S + c * S + i % S.
template <typename F>
inline void for_each_run(int64_t C, int64_t S, int64_t c, int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t n = i / S, s = i % S;
    const int64_t len = std::min(S - s, end - i);
    f((n * C + c) * S + s, len);
    i += len;
  }
}

inline int64_t num_chunks(int64_t count, int64_t chunk) { return (count + chunk - 1) / chunk; }

}  // namespace fusedbn::cpu
