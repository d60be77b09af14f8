// CPU training forward (batch statistics + normalize + affine) and inference forward.
//
// Contiguous (N, C, S) input whose channels share out evenly over the threads: one task per
// channel computes the channel's statistics and immediately normalizes the same values, newest
// first, while they are still in the core's L2 (x is read from memory once when a channel fits);
// with planes of a few cache lines (7x7) the task is a block of adjacent channels instead, walked
// sample by sample in memory order (see "small planes" below). Otherwise (few channels, or
// channels larger than a cache) the statistics are reduced in parallel chunks and the normalize
// pass runs over all planes; the channels-last layout always takes this route, with the channels
// in the SIMD lanes.
// y = (x - mean) * (invstd * w) + b: subtracting the mean first keeps float32 outputs exact for
// data with a large mean and a small spread.
#include "apply.h"
#include "channel_reduce.h"
#include "kernels.h"

#include <ATen/ops/empty.h>

#include <array>
#include <cmath>
#include <type_traits>

namespace fusedbn::cpu {
namespace {

// Per-channel constants of y = (x - mean) * scale + bias, computed in the reductions' type red_t
// (float64 for float32 input) and rounded once into the elementwise pass's type acc_t.
template <typename acc_t>
struct NormalizeConstants {
  std::vector<acc_t> mean, scale, bias, shift;  // shift = bias - mean * scale
  std::vector<acc_t> mean_lo;                   // mean's rounding error (see kSplitMean)
  explicit NormalizeConstants(int64_t C) : mean(C), scale(C), bias(C), shift(C), mean_lo(C) {}
  template <typename red_t>
  void set(int64_t c, red_t mean_c, red_t scale_c, red_t bias_c) {
    split_mean(mean_c, mean[c], mean_lo[c]);
    scale[c] = static_cast<acc_t>(scale_c);
    bias[c] = static_cast<acc_t>(bias_c);
    shift[c] = static_cast<acc_t>(bias_c - mean_c * scale_c);
  }
};

// float32/float64: (x - mean) * scale + bias -- subtracting first keeps the result exact for data
// far from zero (mean 1e4, spread 1e-2). float16/bfloat16: one fma, x * scale + shift; the
// output's own rounding dominates there, and the conversions already make the pass compute-bound.
template <typename scalar_t>
constexpr bool kNormalizeByFma = c10::is_reduced_floating_point_v<scalar_t>;

struct SubMulAdd {
  template <typename V>
  V operator()(const V* in, const V* k) const { return (in[0] - k[0]) * k[1] + k[2]; }
};
struct SplitSubMulAdd {  // the mean as hi k[0] + lo k[3]
  template <typename V>
  V operator()(const V* in, const V* k) const { return ((in[0] - k[0]) - k[3]) * k[1] + k[2]; }
};
struct MulAdd {
  template <typename V>
  V operator()(const V* in, const V* k) const { return at::vec::fmadd(in[0], k[0], k[1]); }
};

// kAhead: y's lines asked for ahead of the stores (apply_run_ahead), for long planes.
template <typename scalar_t, bool kAhead = false>
inline void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, int64_t c,
                          const NormalizeConstants<acc_type<scalar_t>>& k) {
  auto run = [&](const auto& kv, const auto& f) {
    constexpr int NK = std::tuple_size_v<std::decay_t<decltype(kv)>>;
    if constexpr (kAhead) {
      apply_run_ahead<1, NK, scalar_t>({x}, y, len, kv, f);
    } else {
      apply_run<1, NK, scalar_t>({x}, y, len, kv, f);
    }
  };
  using acc_t = acc_type<scalar_t>;
  if constexpr (kNormalizeByFma<scalar_t>) {
    run(std::array<acc_t, 2>{k.scale[c], k.shift[c]}, MulAdd{});
  } else if constexpr (kSplitMean<scalar_t>) {
    run(std::array<acc_t, 4>{k.mean[c], k.scale[c], k.bias[c], k.mean_lo[c]}, SplitSubMulAdd{});
  } else {
    run(std::array<acc_t, 3>{k.mean[c], k.scale[c], k.bias[c]}, SubMulAdd{});
  }
}

template <typename scalar_t>
inline void normalize_row(const scalar_t* x, scalar_t* y, int64_t C,
                          const NormalizeConstants<acc_type<scalar_t>>& k) {
  if constexpr (kNormalizeByFma<scalar_t>) {
    apply_row<1, 2, scalar_t>({x}, y, C, {k.scale.data(), k.shift.data()}, MulAdd{});
  } else if constexpr (kSplitMean<scalar_t>) {
    apply_row<1, 4, scalar_t>(
        {x}, y, C, {k.mean.data(), k.scale.data(), k.bias.data(), k.mean_lo.data()},
        SplitSubMulAdd{});
  } else {
    apply_row<1, 3, scalar_t>({x}, y, C, {k.mean.data(), k.scale.data(), k.bias.data()},
                              SubMulAdd{});
  }
}

// y over all channels.
template <typename scalar_t>
void normalize_all(const scalar_t* x, scalar_t* y, const Geometry& g,
                   const NormalizeConstants<acc_type<scalar_t>>& k) {
  if (g.layout == Layout::kChannelsLast) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.C, 1));
    const int64_t ahead = stream_ahead_rows<scalar_t>(g.C), R = g.rows();
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (r + ahead < R) {  // (see kStreamAheadBytes, channel_reduce.h)
          prefetch_plane(x + (r + ahead) * g.C, g.C);
          prefetch_plane<true>(y + (r + ahead) * g.C, g.C);
        }
        normalize_row(x + r * g.C, y + r * g.C, g.C, k);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin, c = begin % g.C; p < end; ++p, c = c + 1 == g.C ? 0 : c + 1)
        normalize_run(x + p * g.S, y + p * g.S, g.S, c, k);
    });
  }
}

