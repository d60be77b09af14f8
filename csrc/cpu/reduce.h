// Per-channel reductions over contiguous runs of one channel's values, vectorized.
//
// Statistics: Welford in every SIMD lane of four independent accumulators (so four dependency
// chains are in flight), all lanes in lockstep so that one reciprocal 1/n serves 4 vectors. The
// values left at the end of a run are carried into the next run's first step, so short runs (NCHW
// planes of 7x7) stay on the vector path; only the last < 4 vectors of a chunk go to a scalar
// Welford state. Values are shifted by a per-channel constant (the channel's first value)
// before accumulation: Welford is exact under a shift, and the shifted values are small, so a
// float32 mean of data like 1e4 +- 1e-2 does not absorb its own updates. Lanes are merged with
// Chan's formula in a fixed order; a channel is cut into chunks of kChunk values whose states are
// merged pairwise (tree_merge), which keeps rounding error growth logarithmic in the channel size
// and makes the result independent of the number of threads.
#pragma once

#include "vec_io.h"
#include "welford.h"

#include <algorithm>
#include <vector>

namespace fusedbn::cpu {

// Values of one channel per reduction chunk (a multiple of every unit size).
constexpr int64_t kChunk = 16384;

// Pairwise (tree) merge of states[0..n) in a fixed order; the result is left in states[0].
template <typename acc_t>
void tree_merge_states(WelfordState<acc_t>* states, int64_t n) {
  for (int64_t stride = 1; stride < n; stride *= 2)
    for (int64_t i = 0; i + stride < n; i += 2 * stride) welford_merge(states[i], states[i + stride]);
}

template <typename scalar_t>
struct LaneWelford {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  static constexpr int kAcc = 4;                     // accumulation vectors per step
  static constexpr int kUnitsPerStep = kAcc / IO::kVecs;
  static constexpr int L = AVec::size();
  static constexpr int64_t kStep = kAcc * L;         // values per step

  // Every lane of every accumulator has seen `steps` values.
  AVec mean[kAcc], m2[kAcc];
  int64_t steps = 0;
  // Values carried over from the end of one run to the start of the next (already shifted), so
  // that short runs (small NCHW planes) still go through the vector path in whole steps.
  alignas(64) acc_t staged[kStep];
  int64_t nstaged = 0;
  AVec shift;
  acc_t shift_s;

  explicit LaneWelford(acc_t k) : shift(k), shift_s(k) {
    for (int a = 0; a < kAcc; ++a) mean[a] = m2[a] = AVec(acc_t(0));
  }

  static inline void update(AVec& m, AVec& q, const AVec& x, const AVec& rn) {
    const AVec d = x - m;
    m = at::vec::fmadd(d, rn, m);
    q = at::vec::fmadd(d, x - m, q);
  }

  inline void step(const AVec* v) {
    ++steps;
    const AVec rn(acc_t(1) / static_cast<acc_t>(steps));
    for (int a = 0; a < kAcc; ++a) update(mean[a], m2[a], v[a] - shift, rn);
  }

  inline void stage(const scalar_t* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) staged[nstaged + i] = static_cast<acc_t>(p[i]);
    nstaged += n;
  }

  // Adds len contiguous values.
  inline void push_run(const scalar_t* p, int64_t len) {
    int64_t i = 0;
    if (nstaged > 0) {  // complete the carried step first
      i = std::min(len, kStep - nstaged);
      stage(p, i);
      if (nstaged < kStep) return;
      AVec v[kAcc];
      for (int a = 0; a < kAcc; ++a) v[a] = AVec::loadu(staged + a * L);
      step(v);
      nstaged = 0;
    }
    for (; i + kStep <= len; i += kStep) {
      AVec v[kAcc];
      for (int u = 0; u < kUnitsPerStep; ++u) IO::load(p + i + u * IO::kUnit, v + u * IO::kVecs);
      step(v);
    }
    stage(p + i, len - i);
  }

  // The state of everything pushed, in shifted coordinates.
  WelfordState<acc_t> finish() const {
    // All lanes have the same count, so Chan's merge of two of them needs no division:
    // mean = (ma + mb) / 2, m2 = qa + qb + (mb - ma)^2 * n / 2 with n values on each side. Fold the
    // accumulators, then the lanes, pairwise.
    const AVec half(acc_t(0.5));
    auto fold = [&](AVec& ma, AVec& qa, const AVec& mb, const AVec& qb, int64_t n_each) {
      const AVec d = mb - ma;
      qa = qa + qb + d * d * AVec(static_cast<acc_t>(n_each) * acc_t(0.5));
      ma = (ma + mb) * half;
    };
    AVec m01 = mean[0], q01 = m2[0], m23 = mean[2], q23 = m2[2];
    fold(m01, q01, mean[1], m2[1], steps);
    fold(m23, q23, mean[3], m2[3], steps);
    fold(m01, q01, m23, q23, 2 * steps);
    acc_t mb[L], qb[L];
    m01.store(mb);
    q01.store(qb);
    WelfordState<acc_t> lanes[L];
    for (int l = 0; l < L; ++l) lanes[l] = {mb[l], qb[l], kAcc * steps};
    tree_merge_states(lanes, L);
    WelfordState<acc_t> acc = steps > 0 ? lanes[0] : WelfordState<acc_t>{};
    WelfordState<acc_t> tail;
    for (int64_t i = 0; i < nstaged; ++i) welford_push(tail, staged[i] - shift_s);
    welford_merge(acc, tail);
    return acc;
  }
};

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
  AVec mean;

  explicit LaneGradSums(acc_t m) : mean(m) {
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
    // Leftovers, the last unit partial: its missing lanes load as dy = 0 and add nothing.
    for (; i < len; i += IO::kUnit) {
      const int64_t n = std::min<int64_t>(IO::kUnit, len - i);
      AVec g[IO::kVecs], v[IO::kVecs];
      if (n == IO::kUnit) {
        IO::load(dy + i, g);
        IO::load(x + i, v);
      } else {
        IO::load_partial(dy + i, n, g);
        IO::load_partial(x + i, n, v);
      }
      for (int j = 0; j < IO::kVecs; ++j) {
        sdy[j] = sdy[j] + g[j];
        sdyx[j] = at::vec::fmadd(g[j], v[j] - mean, sdyx[j]);
      }
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
    out_dy = a[0];
    out_dyx = b[0];
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
