// Weight-only quantized GEMM for a few rows of activations (the decode step): y = x · Wᵀ with W held
// as packed integer codes and one fp32 scale (and offset) per output row and input group, in the
// ds-quant layout (docs/quantized-format.md). The codes are read once per row of W, straight from
// their packed bytes; nothing is dequantized into memory, so the weight traffic is bits/32 of fp32.
//
// Each code w = (a·field − off)·s, where `field` is the stored unsigned (or int8) value. Summing over
// a group g of input columns:
//     Σ w·x = s_g · (a · Σ field·x − off_g · Σ x)
// so the inner loop is a plain multiply-add of fields with x, and the offset (2^(b−1) for symmetric
// codes, the zero point for asymmetric ones, 1 for binary with a = 2) is applied once per group with
// the group sum of x (computed by the caller).
//
// Packed layouts put 8/bits consecutive input columns in one byte, lowest column in the lowest bits.
// The caller splits x into P = 8/bits "planes", plane p holding columns p, p+P, p+2P, ..., so that
// field p of byte j multiplies plane p at j: every inner loop reads contiguous memory and vectorises
// (`omp simd` with a reduction, no -ffast-math needed).
//
// Rows of W are split over torch's intra-op pool (at::parallel_for), tokens are the inner loop over
// a group already in L1.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

template <class T>
inline T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <int kBits, bool kSignedBytes>
void rows_kernel(const float* __restrict__ planes,   // [M, P, K/P]
                 const float* __restrict__ xsum,     // [M, G]
                 const uint8_t* __restrict__ codes,  // [N, K*bits/8]
                 const float* __restrict__ scales,   // [N, G]
                 const float* __restrict__ offsets,  // [N, G] or nullptr (then `off` for all)
                 float off, float a, int64_t M, int64_t K, int64_t G, int64_t group,
                 float* __restrict__ y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int P = 8 / kBits;
  constexpr int kMask = (1 << kBits) - 1;
  const int64_t row_bytes = K / P;
  const int64_t group_bytes = group / P;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = planes + m * K;
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = row + g * group_bytes;
        float acc = 0.f;
        for (int p = 0; p < P; ++p) {
          const float* xp = xm + p * row_bytes + g * group_bytes;
          const int shift = p * kBits;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < group_bytes; ++j) {
            float field;
            if constexpr (kSignedBytes) {
              field = float(static_cast<int8_t>(b[j]));
            } else {
              field = float((b[j] >> shift) & kMask);
            }
            acc += field * xp[j];
          }
        }
        const float o = offsets ? offsets[n * G + g] : off;
        total += scales[n * G + g] * (a * acc - o * xsum[m * G + g]);
      }
      y[m * N + n] = total;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 paths for int8 (signed, symmetric) and 4-bit codes with groups of a multiple of 16 columns,
// the common decode shapes. Fields of one group are widened to fp32 once (8 per instruction) and
// multiplied into every token's accumulator; the scale is applied per group as a vector FMA and
// the horizontal sum happens once per output.
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

constexpr int64_t kMaxTokens = 16;

// T tokens (1..4) against one row of W: the group's fields are widened in registers, 16 bytes at a
// time, and multiplied into 2·T independent accumulators (T and the loops over it are compile-time,
// so the accumulators stay in registers).
template <int kBits, int T>
inline void row_tokens(const float* __restrict__ planes, const float* __restrict__ xsum, const uint8_t* __restrict__ row,
                       const float* __restrict__ srow, const float* __restrict__ orow, float off, int64_t K,
                       int64_t G, int64_t group, float* __restrict__ y, int64_t N, int64_t n) {
  constexpr int P = 8 / kBits;
  const int64_t row_bytes = K / P, group_bytes = group / P;
  __m256 total[T];
  float corr[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    total[t] = _mm256_setzero_ps();
    corr[t] = 0.f;
  }
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = row + g * group_bytes;
    const float* xg = planes + g * group_bytes;
    __m256 a[T], c[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) a[t] = c[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < group_bytes; j += 16) {
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j));
      if constexpr (kBits == 8) {
        const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
        const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          a[t] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xg + t * K + j), a[t]);
          c[t] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xg + t * K + j + 8), c[t]);
        }
      } else {
        const __m256i v0 = _mm256_cvtepu8_epi32(raw);
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
        const __m256 l0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low));
        const __m256 l1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low));
        const __m256 h0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
        const __m256 h1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const float* xt = xg + t * K;
          a[t] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xt + j), a[t]);
          c[t] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xt + j + 8), c[t]);
          a[t] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xt + row_bytes + j), a[t]);
          c[t] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xt + row_bytes + j + 8), c[t]);
        }
      }
    }
    const float sgf = srow[g];
    const __m256 sg = _mm256_set1_ps(sgf);
    const float og = orow ? orow[g] : off;
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      total[t] = _mm256_fmadd_ps(_mm256_add_ps(a[t], c[t]), sg, total[t]);
      corr[t] += sgf * og * xsum[t * G + g];
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) y[t * N + n] = hsum(total[t]) - corr[t];
}

