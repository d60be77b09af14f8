// Per-channel reductions over a whole (N, C, S) or channels-last tensor: the batch statistics
// (Welford) for the forward and the sums (dy, dy * (x - mean)) for the backward.
//
// Every channel is cut into chunks of kChunk values in (n, s) order (channels-last: chunks of
// rows), reduced independently and merged pairwise in chunk order. The chunking does not depend on
// the number of threads, so the results are bit-identical run to run and whatever the threads.
// A chunk's statistics that are not finite (values holding +-Inf or NaN) are rebuilt from a scan of
// its values, and the merges keep a mean of +-Inf: torch's results (reduce.h, nonfinite_state).
#pragma once

#include "common.h"
#include "reduce.h"

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <vector>

namespace fusedbn::cpu {

// ---- statistics -------------------------------------------------------------------------------

// Planes shorter than this are reduced by an exact two-pass over each chunk (the second over a
// gathered copy) instead of Welford's lockstep lanes, which would leave much of every plane to a
// scalar tail.
constexpr int64_t kTwoPassMaxPlane = 1024;

// The shifted state of values [begin, end) of channel c of a (N, C, S) tensor: one chunk (rebuilt
// from a scan when it holds +-Inf or NaN, see nonfinite_state in reduce.h).
template <typename scalar_t>
WelfordState<red_type<scalar_t>> nchw_chunk_state(const scalar_t* x, const Geometry& g, int64_t c,
                                                  int64_t begin, int64_t end,
                                                  red_type<scalar_t> shift) {
  WelfordState<red_type<scalar_t>> st;
  if (g.S < kTwoPassMaxPlane) {
    st = nchw_moments_state(x, g.C, g.S, c, begin, end, shift);
  } else {
    // Each run streamed ahead to its plane's end, and the head of the channel's next plane asked
    // for as a run starts (kRunAheadBytes, vec_io.h).
    const int64_t head = std::min(g.S, run_ahead_values<scalar_t>());
    LaneWelford<scalar_t> lw(shift);
    for (PlaneRuns w(g.S, begin, end); w; w.next()) {
      if (w.n + 1 < g.N) prefetch_plane(x + ((w.n + 1) * g.C + c) * g.S, head);
      lw.push_run(x + (w.n * g.C + c) * g.S + w.s, w.len, g.S - w.s);
    }
    st = lw.finish();
  }
  if (state_is_finite(st)) return st;
  NonFiniteScan scan;
  for_each_run(g.C, g.S, c, begin, end,
               [&](int64_t off, int64_t len) { scan.add(x + off, len); });
  return nonfinite_state(scan, st);
}

// Batch state (unshifted mean, m2, n) of channel c of a (N, C, S) tensor, computed by the calling
// thread alone (the per-channel fused path).
template <typename scalar_t>
WelfordState<red_type<scalar_t>> nchw_channel_state(const scalar_t* x, const Geometry& g, int64_t c) {
  using acc_t = red_type<scalar_t>;
  const int64_t M = g.rows();
  if (M == 0) return {};
  const acc_t shift = finite_shift(static_cast<acc_t>(x[c * g.S]));
  const int64_t nchunks = num_chunks(M, kChunk);
  c10::SmallVector<WelfordState<acc_t>, 8> states(nchunks);
  for (int64_t k = 0; k < nchunks; ++k)
    states[k] = nchw_chunk_state(x, g, c, k * kChunk, std::min(M, (k + 1) * kChunk), shift);
  tree_merge_states(states.data(), nchunks);
  states[0].mean += shift;
  return states[0];
}

// All channels of a (N, C, S) tensor, the chunks of every channel spread over the threads.
template <typename scalar_t>
void nchw_stats_split(const scalar_t* x, const Geometry& g, WelfordState<red_type<scalar_t>>* out) {
  using acc_t = red_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  std::vector<WelfordState<acc_t>> states(g.C * nchunks);
  at::parallel_for(0, g.C * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / nchunks, k = w % nchunks;
      states[w] = nchw_chunk_state(x, g, c, k * kChunk, std::min(M, (k + 1) * kChunk),
                                   finite_shift(static_cast<acc_t>(x[c * g.S])));
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    out[c] = {};
    if (nchunks == 0) continue;
    tree_merge_states(states.data() + c * nchunks, nchunks);
    out[c] = states[c * nchunks];
    out[c].mean += finite_shift(static_cast<acc_t>(x[c * g.S]));
  }
}

// Rows per chunk for channels-last reductions: about kChunk values (64 KB of float32, so that a
// chunk stays in L2 while its channel blocks walk it) and at least 64 rows, so that merging the
// chunks' per-channel states stays cheap next to reading them. Small tensors still get enough
// chunks to share out evenly over the threads (32x512x7x7: 25 chunks, not 7).
inline int64_t rows_per_chunk(int64_t C) {
  return std::max<int64_t>(64, kChunk / std::max<int64_t>(C, 1));
}

// Rows ahead that the channel-block walks of a chunk prefetch: each block reads a few cache lines
// per row at a stride of C values, which the hardware prefetchers follow poorly when the chunk is
// not yet in cache.
constexpr int64_t kPrefetchRows = 8;

// Rows that a channel block walks before the next block takes over (the state goes back to memory
// once per group).
constexpr int64_t kGroupRows = 16;

// Channels-last rows of at least this many channels are reduced whole, in memory order, with the
// per-channel state in L1 (cl_rows_welford, cl_rows_sums): measured cold, 0.68-0.8x the time of
// the register blocks at C = 128-512 and 0.8-0.95x at C = 64, whose strided walks the hardware
// prefetchers follow poorly. Narrower rows (a few vectors) keep the blocks. Both walks make the
// same updates in the same order per channel: the results are the same bit for bit.
constexpr int64_t kStreamMinChannels = 64;

// Asks for the NV vectors' worth of values at p, kPrefetchRows rows further down.
template <int NV, typename scalar_t>
inline void prefetch_block_ahead(const scalar_t* p, int64_t C) {
  constexpr int64_t kBytes = NV * RedIO<scalar_t>::AVec::size() * sizeof(scalar_t);
  const char* q = reinterpret_cast<const char*>(p + kPrefetchRows * C);
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(q + b);
}

// acc[j] = the NV vectors at p (a block's state carried between groups of rows).
template <int NV, typename acc_t>
inline void load_block(const acc_t* p, at::vec::Vectorized<acc_t>* acc) {
  for (int j = 0; j < NV; ++j) acc[j] = at::vec::Vectorized<acc_t>::loadu(p + j * acc[0].size());
}

// Welford over rows [r0, r1) of a block of NV * L channels starting at c of a channels-last
// (R, C) tensor, the block's means and m2s kept in registers down the rows and carried in
// mean[c..], m2[c..] from one group of rows to the next (rn[i] = 1 / (i + 1), i counted from the
// chunk's first row chunk_r0; prefetches stay inside the chunk, below chunk_r1).
template <int NV, typename scalar_t>
inline void cl_block_welford(const scalar_t* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                             int64_t chunk_r0, int64_t chunk_r1, const red_type<scalar_t>* shift,
                             const red_type<scalar_t>* rn, red_type<scalar_t>* mean,
                             red_type<scalar_t>* m2) {
  using IO = RedIO<scalar_t>;
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  static_assert(NV % IO::kVecs == 0, "a block is whole units");
  AVec m[NV], q[NV], sh[NV];
  load_block<NV>(mean + c, m);
  load_block<NV>(m2 + c, q);
  load_block<NV>(shift + c, sh);
  const scalar_t* p = x + r0 * C + c;
  for (int64_t r = r0; r < r1; ++r, p += C) {
    if (r + kPrefetchRows < chunk_r1) prefetch_block_ahead<NV>(p, C);
    AVec v[NV];
    for (int u = 0; u < NV / IO::kVecs; ++u) IO::load(p + u * IO::kUnit, v + u * IO::kVecs);
    const AVec rv(rn[r - chunk_r0]);
    for (int j = 0; j < NV; ++j) LaneWelford<scalar_t>::update(m[j], q[j], v[j] - sh[j], rv);
  }
  for (int j = 0; j < NV; ++j) {
    m[j].store(mean + c + j * L);
    q[j].store(m2 + c + j * L);
  }
}

// Rows that the streamed walks (cl_rows_welford, cl_rows_sums) take together: a unit of channels
// goes down kStreamRows rows with its state in registers before the next unit, so that the state
// goes through L1 once per kStreamRows rows (with float64 states for float32 input, loading and
// storing them once per row cost channels-last float32 forwards ~1.2x the time of the float32
// states; the kStreamRows row streams are still read in memory order).
constexpr int64_t kStreamRows = 4;

// The streamed walks read kStreamRows row streams at a time, each only one row long, which the
// hardware prefetchers follow poorly: they ask for the rows about kStreamAheadBytes further down
// (at least one group of rows), a cache line per two units, as they go; the channels-last
// elementwise passes after them (normalize, dx) ask for the row as far ahead, inputs and output.
// Measured cold (caches flushed, 1 thread, interleaved with the walks without prefetches): the
// float32 backward sums alone 0.75-0.8x the time at C = 64-512 (4 KB ahead did better than 1-2 KB
// or 8-16 KB), the whole float32 backward 0.80-0.88x and training forward 0.75-0.8x at
// 32x512x7x7, 32x256x14x14 and 8x64x112x112.
constexpr int64_t kStreamAheadBytes = 4096;

template <typename scalar_t>
inline int64_t stream_ahead_rows(int64_t C) {
  const int64_t row = std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(scalar_t)));
  return std::max<int64_t>(kStreamRows, (kStreamAheadBytes + row - 1) / row);
}

