// Per-channel reductions over contiguous runs of one channel's values, vectorized.
//
// Statistics: Welford in every SIMD lane of four independent accumulators (so four dependency
// chains are in flight), all lanes in lockstep so that one reciprocal 1/n serves 4 vectors; the
// last < 4 vectors of a run (and a short run, cut by a chunk boundary) are reduced by an exact
// two-pass over the run (still in L1) and merged with Chan's formula. Small NCHW planes (7x7,
// 14x14) take nchw_moments_state instead, one pass of sums around a center per chunk. Values are shifted by a
// per-channel constant (the channel's first value) before accumulation: Welford is exact under a
// shift, and the shifted values are small, so a float32 mean of data like 1e4 +- 1e-2 does not
// absorb its own updates. Lanes are merged with Chan's formula in a fixed order; a channel is cut
// into chunks of kChunk values whose states are merged pairwise (tree_merge), which keeps rounding
// error growth logarithmic in the channel size and makes the result independent of the number of
// threads.
//
// Everything here accumulates in the reductions' type red_type<scalar_t> (vec_io.h RedIO): float64
// for float32 input, as torch's CPU kernels do, float32 for half/bfloat16, float64 for float64.
#pragma once

#include "vec_io.h"
#include "welford.h"

#include <algorithm>
#include <limits>
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

// ---- non-finite values ---------------------------------------------------------------------
// The fast reductions below assume finite values: a +-Inf makes Welford's next delta inf - inf, a
// pivot or shift of +-Inf makes every difference non-finite, so their state of a chunk holding
// +-Inf or NaN has a NaN mean or m2 (never a finite one: an infinite value's square or delta
// reaches m2). Every chunk's state is therefore checked (a test per chunk and channel, nothing per
// value), and one that is not finite is rebuilt from a scan of the chunk's values
// (nonfinite_state): mean +Inf / -Inf when its non-finite values are infinities of one sign, NaN
// otherwise, and m2 NaN -- torch's mean and variance ((inf - inf)^2) of such a channel. The chunks
// are then merged with welford_merge, whose mean update keeps +-Inf (welford.h). Finite data never
// takes these paths: its results are unchanged bit for bit.

// The channel's shift (its first value): 0 when that is not finite, so that x - shift stays
// finite for the channel's finite values and a shift of +-Inf never reaches the mean.
template <typename acc_t>
inline acc_t finite_shift(acc_t first) {
  return welford_isfinite(first) ? first : acc_t(0);
}

template <typename acc_t>
inline bool state_is_finite(const WelfordState<acc_t>& s) {
  return welford_isfinite(s.mean) && welford_isfinite(s.m2);
}

// True when every value of a[0..n) is finite: x * 0 + s stays 0 for finite x, NaN otherwise (one
// vector operation per L values, for the channel-wide checks of the channels-last chunks).
template <typename acc_t>
inline bool all_finite(const acc_t* a, int64_t n) {
  using AVec = Vectorized<acc_t>;
  constexpr int64_t L = AVec::size();
  const AVec zero(acc_t(0));
  AVec s = zero;
  int64_t i = 0;
  for (; i + L <= n; i += L) s = at::vec::fmadd(AVec::loadu(a + i), zero, s);
  acc_t b[L];
  s.store(b);
  acc_t t = acc_t(0);
  for (int64_t l = 0; l < L; ++l) t += b[l];
  for (; i < n; ++i) t += a[i] * acc_t(0);
  return t == acc_t(0);  // (false for NaN)
}

// Which non-finite values a scan met.
struct NonFiniteScan {
  bool pos_inf = false, neg_inf = false, nan = false;

  // len values at p, p + stride, ...
  template <typename scalar_t>
  void add(const scalar_t* p, int64_t len, int64_t stride = 1) {
    using acc_t = red_type<scalar_t>;
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = static_cast<acc_t>(p[i * stride]);
      if (welford_isfinite(v)) continue;
      if (v != v) {
        nan = true;
      } else if (v > acc_t(0)) {
        pos_inf = true;
      } else {
        neg_inf = true;
      }
    }
  }
  bool any() const { return pos_inf || neg_inf || nan; }
};

