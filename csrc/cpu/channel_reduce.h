// Per-channel reductions over a whole (N, C, S) or channels-last tensor: the batch statistics
// (Welford) for the forward and the sums (dy, dy * (x - mean)) for the backward.
//
// Every channel is cut into chunks of kChunk values in (n, s) order (channels-last: chunks of
// rows), reduced independently and merged pairwise in chunk order. The chunking does not depend on
// the number of threads, so the results are bit-identical run to run and whatever the threads.
#pragma once

#include "common.h"
#include "reduce.h"

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <vector>

namespace fusedbn::cpu {

// ---- statistics -------------------------------------------------------------------------------

// Batch state (unshifted mean, m2, n) of channel c of a (N, C, S) tensor, computed by the calling
// thread alone (the per-channel fused path).
template <typename scalar_t>
WelfordState<acc_type<scalar_t>> nchw_channel_state(const scalar_t* x, const Geometry& g, int64_t c) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = g.rows();
  if (M == 0) return {};
  const acc_t shift = static_cast<acc_t>(x[c * g.S]);
  const int64_t nchunks = num_chunks(M, kChunk);
  c10::SmallVector<WelfordState<acc_t>, 8> states(nchunks);
  for (int64_t k = 0; k < nchunks; ++k) {
    LaneWelford<scalar_t> lw(shift);
    for_each_run(g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk),
                 [&](int64_t off, int64_t len) { lw.push_run(x + off, len); });
    states[k] = lw.finish();
  }
  tree_merge_states(states.data(), nchunks);
  states[0].mean += shift;
  return states[0];
}

// All channels of a (N, C, S) tensor, the chunks of every channel spread over the threads.
template <typename scalar_t>
void nchw_stats_split(const scalar_t* x, const Geometry& g, WelfordState<acc_type<scalar_t>>* out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  std::vector<WelfordState<acc_t>> states(g.C * nchunks);
  at::parallel_for(0, g.C * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / nchunks, k = w % nchunks;
      LaneWelford<scalar_t> lw(static_cast<acc_t>(x[c * g.S]));
      for_each_run(g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk),
                   [&](int64_t off, int64_t len) { lw.push_run(x + off, len); });
      states[w] = lw.finish();
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    out[c] = {};
    if (nchunks == 0) continue;
    tree_merge_states(states.data() + c * nchunks, nchunks);
    out[c] = states[c * nchunks];
    out[c].mean += static_cast<acc_t>(x[c * g.S]);
  }
}

// Rows per chunk for channels-last reductions: about 4 kChunk values and at least 256 rows, so that
// merging the chunks' per-channel states stays cheap next to reading them.
inline int64_t rows_per_chunk(int64_t C) {
  return std::max<int64_t>(256, 4 * kChunk / std::max<int64_t>(C, 1));
}

// All channels of a channels-last (R, C) tensor: Welford along the rows with the channels in the
// SIMD lanes (every channel has the same count, so one reciprocal per row serves all of them).
template <typename scalar_t>
void cl_stats(const scalar_t* x, const Geometry& g, WelfordState<acc_type<scalar_t>>* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
  const int64_t C = g.C, R = g.rows();
  for (int64_t c = 0; c < C; ++c) out[c] = {};
  if (R == 0) return;
  const int64_t rpc = rows_per_chunk(C);
  const int64_t nchunks = num_chunks(R, rpc);
  std::vector<acc_t> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(x[c]);
  // Chunk k's shifted state of channel c: mean at [k*C + c], m2 likewise; its count is implied.
  std::vector<acc_t> cmean(nchunks * C), cm2(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* mean = cmean.data() + k * C;
      acc_t* m2 = cm2.data() + k * C;
      std::fill(mean, mean + C, acc_t(0));
      std::fill(m2, m2 + C, acc_t(0));
      const int64_t r0 = k * rpc, r1 = std::min(R, r0 + rpc);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * C;
        const acc_t rn_s = acc_t(1) / static_cast<acc_t>(r - r0 + 1);
        const AVec rn(rn_s);
        int64_t c = 0;
        for (; c + IO::kUnit <= C; c += IO::kUnit) {
          AVec v[IO::kVecs];
          IO::load(row + c, v);
          for (int j = 0; j < IO::kVecs; ++j) {
            const int64_t cj = c + j * L;
            AVec m = AVec::loadu(mean + cj), q = AVec::loadu(m2 + cj);
            LaneWelford<scalar_t>::update(m, q, v[j] - AVec::loadu(shift.data() + cj), rn);
            m.store(mean + cj);
            q.store(m2 + cj);
          }
        }
        for (; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]) - shift[c];
          const acc_t d = v - mean[c];
          mean[c] += d * rn_s;
          m2[c] += d * (v - mean[c]);
        }
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    std::vector<WelfordState<acc_t>> states(nchunks);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < nchunks; ++k)
        states[k] = {cmean[k * C + c], cm2[k * C + c], std::min(R, (k + 1) * rpc) - k * rpc};
      tree_merge_states(states.data(), nchunks);
      out[c] = states[0];
      out[c].mean += shift[c];
    }
  });
}