// ---- small planes: blocks of channels ------------------------------------------------------
//
// A channel of 7x7 planes is 32 runs of 98 bytes (bfloat16) lying C * S values apart: walked
// channel by channel, every run is a new page and a couple of cache lines that the hardware
// prefetchers do not see coming. A block of B adjacent channels is instead B * S contiguous values
// per sample: the block's statistics walk the samples in memory order, every channel of the block
// summing its own run through PlaneMoments (the same updates, in the same order per channel, as
// nchw_moments_state: the bits do not depend on the walk), and the block's normalize pass walks
// the same runs again from the cache.

// Planes shorter than this take the block path. Measured (1 thread, cold, interleaved with the
// per-channel walk): 7x7 bfloat16 (98 bytes) 0.70x the time, 7x7 float32 (196 bytes) about the
// same; 14x14 bfloat16 (392 bytes) 1.1x, as its runs are already long enough for the prefetchers.
constexpr int64_t kBlockMaxPlaneBytes = 256;
// Channels per block: about kBlockBytes of input (32x512x7x7 bfloat16: 10 channels), which stays
// in L1 between the two passes. (64 KB and 128 KB blocks measured slower.)
constexpr int64_t kBlockBytes = 32768;
// Samples ahead that the statistics walk prefetches (every sample's run starts on a new page),
// and that the normalize walk asks for the output runs it is about to write.
constexpr int64_t kBlockAhead = 2;
constexpr int64_t kBlockAheadY = kPrefetchPlanes;

// Channels per block: kBlockBytes of input, and at most C / threads (every thread gets blocks;
// the results do not depend on the block size), in blocks of nearly equal size.
inline int64_t small_plane_block(const Geometry& g, int64_t elem_size) {
  const int64_t channel_bytes = std::max<int64_t>(1, g.rows() * elem_size);
  const int64_t most = std::max<int64_t>(1, g.C / std::max<int64_t>(1, at::get_num_threads()));
  const int64_t want = std::clamp<int64_t>(kBlockBytes / channel_bytes, 1, most);
  return num_chunks(g.C, num_chunks(g.C, want));
}

template <typename scalar_t>
bool use_block_path(const Geometry& g) {
  // (Planes of kTwoPassMaxPlane values or more are reduced by LaneWelford, not PlaneMoments.)
  return g.S < kTwoPassMaxPlane && g.rows() > 0 && g.C > 0 &&
         g.S * static_cast<int64_t>(sizeof(scalar_t)) < kBlockMaxPlaneBytes;
}