// The state of n values whose fast state `fast` is not finite, from the scan of those values:
// mean +-Inf for infinities of one sign (and no NaN), else NaN; m2 NaN. A scan that met no
// non-finite value (finite values whose sums overflowed) keeps the fast state.
template <typename acc_t>
inline WelfordState<acc_t> nonfinite_state(const NonFiniteScan& scan,
                                           const WelfordState<acc_t>& fast) {
  if (!scan.any()) return fast;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t mean = scan.nan || (scan.pos_inf && scan.neg_inf) ? nan : scan.pos_inf ? inf : -inf;
  return {mean, nan, fast.n};
}

// welford_mean_update on vectors: ma + d * fb where d = mb - ma is finite, ma * fa + mb * fb
// elsewhere (fa = na / n, fb = nb / n).
template <typename acc_t>
inline Vectorized<acc_t> vec_mean_update(const Vectorized<acc_t>& ma, const Vectorized<acc_t>& mb,
                                         const Vectorized<acc_t>& d, const Vectorized<acc_t>& fa,
                                         const Vectorized<acc_t>& fb) {
  using AVec = Vectorized<acc_t>;
  const AVec delta_form = ma + d * fb;
  const AVec finite = (d - d) == AVec(acc_t(0));  // all-ones lanes where d is finite
  return AVec::blendv(ma * fa + mb * fb, delta_form, finite);
}

template <typename scalar_t>
struct LaneWelford {
  using IO = RedIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  static constexpr int kAcc = 4;                     // accumulation vectors per step
  static constexpr int kUnitsPerStep = kAcc / IO::kVecs;
  static constexpr int L = AVec::size();
  static constexpr int64_t kStep = kAcc * L;         // values per step
  // Runs shorter than this are summarised on their own by an exact two-pass in L1 and merged with
  // Chan's formula: the lockstep lanes would leave most of such a run to a scalar tail.
  static constexpr int64_t kShortRun = 4 * kStep;

  // Every lane of every accumulator has seen `steps` values.
  AVec mean[kAcc], m2[kAcc];
  int64_t steps = 0;
  // Short runs and the tails (< kStep values) of long runs, merged run by run.
  WelfordState<acc_t> runs;
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

  static inline acc_t lane_sum(const AVec& v) {
    acc_t b[L];
    v.store(b);
    for (int l = 1; l < L; ++l) b[0] += b[l];
    return b[0];
  }

  // The shifted state of n > 0 contiguous values: their mean, then the squared deviations from it
  // (the values are re-read from L1).
  inline WelfordState<acc_t> run_state(const scalar_t* p, int64_t n) const {
    AVec s[IO::kVecs];
    for (int j = 0; j < IO::kVecs; ++j) s[j] = AVec(acc_t(0));
    int64_t i = 0;
    for (; i + IO::kUnit <= n; i += IO::kUnit) {
      AVec v[IO::kVecs];
      IO::load(p + i, v);
      for (int j = 0; j < IO::kVecs; ++j) s[j] = s[j] + (v[j] - shift);
    }
    for (int j = 1; j < IO::kVecs; ++j) s[0] = s[0] + s[j];
    acc_t sum = lane_sum(s[0]);
    for (int64_t t = i; t < n; ++t) sum += static_cast<acc_t>(p[t]) - shift_s;
    const acc_t m = sum / static_cast<acc_t>(n);
    const AVec mv(m);
    for (int j = 0; j < IO::kVecs; ++j) s[j] = AVec(acc_t(0));
    for (i = 0; i + IO::kUnit <= n; i += IO::kUnit) {
      AVec v[IO::kVecs];
      IO::load(p + i, v);
      for (int j = 0; j < IO::kVecs; ++j) {
        const AVec d = (v[j] - shift) - mv;
        s[j] = at::vec::fmadd(d, d, s[j]);
      }
    }
    for (int j = 1; j < IO::kVecs; ++j) s[0] = s[0] + s[j];
    acc_t q = lane_sum(s[0]);
    for (int64_t t = i; t < n; ++t) {
      const acc_t d = (static_cast<acc_t>(p[t]) - shift_s) - m;
      q += d * d;
    }
    return {m, q, n};
  }