// Batch states of every channel of the canonical input, split over the threads (any layout).
template <typename scalar_t>
void batch_states(const scalar_t* x, const Geometry& g, WelfordState<acc_type<scalar_t>>* out) {
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
                       acc_type<scalar_t> mean_c, acc_type<scalar_t>& sum_dy,
                       acc_type<scalar_t>& sum_dyx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  sum_dy = sum_dyx = acc_t(0);
  if (nchunks == 0) return;
  c10::SmallVector<acc_t, 8> a(nchunks), b(nchunks);
  for (int64_t k = 0; k < nchunks; ++k) {
    LaneGradSums<scalar_t> ls(mean_c);
    for_each_run(g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk),
                 [&](int64_t off, int64_t len) { ls.push_run(dy + off, x + off, len); });
    ls.finish(a[k], b[k]);
  }
  tree_sum(a.data(), nchunks);
  tree_sum(b.data(), nchunks);
  sum_dy = a[0];
  sum_dyx = b[0];
}

// The same for all channels, the chunks of every channel spread over the threads.
template <typename scalar_t>
void nchw_sums_split(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                     const acc_type<scalar_t>* mean, acc_type<scalar_t>* sum_dy,
                     acc_type<scalar_t>* sum_dyx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = g.rows();
  const int64_t nchunks = num_chunks(M, kChunk);
  std::vector<acc_t> a(g.C * nchunks), b(g.C * nchunks);
  at::parallel_for(0, g.C * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / nchunks, k = w % nchunks;
      LaneGradSums<scalar_t> ls(mean[c]);
      for_each_run(g.C, g.S, c, k * kChunk, std::min(M, (k + 1) * kChunk),
                   [&](int64_t off, int64_t len) { ls.push_run(dy + off, x + off, len); });
      ls.finish(a[w], b[w]);
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

// The same for a channels-last (R, C) tensor, channels in the SIMD lanes.
template <typename scalar_t>
void cl_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
             const acc_type<scalar_t>* mean, acc_type<scalar_t>* sum_dy,
             acc_type<scalar_t>* sum_dyx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t L = AVec::size();
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
      for (int64_t r = k * rpc; r < std::min(R, (k + 1) * rpc); ++r) {
        const scalar_t* grow = dy + r * C;
        const scalar_t* xrow = x + r * C;
        int64_t c = 0;
        for (; c + IO::kUnit <= C; c += IO::kUnit) {
          AVec gv[IO::kVecs], xv[IO::kVecs];
          IO::load(grow + c, gv);
          IO::load(xrow + c, xv);
          for (int j = 0; j < IO::kVecs; ++j) {
            const int64_t cj = c + j * L;
            (AVec::loadu(sa + cj) + gv[j]).store(sa + cj);
            at::vec::fmadd(gv[j], xv[j] - AVec::loadu(mean + cj), AVec::loadu(sb + cj)).store(sb + cj);
          }
        }
        for (; c < C; ++c) {
          const acc_t gc = static_cast<acc_t>(grow[c]);
          sa[c] += gc;
          sb[c] += gc * (static_cast<acc_t>(xrow[c]) - mean[c]);
        }
      }
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      tree_sum(a.data() + c, nchunks, C);
      tree_sum(b.data() + c, nchunks, C);
      sum_dy[c] = a[c];
      sum_dyx[c] = b[c];
    }
  });
}

// (sum dy, sum dy * (x - mean)) of every channel of the canonical input (any layout).
template <typename scalar_t>
void grad_sums(const scalar_t* dy, const scalar_t* x, const Geometry& g,
               const acc_type<scalar_t>* mean, acc_type<scalar_t>* sum_dy,
               acc_type<scalar_t>* sum_dyx) {
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