// The batch states of channels [c0, c1) (out[c - c0]), walked in memory order.
template <typename scalar_t>
void block_states(const scalar_t* x, const Geometry& g, int64_t c0, int64_t c1,
                  std::vector<PlaneMoments<scalar_t>>& pm,
                  std::vector<WelfordState<red_type<scalar_t>>>& chunk_states,
                  WelfordState<red_type<scalar_t>>* out) {
  using acc_t = red_type<scalar_t>;
  const int64_t C = g.C, S = g.S, M = g.rows(), B = c1 - c0;
  const int64_t nchunks = num_chunks(M, kChunk);
  pm.resize(B);
  chunk_states.resize(B * nchunks);
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t begin = k * kChunk, end = std::min(M, begin + kChunk);
    PlaneRuns w(S, begin, end);
    for (int64_t c = c0; c < c1; ++c)
      pm[c - c0].start(x + (w.n * C + c) * S + w.s, w.len, static_cast<acc_t>(x[c * S]));
    for (; w; w.next()) {
      if (kBlockAhead > 0 && w.starts_inside(kBlockAhead))
        prefetch_plane(x + ((w.n + kBlockAhead) * C + c0) * S, B * S);
      const scalar_t* p = x + (w.n * C + c0) * S + w.s;
      for (int64_t j = 0; j < B; ++j, p += S) pm[j].add(p, w.len);
    }
    for (int64_t j = 0; j < B; ++j) chunk_states[j * nchunks + k] = pm[j].finish(end - begin);
  }
  for (int64_t j = 0; j < B; ++j) {
    WelfordState<acc_t>* st = chunk_states.data() + j * nchunks;
    tree_merge_states(st, nchunks);
    st[0].mean += static_cast<acc_t>(x[(c0 + j) * S]);
    out[j] = st[0];
  }
}

template <typename scalar_t>
void forward_train_impl(const at::Tensor& xt, at::Tensor& yt, const Geometry& g,
                        const at::Tensor& weight, const at::Tensor& bias, double eps,
                        at::Tensor& mean_t, at::Tensor& invstd_t, at::Tensor& var_t) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  const scalar_t* x = xt.const_data_ptr<scalar_t>();
  scalar_t* y = yt.mutable_data_ptr<scalar_t>();
  acc_t* mean = mean_t.mutable_data_ptr<acc_t>();
  acc_t* invstd = invstd_t.mutable_data_ptr<acc_t>();
  acc_t* var = var_t.mutable_data_ptr<acc_t>();
  std::vector<red_t> w(g.C), b(g.C);
  NormalizeConstants<acc_t> k(g.C);
  read_channel_values<red_t>(weight, g.C, red_t(1), w.data());
  read_channel_values<red_t>(bias, g.C, red_t(0), b.data());
  const red_t eps_r = static_cast<red_t>(eps);
  auto finish_channel = [&](int64_t c, const WelfordState<red_t>& st) {
    const red_t m = st.n > 0 ? st.mean : red_t(0);
    const red_t v = welford_var(st);
    const red_t is = red_t(1) / std::sqrt(v + eps_r);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(v);
    invstd[c] = static_cast<acc_t>(is);
    k.set(c, m, is * w[c], b[c]);
  };

  if (g.layout == Layout::kContiguous && use_per_channel_path(g) && use_block_path<scalar_t>(g)) {
    const int64_t B = small_plane_block(g, sizeof(scalar_t));
    at::parallel_for(0, num_chunks(g.C, B), 1, [&](int64_t begin, int64_t end) {
      std::vector<PlaneMoments<scalar_t>> pm;
      std::vector<WelfordState<red_t>> chunk_states, st(B);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * B, c1 = std::min(g.C, c0 + B);
        const int64_t run = (c1 - c0) * g.S;  // values of the block per sample
        for (int64_t n = 0; n < std::min(g.N, kBlockAheadY); ++n)
          prefetch_plane<true>(y + (n * g.C + c0) * g.S, run);
        block_states(x, g, c0, c1, pm, chunk_states, st.data());
        for (int64_t c = c0; c < c1; ++c) {
          // A channel holding +-Inf or NaN (whose sums are not finite) is recomputed by the
          // per-channel reduction, so that it gets whatever treatment of non-finite values the
          // other paths give; finite data never comes here.
          WelfordState<red_t>& sc = st[c - c0];
          if (!welford_isfinite(sc.mean) || !welford_isfinite(sc.m2))
            sc = nchw_channel_state(x, g, c);
          finish_channel(c, sc);
        }
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c0) * g.S;
          if (n + kBlockAheadY < g.N) prefetch_plane<true>(y + off + kBlockAheadY * g.C * g.S, run);
          for (int64_t c = c0; c < c1; ++c)
            normalize_run(x + off + (c - c0) * g.S, y + off + (c - c0) * g.S, g.S, c, k);
        }
      }
    });
    return;
  }
  if (g.layout == Layout::kContiguous && use_per_channel_path(g)) {
    at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
      const bool prefetch = is_small_plane<scalar_t>(g.S);
      const int64_t first_ahead = std::max<int64_t>(0, g.N - kPrefetchPlanes);
      for (int64_t c = begin; c < end; ++c) {
        // The output planes the normalize loop starts on, and the next channel's first inputs.
        if (prefetch) prefetch_planes<true>(y, g.C, g.S, c, first_ahead, g.N);
        finish_channel(c, nchw_channel_state(x, g, c));
        if (prefetch && c + 1 < end)
          prefetch_planes(x, g.C, g.S, c + 1, 0, std::min(g.N, kPrefetchPlanes));
        for (int64_t n = g.N - 1; n >= 0; --n) {  // newest in cache first
          const int64_t off = (n * g.C + c) * g.S;
          if (prefetch) {
            if (n >= kPrefetchPlanes)
              prefetch_plane<true>(y + off - kPrefetchPlanes * g.C * g.S, g.S);
            normalize_run(x + off, y + off, g.S, c, k);
          } else {  // long planes: streamed ahead, and the next (lower) plane's head asked for
            if (n > 0) prefetch_plane<true>(y + off - g.C * g.S, run_ahead_values<scalar_t>());
            normalize_run<scalar_t, true>(x + off, y + off, g.S, c, k);
          }
        }
      }
    });
    return;
  }
  std::vector<WelfordState<red_t>> st(g.C);
  batch_states(x, g, st.data());
  for (int64_t c = 0; c < g.C; ++c) finish_channel(c, st[c]);
  normalize_all(x, y, g, k);
}