  // Adds len contiguous values. The values up to p + stream (a plane's end: stream >= len) are
  // asked for kRunAheadBytes ahead as the run is read.
  inline void push_run(const scalar_t* p, int64_t len, int64_t stream = 0) {
    if (len <= 0) return;
    if (len < kShortRun) {
      welford_merge(runs, run_state(p, len));
      return;
    }
    constexpr int64_t D = run_ahead_values<scalar_t>();
    constexpr int64_t kStepBytes = kStep * static_cast<int64_t>(sizeof(scalar_t));
    static_assert(kStepBytes == 64 || kStepBytes == 128, "a step is one or two cache lines");
    const int64_t ahead_end = stream - D;
    // Locals for the run, so that the states stay in registers (see nchw_deviation_sum).
    AVec m[kAcc], q[kAcc];
    for (int a = 0; a < kAcc; ++a) m[a] = mean[a], q[a] = m2[a];
    const AVec sh = shift;
    int64_t i = 0, n = steps;
    for (; i + kStep <= len; i += kStep) {
      if (i < ahead_end) {
        const char* ahead = reinterpret_cast<const char*>(p + i + D);
        __builtin_prefetch(ahead);
        if constexpr (kStepBytes > 64) __builtin_prefetch(ahead + 64);
      }
      AVec v[kAcc];
      for (int u = 0; u < kUnitsPerStep; ++u) IO::load(p + i + u * IO::kUnit, v + u * IO::kVecs);
      const AVec rn(acc_t(1) / static_cast<acc_t>(++n));
      for (int a = 0; a < kAcc; ++a) update(m[a], q[a], v[a] - sh, rn);
    }
    steps = n;
    for (int a = 0; a < kAcc; ++a) mean[a] = m[a], m2[a] = q[a];
    if (i < len) welford_merge(runs, run_state(p + i, len - i));
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
    welford_merge(acc, runs);
    return acc;
  }
};

// Pairwise sum of values[k * step] for k in [0, n); the result is left in values[0].
template <typename acc_t>
void tree_sum(acc_t* values, int64_t n, int64_t step = 1) {
  for (int64_t stride = 1; stride < n; stride *= 2)
    for (int64_t i = 0; i + stride < n; i += 2 * stride) values[i * step] += values[(i + stride) * step];
}

// A channel's planes are C * S values apart: with small planes that stride defeats the hardware
// prefetchers and the walk down a channel waits on memory plane by plane. The plane-walking
// reductions ask for the plane kPrefetchPlanes ahead (all its cache lines) when planes are small.
constexpr int64_t kPrefetchPlanes = 4;
constexpr int64_t kPrefetchMaxPlaneBytes = 4096;

// (prefetch_plane, vec_io.h, asks for a whole plane: kWrite when the per-channel passes are about
// to write their outputs at the same stride.) Longer planes are streamed ahead instead
// (kRunAheadBytes, vec_io.h).

// Planes [n0, n1) of channel c of a (N, C, S) tensor. The per-channel passes prefetch
// kPrefetchPlanes planes ahead as they walk a channel, so the planes a walk starts on would be
// waited for: they are asked for one pass early with this (32x512x7x7 float32 forward: 0.91-0.96x
// the time, cold).
template <bool kWrite = false, typename scalar_t>
inline void prefetch_planes(const scalar_t* t, int64_t C, int64_t S, int64_t c, int64_t n0,
                            int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) prefetch_plane<kWrite>(t + (n * C + c) * S, S);
}

template <typename scalar_t>
inline bool is_small_plane(int64_t S) {
  return S * static_cast<int64_t>(sizeof(scalar_t)) <= kPrefetchMaxPlaneBytes;
}

