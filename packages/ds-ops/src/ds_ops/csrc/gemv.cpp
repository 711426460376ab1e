// Dense fp32 y = x · Wᵀ (+ b) for the few rows of x a decode step has (1 to 16), with W in PyTorch's
// own [out, in] row-major layout.
//
// A BLAS GEMM is built for many rows: it packs panels of the weight into a scratch buffer and then
// runs a register-blocked kernel over them. With 8 rows of activations the packing costs about as
// much as the product, and a one-row product is a matrix-vector one whose speed is the memory's.
// Here every row of W is read once, straight from where it lies, and meets every row of x while it
// is in L1: each step of 8 input columns loads one vector of W and one of each token, and issues
// one FMA per token into that token's accumulator (with a long K and 4+ tokens, two rows of W at a
// time, so each vector of x feeds two FMAs). Rows of x are taken 8, 4, 2 or 1 at a time; the
// weight row a block works on is prefetched a few rows ahead (the out-of-order window alone does not
// hide DRAM latency behind this much arithmetic), and a one-row product runs four accumulators
// along K with a short prefetch distance.
//
// Rows of W are split over torch's intra-op pool (at::parallel_for). Without AVX2/FMA a plain loop
// runs (the compiler vectorises it; no -ffast-math, so sums keep their order per accumulator).
//
// Loading this library registers the kernel as ds_ops::decode_linear's CPU kernel in the dispatcher
// (TORCH_LIBRARY_IMPL): a call, eager or from a compiled graph, reaches it without passing through
// Python. Everything it does not take (more rows, other dtypes, a strided weight) runs at::linear.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

constexpr int64_t kAheadRows = 4;   // weight rows prefetched ahead of a token block
constexpr int64_t kAheadFloats = 64;  // and along K for a one-row product (256 bytes)

// T tokens against one row of W. With `prefetch`, the row kAheadRows below is pulled into L1 as
// this one is read (only the first token block of a row does it: later blocks find it in L1).
template <int T, bool kPrefetch>
inline void row_block(const float* __restrict__ x, int64_t K, const float* __restrict__ w, float* __restrict__ y,
                      int64_t N, const float* __restrict__ ahead) {
  constexpr int U = T <= 2 ? 2 : 1;  // short blocks run two accumulators per token along K
  __m256 acc[U][T];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    if constexpr (kPrefetch) {
      if ((k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + k), _MM_HINT_T0);
    }
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k + 8 * u), acc[u][t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m256 a = acc[0][t];
    if constexpr (U == 2) a = _mm256_add_ps(a, acc[1][t]);
    float s = hsum(a);
    for (int64_t j = k; j < K; ++j) s += w[j] * x[t * K + j];
    y[t * N] = s;
  }
}

inline float dot_row(const float* __restrict__ x, const float* __restrict__ w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kAheadFloats), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kAheadFloats + 16), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t n1) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; ++n) y[n] = dot_row(x, w + n * K, K);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    const float* ahead = w + (n + kAheadRows < n1 ? n + kAheadRows : n) * K;
    int64_t m = 0;
    bool first = true;
    auto block = [&](auto tokens) {
      constexpr int T = decltype(tokens)::value;
      if (first) row_block<T, true>(x + m * K, K, wn, y + m * N + n, N, ahead);
      else row_block<T, false>(x + m * K, K, wn, y + m * N + n, N, ahead);
      first = false;
      m += T;
    };
    while (M - m >= 8) block(std::integral_constant<int, 8>{});
    if (M - m >= 4) block(std::integral_constant<int, 4>{});
    if (M - m >= 2) block(std::integral_constant<int, 2>{});
    if (M - m >= 1) block(std::integral_constant<int, 1>{});
  }
}