// Asks for the line at p + c of each of the n rows (C values apart) starting at p, when c starts
// an even unit (a unit is 32 bytes in every dtype: one request per 64-byte line).
// (The count is folded into the loop bound: GCC 12 drops a loop of prefetches that sits under an
// `if` or after an early return, as if it had no effect.)
template <typename scalar_t>
inline void prefetch_rows_at(const scalar_t* p, int64_t C, int64_t c, int64_t n) {
  const int64_t rows = (c / RedIO<scalar_t>::kUnit) % 2 == 0 ? n : 0;
  for (int64_t i = 0; i < rows; ++i) __builtin_prefetch(p + i * C + c);
}

// Welford over rows [r0, r1) of a channels-last (R, C) tensor, every channel's shifted state in
// mean[0..C), m2[0..C): whole rows in memory order (see kStreamMinChannels), kStreamRows at a time;
// the updates of cl_block_welford, in the same order per channel.
template <typename scalar_t>
inline void cl_rows_welford(const scalar_t* x, int64_t C, int64_t R, int64_t r0, int64_t r1,
                            const red_type<scalar_t>* shift, const red_type<scalar_t>* rn,
                            red_type<scalar_t>* mean, red_type<scalar_t>* m2) {
  using IO = RedIO<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = AVec::size();
  const int64_t Cv = C - C % IO::kUnit;
  const int64_t ahead = stream_ahead_rows<scalar_t>(C);
  for (int64_t rg = r0; rg < r1; rg += kStreamRows) {
    const int64_t nr = std::min(kStreamRows, r1 - rg);
    const int64_t npf = std::clamp<int64_t>(R - (rg + ahead), 0, nr);  // (inside the tensor)
    AVec rv[kStreamRows];
    for (int64_t i = 0; i < nr; ++i) rv[i] = AVec(rn[rg + i - r0]);
    const scalar_t* p = x + rg * C;
    for (int64_t c = 0; c < Cv; c += IO::kUnit) {
      prefetch_rows_at(p + ahead * C, C, c, npf);
      AVec m[IO::kVecs], q[IO::kVecs], sh[IO::kVecs];
      for (int j = 0; j < IO::kVecs; ++j) {
        const int64_t o = c + j * L;
        m[j] = AVec::loadu(mean + o);
        q[j] = AVec::loadu(m2 + o);
        sh[j] = AVec::loadu(shift + o);
      }
      for (int64_t i = 0; i < nr; ++i) {
        AVec v[IO::kVecs];
        IO::load(p + i * C + c, v);
        for (int j = 0; j < IO::kVecs; ++j) LaneWelford<scalar_t>::update(m[j], q[j], v[j] - sh[j], rv[i]);
      }
      for (int j = 0; j < IO::kVecs; ++j) {
        m[j].store(mean + c + j * L);
        q[j].store(m2 + c + j * L);
      }
    }
    for (int64_t c = Cv; c < C; ++c) {  // the scalar updates of cl_stats
      for (int64_t i = 0; i < nr; ++i) {
        const acc_t v = static_cast<acc_t>(p[i * C + c]) - shift[c];
        const acc_t d = v - mean[c];
        mean[c] = d * rn[rg + i - r0] + mean[c];
        m2[c] = d * (v - mean[c]) + m2[c];
      }
    }
  }
}