// The walk over values [begin, end) of one channel of a (N, C, S) tensor, run by run (value i of
// the channel is value i % S of the plane of sample i / S):
//   for (PlaneRuns w(S, begin, end); w; w.next()) { ... w.n, w.s, w.len ... }
// visits sample w.n's run of w.len values from offset w.s of its plane, in order. Every
// plane-walking reduction goes through it (the per-channel ones below, the channel blocks of
// bn_forward.cpp). A cursor rather than a callback: the loop bodies stay in their functions, where
// their sums stay in registers from one short run to the next and their prefetches are kept (GCC
// 12 drops prefetches that sit in a lambda under an `if`). One division per walk: with 7x7 planes
// a division pair per run cost more than the run.
struct PlaneRuns {
  int64_t S, end, n, s, len, done;
  PlaneRuns(int64_t S_, int64_t begin, int64_t end_)
      : S(S_), end(end_), n(begin < end_ ? begin / S_ : 0), s(begin < end_ ? begin % S_ : 0),
        len(std::min(S_ - s, end_ - begin)), done(begin) {}
  explicit operator bool() const { return done < end; }
  void next() {
    done += len;
    s = 0;
    ++n;
    len = std::min(S, end - done);
  }
  // True when the plane of the sample `planes` ahead starts inside [begin, end) (the one that the
  // walks prefetch).
  bool starts_inside(int64_t planes) const { return (n + planes) * S < end; }
};

// f(offset, len) for the contiguous runs of values [begin, end) of channel c of a (N, C, S)
// tensor, the offset counted from the tensor's start.
template <typename F>
inline void for_each_run(int64_t C, int64_t S, int64_t c, int64_t begin, int64_t end, const F& f) {
  for (PlaneRuns w(S, begin, end); w; w.next()) f((w.n * C + c) * S + w.s, w.len);
}


// The shifted state of values [begin, end) of channel c of a (N, C, S) tensor, for small planes
// (where Welford's lockstep lanes would leave much of every plane to a scalar tail), in ONE pass:
// the sums of d and d^2, d = (x - shift) - center, from which mean = center + sum d / n and
// m2 = sum d^2 - (sum d)^2 / n. A plane is whole units plus one masked unit, with no per-plane
// reduction or division; the runs are walked here, not through a callback, so that the sums stay
// in registers from one short run to the next.
//
// The center is the mean of the chunk's first run (one plane, or what of it lies in the chunk):
// a run of r values at distance D from the chunk's mean puts r * D^2 into m2, so D^2 <= m2 / r
// and the cancellation in m2 costs at most a factor 1 + n / r (the number of planes, a few hundred
// at most here) times the sums' own rounding -- typically a factor of about 1. In float64 (float32
// input: differences and squares of float32 values are exact there) that is far below a float32
// rounding; in float32 (half/bfloat16 input) far below a bfloat16 one. It replaced an exact
// two-pass over a gathered copy of the chunk, whose second pass (and, with float64 sums, a copy
// twice the input's size) cost more than the arithmetic saved.
// The sums of nchw_moments_state for one chunk of one channel, run by run: start() with the
// chunk's first run, add() every run (the first again), finish(). The per-channel walk below and
// the channel-block walk of the small-plane forward (bn_forward.cpp) both accumulate through it,
// so a channel's state has the same bits whichever walk (and thread count) computed it.
template <typename scalar_t>
struct PlaneMoments {
  using IO = RedIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  static constexpr int K = IO::kVecs;
  static constexpr int64_t L = AVec::size();
  acc_t center_s;  // in shifted coordinates
  acc_t pivot_s;   // d = x - pivot
  AVec a0[K], a1[K], q0[K], q1[K];

  inline void start(const scalar_t* p, int64_t len, acc_t shift_s) {
    acc_t sum = 0;
    for (int64_t i = 0; i < len; ++i) sum += static_cast<acc_t>(p[i]) - shift_s;
    center_s = sum / static_cast<acc_t>(len);
    pivot_s = shift_s + center_s;
    const AVec zero(acc_t(0));
    for (int j = 0; j < K; ++j) a0[j] = a1[j] = q0[j] = q1[j] = zero;
  }