template <typename scalar_t>
void forward_eval_impl(const at::Tensor& xt, at::Tensor& yt, const Geometry& g,
                       const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  using acc_t = acc_type<scalar_t>;
  using red_t = red_type<scalar_t>;
  std::vector<red_t> w(g.C), b(g.C), m(g.C), var(g.C);
  NormalizeConstants<acc_t> k(g.C);
  read_channel_values<red_t>(weight, g.C, red_t(1), w.data());
  read_channel_values<red_t>(bias, g.C, red_t(0), b.data());
  read_channel_values<red_t>(running_mean, g.C, red_t(0), m.data());
  read_channel_values<red_t>(running_var, g.C, red_t(1), var.data());
  for (int64_t c = 0; c < g.C; ++c)
    k.set(c, m[c], w[c] / std::sqrt(var[c] + static_cast<red_t>(eps)), b[c]);
  normalize_all(xt.const_data_ptr<scalar_t>(), yt.mutable_data_ptr<scalar_t>(), g, k);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "forward_train";
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
  TORCH_CHECK(eps > 0, "fusedbn.", op, ": eps must be positive in training, got ", eps);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor y = empty_output(x);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_forward_train", [&] {
    forward_train_impl<scalar_t>(x, y, g, w, b, eps, mean, invstd, var);
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train_update(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps) {
  auto out = forward_train(input, weight, bias, eps);
  const at::Tensor& mean = std::get<1>(out);
  const at::Tensor& var = std::get<3>(out);
  const int64_t count = update_count(input);
  const auto batches = momentum.has_value() ? c10::nullopt : num_batches_tracked;
  // Every check of the update before the counter moves: a rejected batch is not counted.
  check_update_running_stats_args(running_mean, running_var, mean, var, count, momentum, batches);
  if (defined(num_batches_tracked)) advance_counter(*num_batches_tracked);
  update_running_stats(running_mean, running_var, mean, var, count, momentum, batches);
  return out;
}

at::Tensor forward_eval(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double eps) {
  constexpr const char* op = "forward_eval";
  check_input(input, op);
  check_optional_channel_tensor(weight, "weight", input, op);
  check_optional_channel_tensor(bias, "bias", input, op);
  check_weight_bias_dtypes(weight, bias, op);
  check_eval_stats_args(running_mean, running_var, input, eps, op);
  Geometry g;
  const at::Tensor x = canonicalize(input, g);
  at::Tensor y = empty_output(x);
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedbn_forward_eval", [&] {
    forward_eval_impl<scalar_t>(x, y, g, w, b, running_mean, running_var, eps);
  });
  return y;
}

}  // namespace fusedbn::cpu