// The shifted states of rows [r0, r1) of a channels-last (R, C) tensor (mean[0..C), m2[0..C),
// computed assuming finite values) with those of the channels holding +-Inf or NaN rebuilt from a
// scan of their values (nonfinite_state, reduce.h).
template <typename scalar_t>
void cl_nonfinite_states(const scalar_t* x, int64_t C, int64_t r0, int64_t r1,
                         red_type<scalar_t>* mean, red_type<scalar_t>* m2) {
  using acc_t = red_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const WelfordState<acc_t> fast{mean[c], m2[c], r1 - r0};
    if (state_is_finite(fast)) continue;
    NonFiniteScan scan;
    scan.add(x + r0 * C + c, r1 - r0, C);
    const WelfordState<acc_t> st = nonfinite_state(scan, fast);
    mean[c] = st.mean;
    m2[c] = st.m2;
  }
}

// All channels of a channels-last (R, C) tensor: Welford along the rows with the channels in the
// SIMD lanes (every channel has the same count, so one reciprocal per row serves all of them).
// Rows are cut into chunks; within a chunk, wide rows are streamed whole (cl_rows_welford); narrow
// ones go by blocks of 4 vectors of channels, each running down a group of rows with its states in
// registers before the next block takes the same group (a row's block of 4 vectors is whole cache
// lines, so the blocks together read every line once).
template <typename scalar_t>
void cl_stats(const scalar_t* x, const Geometry& g, WelfordState<red_type<scalar_t>>* out) {
  using IO = RedIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  constexpr int kBlockVecs = 4;
  constexpr int64_t kBlock = kBlockVecs * IO::AVec::size();
  const int64_t C = g.C, R = g.rows();
  for (int64_t c = 0; c < C; ++c) out[c] = {};
  if (R == 0) return;
  const int64_t rpc = rows_per_chunk(C);
  const int64_t nchunks = num_chunks(R, rpc);
  std::vector<acc_t> shift(C), rn(std::min(R, rpc));
  for (int64_t c = 0; c < C; ++c) shift[c] = finite_shift(static_cast<acc_t>(x[c]));
  for (int64_t i = 0; i < static_cast<int64_t>(rn.size()); ++i)
    rn[i] = acc_t(1) / static_cast<acc_t>(i + 1);
  // Chunk k's shifted state of channel c: mean at [k*C + c], m2 likewise; its count is implied.
  std::vector<acc_t> cmean(nchunks * C), cm2(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* mean = cmean.data() + k * C;
      acc_t* m2 = cm2.data() + k * C;
      const int64_t r0 = k * rpc, r1 = std::min(R, r0 + rpc);
      std::fill(mean, mean + C, acc_t(0));
      std::fill(m2, m2 + C, acc_t(0));
      if (C >= kStreamMinChannels) {
        cl_rows_welford(x, C, R, r0, r1, shift.data(), rn.data(), mean, m2);
      } else {
        // Groups of rows, every block of channels over a group before the next group: the chunk
        // is read nearly in memory order (each block alone would stride through it).
        for (int64_t g0 = r0; g0 < r1; g0 += kGroupRows) {
          const int64_t g1 = std::min(r1, g0 + kGroupRows);
          int64_t c = 0;
          for (; c + kBlock <= C; c += kBlock)
            cl_block_welford<kBlockVecs>(x, C, c, g0, g1, r0, r1, shift.data(), rn.data(), mean,
                                         m2);
          for (; c + IO::kUnit <= C; c += IO::kUnit)
            cl_block_welford<IO::kVecs>(x, C, c, g0, g1, r0, r1, shift.data(), rn.data(), mean,
                                        m2);
          for (; c < C; ++c) {  // fewer channels than a unit: scalar, the same updates
            acc_t m = mean[c], q = m2[c];
            for (int64_t r = g0; r < g1; ++r) {
              const acc_t v = static_cast<acc_t>(x[r * C + c]) - shift[c];
              const acc_t d = v - m;
              m = d * rn[r - r0] + m;
              q = d * (v - m) + q;
            }
            mean[c] = m;
            m2[c] = q;
          }
        }
      }
      if (!all_finite(mean, C) || !all_finite(m2, C)) cl_nonfinite_states(x, C, r0, r1, mean, m2);
    }
  });
  // Pairwise merge of the chunks (tree order, as tree_merge_states), all channels at once: the
  // chunks' counts are the same for every channel, so Chan's factor is one scalar per merge and
  // the merge runs on vectors across the channels (a per-channel scalar merge with its division
  // cost as much as the reduction itself for 7x7 layers).
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  std::vector<int64_t> count(nchunks);
  for (int64_t k = 0; k < nchunks; ++k) count[k] = std::min(R, (k + 1) * rpc) - k * rpc;
  for (int64_t stride = 1; stride < nchunks; stride *= 2) {
    for (int64_t i = 0; i + stride < nchunks; i += 2 * stride) {
      const int64_t na = count[i], nb = count[i + stride];
      const acc_t f = static_cast<acc_t>(nb) / static_cast<acc_t>(na + nb);
      const acc_t fa = static_cast<acc_t>(na) * f;
      const acc_t f_a = static_cast<acc_t>(na) / static_cast<acc_t>(na + nb);  // na / n
      acc_t* ma = cmean.data() + i * C;
      acc_t* qa = cm2.data() + i * C;
      const acc_t* mb = cmean.data() + (i + stride) * C;
      const acc_t* qb = cm2.data() + (i + stride) * C;
      int64_t c = 0;
      const AVec fv(f), fav(fa), f_av(f_a);
      for (; c + L <= C; c += L) {  // welford_merge's formulas, +-Inf means kept (reduce.h)
        const AVec m = AVec::loadu(ma + c), mbv = AVec::loadu(mb + c), d = mbv - m;
        (AVec::loadu(qa + c) + (AVec::loadu(qb + c) + d * d * fav)).store(qa + c);
        vec_mean_update(m, mbv, d, f_av, fv).store(ma + c);
      }
      for (; c < C; ++c) {
        const acc_t d = mb[c] - ma[c];
        qa[c] += qb[c] + d * d * fa;
        ma[c] = welford_mean_update(ma[c], mb[c], d, f_a, f);
      }
      count[i] = na + nb;
    }
  }
  for (int64_t c = 0; c < C; ++c) out[c] = {cmean[c] + shift[c], cm2[c], R};
}