  inline void add(const scalar_t* p, int64_t len) {
    const AVec pivot(pivot_s), zero(acc_t(0));
    int64_t i = 0;
    for (; i + 2 * IO::kUnit <= len; i += 2 * IO::kUnit) {
      AVec v0[K], v1[K];
      IO::load(p + i, v0);
      IO::load(p + i + IO::kUnit, v1);
      for (int j = 0; j < K; ++j) {
        const AVec d0 = v0[j] - pivot, d1 = v1[j] - pivot;
        a0[j] = a0[j] + d0;
        a1[j] = a1[j] + d1;
        q0[j] = at::vec::fmadd(d0, d0, q0[j]);
        q1[j] = at::vec::fmadd(d1, d1, q1[j]);
      }
    }
    if (i + IO::kUnit <= len) {
      AVec v[K];
      IO::load(p + i, v);
      for (int j = 0; j < K; ++j) {
        const AVec d = v[j] - pivot;
        a0[j] = a0[j] + d;
        q0[j] = at::vec::fmadd(d, d, q0[j]);
      }
      i += IO::kUnit;
    }
    const int64_t rem = len - i;
    if (rem > 0 && rem <= IO::kUnit / 4) {  // a few values: one lane each (no copied load)
      for (; i < len; ++i) {
        const AVec d = AVec::set(zero, AVec(static_cast<acc_t>(p[i]) - pivot_s), 1);
        a1[0] = a1[0] + d;
        q1[0] = at::vec::fmadd(d, d, q1[0]);
      }
    } else if (rem > 0) {  // the missing lanes of the last unit contribute nothing
      AVec v[K];
      IO::load_partial(p + i, rem, v);
      for (int j = 0; j < K; ++j) {
        const int64_t nj = std::clamp<int64_t>(rem - j * L, 0, L);
        if (nj == 0) continue;
        const AVec d = AVec::set(zero, v[j] - pivot, nj);
        a1[j] = a1[j] + d;
        q1[j] = at::vec::fmadd(d, d, q1[j]);
      }
    }
  }

  // The shifted state of the chunk's count values.
  inline WelfordState<acc_t> finish(int64_t count) const {
    acc_t sa[2 * K * L], sq[2 * K * L];
    for (int j = 0; j < K; ++j) {
      a0[j].store(sa + j * L);
      a1[j].store(sa + (K + j) * L);
      q0[j].store(sq + j * L);
      q1[j].store(sq + (K + j) * L);
    }
    tree_sum(sa, 2 * K * L);
    tree_sum(sq, 2 * K * L);
    const acc_t md = sa[0] / static_cast<acc_t>(count);
    const acc_t m2 = sq[0] - sa[0] * md;
    return {center_s + md, m2 < acc_t(0) ? acc_t(0) : m2, count};  // (NaN stays NaN)
  }
};

template <typename scalar_t>
WelfordState<red_type<scalar_t>> nchw_moments_state(const scalar_t* x, int64_t C, int64_t S,
                                                    int64_t c, int64_t begin, int64_t end,
                                                    red_type<scalar_t> shift_s) {
  if (begin >= end) return {};
  PlaneRuns w(S, begin, end);
  PlaneMoments<scalar_t> pm;
  pm.start(x + (w.n * C + c) * S + w.s, w.len, shift_s);
  const bool prefetch = is_small_plane<scalar_t>(S);
  for (; w; w.next()) {
    if (prefetch && w.starts_inside(kPrefetchPlanes))
      prefetch_plane(x + ((w.n + kPrefetchPlanes) * C + c) * S, S);
    pm.add(x + (w.n * C + c) * S + w.s, w.len);
  }
  return pm.finish(end - begin);
}