template <int kBits>
void rows_avx2(const float* __restrict__ planes, const float* __restrict__ xsum, const uint8_t* __restrict__ codes,
               const float* __restrict__ scales, const float* __restrict__ offsets, float off, int64_t M, int64_t K,
               int64_t G, int64_t group, float* __restrict__ y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int P = 8 / kBits;
  const int64_t row_bytes = K / P;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    const float* srow = scales + n * G;
    const float* orow = offsets ? offsets + n * G : nullptr;
    for (int64_t m = 0; m < M; m += 4) {  // tokens in blocks of four; the row's bytes stay in L1
      const float* xp = planes + m * K;
      const float* xs = xsum + m * G;
      float* ym = y + m * N;
      switch (M - m >= 4 ? 4 : M - m) {
        case 4: row_tokens<kBits, 4>(xp, xs, row, srow, orow, off, K, G, group, ym, N, n); break;
        case 3: row_tokens<kBits, 3>(xp, xs, row, srow, orow, off, K, G, group, ym, N, n); break;
        case 2: row_tokens<kBits, 2>(xp, xs, row, srow, orow, off, K, G, group, ym, N, n); break;
        default: row_tokens<kBits, 1>(xp, xs, row, srow, orow, off, K, G, group, ym, N, n); break;
      }
    }
  }
}
#endif

// bits: 8 (signed int8 when symmetric), 4, 2, 1. offsets_address: 0 for a constant offset `off`.
void woq_gemv(uintptr_t planes, uintptr_t xsum, uintptr_t codes, uintptr_t scales, uintptr_t offsets_address,
              double off, double a, int64_t M, int64_t K, int64_t N, int64_t G, int64_t group, int64_t bits,
              bool signed_bytes, uintptr_t out) {
  const float* xp = ptr<const float>(planes);
  const float* xs = ptr<const float>(xsum);
  const uint8_t* q = ptr<const uint8_t>(codes);
  const float* s = ptr<const float>(scales);
  const float* z = offsets_address ? ptr<const float>(offsets_address) : nullptr;
  float* y = ptr<float>(out);
  const float fo = float(off), fa = float(a);
  const int64_t grain = 16;
#if defined(__AVX2__) && defined(__FMA__)
  const bool vector_ok = (bits == 8 ? signed_bytes : bits == 4) && group % (bits == 8 ? 16 : 32) == 0 &&
                         M <= kMaxTokens &&
                         fa == 1.f && group <= 4096;
  if (vector_ok) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (bits == 8) rows_avx2<8>(xp, xs, q, s, z, fo, M, K, G, group, y, N, n0, n1);
      else rows_avx2<4>(xp, xs, q, s, z, fo, M, K, G, group, y, N, n0, n1);
    });
    return;
  }
#endif
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (bits) {
      case 8:
        if (signed_bytes) rows_kernel<8, true>(xp, xs, q, s, z, fo, fa, M, K, G, group, y, N, n0, n1);
        else rows_kernel<8, false>(xp, xs, q, s, z, fo, fa, M, K, G, group, y, N, n0, n1);
        break;
      case 4: rows_kernel<4, false>(xp, xs, q, s, z, fo, fa, M, K, G, group, y, N, n0, n1); break;
      case 2: rows_kernel<2, false>(xp, xs, q, s, z, fo, fa, M, K, G, group, y, N, n0, n1); break;
      default: rows_kernel<1, false>(xp, xs, q, s, z, fo, fa, M, K, G, group, y, N, n0, n1); break;
    }
  });
}

}  // namespace

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ops weight-only quantized GEMV over packed ds-quant codes";
  m.def("woq_gemv", &woq_gemv, py::call_guard<py::gil_scoped_release>());
}