// Batch states of every channel of the canonical input, split over the threads (any layout).
template <typename scalar_t>
void batch_states(const scalar_t* x, const Geometry& g, WelfordState<red_type<scalar_t>>* out) {
  if (g.layout == Layout::kChannelsLast) {
    cl_stats(x, g, out);
  } else {
    nchw_stats_split(x, g, out);
  }
}

// ---- backward sums ------------------------------------------------------------------------------

// (sum dy, sum dy * (x - mean_c)) of channel c of a (N, C, S) tensor, by the calling thread.
template <typename scalar_t>
void nchw_channel_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g, int64_t c,
                       red_type<scalar_t> mean_c, red_type<scalar_t>& sum_dy,
                       red_type<scalar_t>& sum_dyx) {
  using acc_t = red_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  sum_dy = sum_dyx = acc_t(0);
  if (nchunks == 0) return;
  c10::SmallVector<acc_t, 8> a(nchunks), b(nchunks);
  for (int64_t k = 0; k < nchunks; ++k)
    nchw_chunk_sums(dy, x, g.N, g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk), mean_c,
                    a[k], b[k]);
  tree_sum(a.data(), nchunks);
  tree_sum(b.data(), nchunks);
  sum_dy = a[0];
  sum_dyx = b[0];
}

// The same for all channels, the chunks of every channel spread over the threads.
template <typename scalar_t>
void nchw_sums_split(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                     const red_type<scalar_t>* mean, red_type<scalar_t>* sum_dy,
                     red_type<scalar_t>* sum_dyx) {
  using acc_t = red_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  std::vector<acc_t> a(g.C * nchunks), b(g.C * nchunks);
  at::parallel_for(0, g.C * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / nchunks, k = w % nchunks;
      nchw_chunk_sums(dy, x, g.N, g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk), mean[c],
                      a[w], b[w]);
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    sum_dy[c] = sum_dyx[c] = acc_t(0);
    if (nchunks == 0) continue;
    tree_sum(a.data() + c * nchunks, nchunks);
    tree_sum(b.data() + c * nchunks, nchunks);
    sum_dy[c] = a[c * nchunks];
    sum_dyx[c] = b[c * nchunks];
  }
}