// T tokens against two rows of W at once: each vector of x feeds both rows' FMAs, so a step of 8
// input columns loads 2 + T vectors for 2T FMAs instead of 1 + T for T. That matters once the token
// rows no longer fit L1 beside the weight rows (long K: x comes from L2); for short K the single-row
// blocks above are faster.
template <int T, bool kPrefetch>
inline void pair_block(const float* __restrict__ x, int64_t K, const float* __restrict__ w0,
                       const float* __restrict__ w1, float* __restrict__ y, int64_t N,
                       const float* __restrict__ ahead0, const float* __restrict__ ahead1) {
  __m256 a0[T], a1[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (kPrefetch) {
      if ((k & 15) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead0 + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ahead1 + k), _MM_HINT_T0);
      }
    }
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * K + k);
      a0[t] = _mm256_fmadd_ps(v0, xv, a0[t]);
      a1[t] = _mm256_fmadd_ps(v1, xv, a1[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    float s0 = hsum(a0[t]), s1 = hsum(a1[t]);
    for (int64_t j = k; j < K; ++j) {
      s0 += w0[j] * x[t * K + j];
      s1 += w1[j] * x[t * K + j];
    }
    y[t * N] = s0;
    y[t * N + 1] = s1;
  }
}

void rows_pairs(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const float* w0 = w + n * K;
    const int64_t a = n + kAheadRows + 1 < n1 ? n + kAheadRows : n;
    const float* ahead0 = w + a * K;
    const float* ahead1 = ahead0 + K;
    int64_t m = 0;
    bool first = true;
    auto block = [&](auto tokens) {
      constexpr int T = decltype(tokens)::value;
      if (first) pair_block<T, true>(x + m * K, K, w0, w0 + K, y + m * N + n, N, ahead0, ahead1);
      else pair_block<T, false>(x + m * K, K, w0, w0 + K, y + m * N + n, N, ahead0, ahead1);
      first = false;
      m += T;
    };
    while (M - m >= 4) block(std::integral_constant<int, 4>{});
    if (M - m >= 2) block(std::integral_constant<int, 2>{});
    if (M - m >= 1) block(std::integral_constant<int, 1>{});
  }
  if (n < n1) rows_avx2(x, M, K, w, N, y, n, n1);  // an odd last row
}

// Where the pairs win (measured on the development machine, 1 thread): 4+ tokens with K >= 1024,
// 0.67-0.95x the single-row blocks' time; with K = 512 they were 1.04-1.30x.
constexpr int64_t kPairsMinK = 1024;
#endif

[[maybe_unused]] void rows_plain(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += wn[k] * xm[k];
      y[m * N + n] = s;
    }
  }
}

// x [M, K], w [N, K], b [N] or nullptr, y [M, N]; all fp32, contiguous.
void dense_rows(const float* x, const float* w, const float* b, int64_t M, int64_t K, int64_t N, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if defined(__AVX2__) && defined(__FMA__)
    if (M >= 4 && K >= kPairsMinK) rows_pairs(x, M, K, w, N, y, n0, n1);
    else rows_avx2(x, M, K, w, N, y, n0, n1);
#else
    rows_plain(x, M, K, w, N, y, n0, n1);
#endif
    if (b != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] += b[n];
  });
}

constexpr int64_t kMaxRows = 16;

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "decode_linear: x ",
                    x.sizes(), " and weight ", weight.sizes(), " do not fit; x must be [..., in_features] with weight "
                    "[out_features, in_features]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "decode_linear: bias ",
                    bias.has_value() ? bias->sizes() : at::IntArrayRef{}, " must be [", N, "] (out_features)");
  const int64_t M = K > 0 ? x.numel() / K : 0;
  const bool fp32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                    (!bias.has_value() || bias->scalar_type() == at::kFloat);
  if (M == 0 || M > kMaxRows || !fp32 || !weight.is_contiguous() || (bias.has_value() && !bias->is_contiguous()))
    return at::linear(x, weight, bias);
  const at::Tensor xs = x.reshape({M, K}).contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  dense_rows(xs.data_ptr<float>(), weight.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
             M, K, N, y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ds_ops, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

// Nothing is called through Python: loading the module registers the kernel above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ops::decode_linear's CPU kernel, registered with the dispatcher on load";
}