// Sums of dy and of dy * (x - mean) over values [begin, end) of channel c of a (N, C, S) tensor
// (the backward reductions of one chunk). The runs are walked here, so that the sums stay in
// registers from one short run to the next; a partial last unit loads zero-padded (dy = 0 adds
// nothing). Small planes are asked for kPrefetchPlanes planes ahead; longer ones are streamed
// kRunAheadBytes ahead, to the end of the plane (not of the chunk: the next chunk goes on with it),
// and the head of the channel's next plane is asked for as a run starts.
template <typename scalar_t>
void nchw_chunk_sums(const scalar_t* dy, const scalar_t* x, int64_t N, int64_t C, int64_t S,
                     int64_t c, int64_t begin, int64_t end, red_type<scalar_t> mean_s,
                     red_type<scalar_t>& out_dy, red_type<scalar_t>& out_dyx) {
  using IO = RedIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int K = IO::kVecs;
  constexpr int64_t L = AVec::size();
  // One line of each input per iteration of the main loop, asked for D values ahead.
  static_assert(2 * IO::kUnit * sizeof(scalar_t) == 64, "two units are one cache line");
  constexpr int64_t D = run_ahead_values<scalar_t>();
  const AVec mean(mean_s), zero(acc_t(0));
  AVec a0[K], a1[K], b0[K], b1[K];
  for (int j = 0; j < K; ++j) a0[j] = a1[j] = b0[j] = b1[j] = zero;
  const bool prefetch = is_small_plane<scalar_t>(S);
  for (PlaneRuns w(S, begin, end); w; w.next()) {
    const int64_t len = w.len;
    const int64_t off = (w.n * C + c) * S + w.s;
    const scalar_t* gp = dy + off;
    const scalar_t* xp = x + off;
    if (prefetch && w.starts_inside(kPrefetchPlanes)) {
      const int64_t ahead = ((w.n + kPrefetchPlanes) * C + c) * S;
      prefetch_plane(dy + ahead, S);
      prefetch_plane(x + ahead, S);
    }
    if (!prefetch && w.n + 1 < N) {
      const int64_t next = ((w.n + 1) * C + c) * S;
      prefetch_plane(dy + next, D);
      prefetch_plane(x + next, D);
    }
    // Iterations before this one ask for the line D values ahead (within the plane).
    const int64_t ahead_end = prefetch ? 0 : S - w.s - D;
    int64_t i = 0;
    for (; i + 2 * IO::kUnit <= len; i += 2 * IO::kUnit) {
      AVec g0[K], g1[K], v0[K], v1[K];
      if (i < ahead_end) {
        __builtin_prefetch(gp + i + D);
        __builtin_prefetch(xp + i + D);
      }
      IO::load(gp + i, g0);
      IO::load(gp + i + IO::kUnit, g1);
      IO::load(xp + i, v0);
      IO::load(xp + i + IO::kUnit, v1);
      for (int j = 0; j < K; ++j) {
        a0[j] = a0[j] + g0[j];
        a1[j] = a1[j] + g1[j];
        b0[j] = at::vec::fmadd(g0[j], v0[j] - mean, b0[j]);
        b1[j] = at::vec::fmadd(g1[j], v1[j] - mean, b1[j]);
      }
    }
    for (; i < len; i += IO::kUnit) {
      const int64_t rem = std::min<int64_t>(IO::kUnit, len - i);
      AVec g[K], v[K];
      if (rem == IO::kUnit) {
        IO::load(gp + i, g);
        IO::load(xp + i, v);
      } else {
        IO::load_partial(gp + i, rem, g);
        IO::load_partial(xp + i, rem, v);
      }
      for (int j = 0; j < K; ++j) {
        a0[j] = a0[j] + g[j];
        b0[j] = at::vec::fmadd(g[j], v[j] - mean, b0[j]);
      }
    }
  }
  acc_t sa[2 * K * L], sb[2 * K * L];
  for (int j = 0; j < K; ++j) {
    a0[j].store(sa + j * L);
    a1[j].store(sa + (K + j) * L);
    b0[j].store(sb + j * L);
    b1[j].store(sb + (K + j) * L);
  }
  tree_sum(sa, 2 * K * L);
  tree_sum(sb, 2 * K * L);
  out_dy = sa[0];
  out_dyx = sb[0];
}

inline int64_t num_chunks(int64_t count, int64_t chunk) { return (count + chunk - 1) / chunk; }

}  // namespace fusedbn::cpu