// Sums of dy and dy * (x - mean) over rows [r0, r1) of a block of NV * L channels starting at c
// of a channels-last (R, C) tensor, kept in registers down the rows and carried in sa[c..],
// sb[c..] from one group of rows to the next.
template <int NV, typename scalar_t>
inline void cl_block_sums(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t c, int64_t r0,
                          int64_t r1, int64_t chunk_r1, const red_type<scalar_t>* mean,
                          red_type<scalar_t>* sa, red_type<scalar_t>* sb) {
  using IO = RedIO<scalar_t>;
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  static_assert(NV % IO::kVecs == 0, "a block is whole units");
  AVec a[NV], b[NV], mv[NV];
  load_block<NV>(sa + c, a);
  load_block<NV>(sb + c, b);
  load_block<NV>(mean + c, mv);
  const int64_t base = r0 * C + c;
  const scalar_t* gp = dy + base;
  const scalar_t* xp = x + base;
  for (int64_t r = r0; r < r1; ++r, gp += C, xp += C) {
    if (r + kPrefetchRows < chunk_r1) {
      prefetch_block_ahead<NV>(gp, C);
      prefetch_block_ahead<NV>(xp, C);
    }
    AVec gv[NV], xv[NV];
    for (int u = 0; u < NV / IO::kVecs; ++u) {
      IO::load(gp + u * IO::kUnit, gv + u * IO::kVecs);
      IO::load(xp + u * IO::kUnit, xv + u * IO::kVecs);
    }
    for (int j = 0; j < NV; ++j) {
      a[j] = a[j] + gv[j];
      b[j] = at::vec::fmadd(gv[j], xv[j] - mv[j], b[j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    a[j].store(sa + c + j * L);
    b[j].store(sb + c + j * L);
  }
}

// Sums of dy and dy * (x - mean) over rows [r0, r1) of a channels-last (R, C) tensor, added to
// sa[0..C), sb[0..C): whole rows in memory order, kStreamRows at a time, the sums going through
// L1 once per group (see kStreamMinChannels, kStreamRows).
template <typename scalar_t>
inline void cl_rows_sums(const scalar_t* dy, const scalar_t* x, int64_t C, int64_t R, int64_t r0,
                         int64_t r1, const red_type<scalar_t>* mean, red_type<scalar_t>* sa,
                         red_type<scalar_t>* sb) {
  using IO = RedIO<scalar_t>;
  using AVec = typename IO::AVec;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = AVec::size();
  const int64_t Cv = C - C % IO::kUnit;
  const int64_t ahead = stream_ahead_rows<scalar_t>(C);
  for (int64_t rg = r0; rg < r1; rg += kStreamRows) {
    const int64_t nr = std::min(kStreamRows, r1 - rg);
    const int64_t npf = std::clamp<int64_t>(R - (rg + ahead), 0, nr);  // (inside the tensor)
    const scalar_t* gp = dy + rg * C;
    const scalar_t* xp = x + rg * C;
    for (int64_t c = 0; c < Cv; c += IO::kUnit) {
      prefetch_rows_at(gp + ahead * C, C, c, npf);
      prefetch_rows_at(xp + ahead * C, C, c, npf);
      AVec a[IO::kVecs], b[IO::kVecs], mv[IO::kVecs];
      for (int j = 0; j < IO::kVecs; ++j) {
        const int64_t o = c + j * L;
        a[j] = AVec::loadu(sa + o);
        b[j] = AVec::loadu(sb + o);
        mv[j] = AVec::loadu(mean + o);
      }
      for (int64_t i = 0; i < nr; ++i) {
        AVec gv[IO::kVecs], xv[IO::kVecs];
        IO::load(gp + i * C + c, gv);
        IO::load(xp + i * C + c, xv);
        for (int j = 0; j < IO::kVecs; ++j) {
          a[j] = a[j] + gv[j];
          b[j] = at::vec::fmadd(gv[j], xv[j] - mv[j], b[j]);
        }
      }
      for (int j = 0; j < IO::kVecs; ++j) {
        a[j].store(sa + c + j * L);
        b[j].store(sb + c + j * L);
      }
    }
    for (int64_t c = Cv; c < C; ++c) {
      for (int64_t i = 0; i < nr; ++i) {
        const acc_t gc = static_cast<acc_t>(gp[i * C + c]);
        sa[c] += gc;
        sb[c] += gc * (static_cast<acc_t>(xp[i * C + c]) - mean[c]);
      }
    }
  }
}

// The same for a channels-last (R, C) tensor, channels in the SIMD lanes, in chunks of rows: whole
// rows streamed (cl_rows_sums) when they are wide, else blocks of channels as cl_stats.
template <typename scalar_t>
void cl_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
             const red_type<scalar_t>* mean, red_type<scalar_t>* sum_dy,
             red_type<scalar_t>* sum_dyx) {
  using IO = RedIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  constexpr int kBlockVecs = 4;
  constexpr int64_t kBlock = kBlockVecs * IO::AVec::size();
  const int64_t C = g.C, R = g.rows();
  const int64_t rpc = rows_per_chunk(C);
  const int64_t nchunks = num_chunks(R, rpc);
  for (int64_t c = 0; c < C; ++c) sum_dy[c] = sum_dyx[c] = acc_t(0);
  if (nchunks == 0) return;
  std::vector<acc_t> a(nchunks * C, acc_t(0)), b(nchunks * C, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* sa = a.data() + k * C;
      acc_t* sb = b.data() + k * C;
      const int64_t r0 = k * rpc, r1 = std::min(R, r0 + rpc);
      if (C >= kStreamMinChannels) {
        cl_rows_sums(dy, x, C, R, r0, r1, mean, sa, sb);
        continue;
      }
      for (int64_t g0 = r0; g0 < r1; g0 += kGroupRows) {  // groups of rows, as cl_stats
        const int64_t g1 = std::min(r1, g0 + kGroupRows);
        int64_t c = 0;
        for (; c + kBlock <= C; c += kBlock)
          cl_block_sums<kBlockVecs>(dy, x, C, c, g0, g1, r1, mean, sa, sb);
        for (; c + IO::kUnit <= C; c += IO::kUnit)
          cl_block_sums<IO::kVecs>(dy, x, C, c, g0, g1, r1, mean, sa, sb);
        for (; c < C; ++c) {  // fewer channels than a unit: scalar
          acc_t sdy = sa[c], sdyx = sb[c];
          for (int64_t r = g0; r < g1; ++r) {
            const acc_t gc = static_cast<acc_t>(dy[r * C + c]);
            sdy += gc;
            sdyx += gc * (static_cast<acc_t>(x[r * C + c]) - mean[c]);
          }
          sa[c] = sdy;
          sb[c] = sdyx;
        }
      }
    }
  });
  // Pairwise sums over the chunks (tree_sum's order), on vectors across the channels: per channel,
  // the strided scalar tree cost a quarter of the reduction.
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  for (int64_t stride = 1; stride < nchunks; stride *= 2) {
    for (int64_t i = 0; i + stride < nchunks; i += 2 * stride) {
      for (std::vector<acc_t>* v : {&a, &b}) {
        acc_t* dst = v->data() + i * C;
        const acc_t* src = v->data() + (i + stride) * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) (AVec::loadu(dst + c) + AVec::loadu(src + c)).store(dst + c);
        for (; c < C; ++c) dst[c] += src[c];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sum_dy[c] = a[c];
    sum_dyx[c] = b[c];
  }
}

// (sum dy, sum dy * (x - mean)) of every channel of the canonical input (any layout).
template <typename scalar_t>
void grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
               const red_type<scalar_t>* mean, red_type<scalar_t>* sum_dy,
               red_type<scalar_t>* sum_dyx) {
  if (g.layout == Layout::kChannelsLast) {
    cl_sums(dy, x, g, mean, sum_dy, sum_dyx);
  } else {
    nchw_sums_split(dy, x, g, mean, sum_dy, sum_dyx);
  }
}

// True when whole channels should be handled one per task (statistics, then the elementwise pass
// over the same values): whenever the channels share out evenly over the threads. A channel that
// fits in the core's L2 is then read from memory once; a larger one is read twice, as the split
// path would, but its second read still partly hits the cache, so there is no size limit.
inline bool use_per_channel_path(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  return threads <= 1 || g.C % threads == 0 || g.C >= 4 * threads;
}

}  // namespace fusedbn::cpu
