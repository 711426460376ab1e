// CPU optimizer steps over flat fp32 buffers: Adam/AdamW, Adagrad, Lion.
//
// One pass over memory per step: every element of param, grad and state is loaded once and stored
// once, with an optional fused copy of the new param into a bf16/fp16 buffer (what ZeRO-Offload
// ships back to the accelerator) and an optional gradient scale folded into the load (loss-scale
// unscaling and clipping, which would otherwise be a separate read-modify-write pass over the grad;
// the grad buffer itself is not written). The range is split statically over torch's intra-op OpenMP pool
// (at::parallel_for, so torch.set_num_threads applies) and each slice is an `omp simd` loop that
// -O3 with -mavx2/-mavx512f turns into vector code.
//
// The arithmetic follows torch.optim's single-tensor implementations operation by operation (same
// order, fma where ATen uses fmadd, no -ffast-math) so the result matches torch.optim to float
// rounding. The scalars (bias corrections, step size) are computed in double like Python does and
// rounded to float where ATen rounds them.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per thread at least: below this, one thread wins

enum CopyKind : int { kNoCopy = 0, kBF16 = 1, kF16 = 2 };

// fp32 -> bf16 with round-to-nearest-even, NaN kept quiet: the same bits as tensor.to(torch.bfloat16).
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// fp32 -> IEEE half, round-to-nearest-even (the hardware conversion under -mf16c).
inline uint16_t to_f16(float f) {
#if defined(__FLT16_MAX__)
  _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
#else
  return c10::Half(f).x;
#endif
}

template <int kCopy>
inline void store_copy(uint16_t* __restrict__ out, int64_t i, float v) {
  if constexpr (kCopy == kBF16) {
    out[i] = to_bf16(v);
  } else if constexpr (kCopy == kF16) {
    out[i] = to_f16(v);
  }
}

struct AdamScalars {
  float decay;       // 1 - lr * wd (AdamW) as torch's param.mul_ rounds it
  float wd;          // L2 coefficient (Adam)
  float w1;          // 1 - beta1, the lerp weight
  float beta2;
  float one_m_b2;    // 1 - beta2
  float bc2_sqrt;    // sqrt(1 - beta2^step)
  float eps;
  float neg_step;    // -lr / (1 - beta1^step)
  float gscale;      // grad multiplier (1: none), rounded to float as grad.mul_(coef) does
};

template <int kCopy, bool kAdamW>
void adam_slice(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, uint16_t* __restrict__ out, int64_t begin, int64_t end,
                const AdamScalars s) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    float gi = g[i] * s.gscale;
    if constexpr (kAdamW) {
      pi = pi * s.decay;
    } else {
      gi = std::fma(pi, s.wd, gi);  // grad.add(param, alpha=wd)
    }
    float mi = std::fma(s.w1, gi - m[i], m[i]);            // exp_avg.lerp_(grad, 1 - beta1)
    float vi = v[i] * s.beta2 + s.one_m_b2 * gi * gi;       // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
    pi = pi + s.neg_step * mi / denom;                      // param.addcdiv_(m, denom, -step_size)
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    store_copy<kCopy>(out, i, pi);
  }
}

template <int kCopy>
void adagrad_slice(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ sum,
                   uint16_t* __restrict__ out, int64_t begin, int64_t end, float wd, float eps,
                   float neg_clr, float gscale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    float gi = std::fma(pi, wd, g[i] * gscale);             // grad.add(param, alpha=wd)
    float si = sum[i] + gi * gi;                            // state_sum.addcmul_(g, g, value=1)
    float stdv = std::sqrt(si) + eps;
    pi = pi + neg_clr * gi / stdv;                          // param.addcdiv_(g, std, -clr)
    sum[i] = si;
    p[i] = pi;
    store_copy<kCopy>(out, i, pi);
  }
}

template <int kCopy>
void lion_slice(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                uint16_t* __restrict__ out, int64_t begin, int64_t end, float lr, float beta1,
                float one_m_b1, float beta2, float one_m_b2, float wd, float gscale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float pi = p[i];
    float gi = g[i] * gscale;
    float mi = m[i];
    // Lion (Chen et al. 2023, Algorithm 2): c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p);
    // m = b2 m + (1 - b2) g.
    float c = beta1 * mi + one_m_b1 * gi;
    float sgn = (c > 0.f) ? 1.f : ((c < 0.f) ? -1.f : 0.f);
    pi = pi - lr * (sgn + wd * pi);
    m[i] = beta2 * mi + one_m_b2 * gi;
    p[i] = pi;
    store_copy<kCopy>(out, i, pi);
  }
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename F>
void run_parallel(int64_t n, F&& slice) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { slice(begin, end); });
}

}  // namespace

// Buffers arrive as data addresses plus an element count: the Python op has already checked that
// they are contiguous fp32 CPU tensors of equal size (and the copy buffer bf16/fp16 of that size),
// which keeps this file free of the heavy torch/extension.h header and quick to compile.
// copy_kind: 0 none, 1 bf16, 2 fp16.
void adam_step(int64_t n, uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
               uintptr_t param_copy, int kind, double lr, double beta1, double beta2, double eps,
               double weight_decay, int64_t step, bool adamw_mode, double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  AdamScalars s;
  s.decay = float(1.0 - lr * weight_decay);
  s.wd = float(weight_decay);
  s.w1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_m_b2 = float(1.0 - beta2);
  s.bc2_sqrt = float(std::pow(bc2, 0.5));
  s.eps = float(eps);
  s.neg_step = float(-(lr / bc1));
  s.gscale = float(grad_scale);
  float* p = ptr<float>(param);
  const float* g = ptr<const float>(grad);
  float* m = ptr<float>(exp_avg);
  float* v = ptr<float>(exp_avg_sq);
  uint16_t* out = ptr<uint16_t>(param_copy);
  const bool decoupled = adamw_mode || weight_decay == 0.0;
  if (adamw_mode && weight_decay == 0.0) s.decay = 1.0f;
  run_parallel(n, [&](int64_t b, int64_t e) {
    if (decoupled) {
      if (kind == kBF16) adam_slice<kBF16, true>(p, g, m, v, out, b, e, s);
      else if (kind == kF16) adam_slice<kF16, true>(p, g, m, v, out, b, e, s);
      else adam_slice<kNoCopy, true>(p, g, m, v, out, b, e, s);
    } else {
      if (kind == kBF16) adam_slice<kBF16, false>(p, g, m, v, out, b, e, s);
      else if (kind == kF16) adam_slice<kF16, false>(p, g, m, v, out, b, e, s);
      else adam_slice<kNoCopy, false>(p, g, m, v, out, b, e, s);
    }
  });
}

void adagrad_step(int64_t n, uintptr_t param, uintptr_t grad, uintptr_t state_sum,
                  uintptr_t param_copy, int kind, double lr, double eps, double weight_decay,
                  double lr_decay, int64_t step, double grad_scale) {
  const float neg_clr = float(-(lr / (1.0 + double(step - 1) * lr_decay)));
  const float wd = float(weight_decay);
  const float fe = float(eps), gs = float(grad_scale);
  float* p = ptr<float>(param);
  const float* g = ptr<const float>(grad);
  float* s = ptr<float>(state_sum);
  uint16_t* out = ptr<uint16_t>(param_copy);
  run_parallel(n, [&](int64_t b, int64_t e) {
    if (kind == kBF16) adagrad_slice<kBF16>(p, g, s, out, b, e, wd, fe, neg_clr, gs);
    else if (kind == kF16) adagrad_slice<kF16>(p, g, s, out, b, e, wd, fe, neg_clr, gs);
    else adagrad_slice<kNoCopy>(p, g, s, out, b, e, wd, fe, neg_clr, gs);
  });
}

void lion_step(int64_t n, uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t param_copy,
               int kind, double lr, double beta1, double beta2,
               double weight_decay, double grad_scale) {
  const float flr = float(lr), b1 = float(beta1), b2 = float(beta2), wd = float(weight_decay);
  const float omb1 = float(1.0 - beta1), omb2 = float(1.0 - beta2), gs = float(grad_scale);
  float* p = ptr<float>(param);
  const float* g = ptr<const float>(grad);
  float* m = ptr<float>(exp_avg);
  uint16_t* out = ptr<uint16_t>(param_copy);
  run_parallel(n, [&](int64_t b, int64_t e) {
    if (kind == kBF16) lion_slice<kBF16>(p, g, m, out, b, e, flr, b1, omb1, b2, omb2, wd, gs);
    else if (kind == kF16) lion_slice<kF16>(p, g, m, out, b, e, flr, b1, omb1, b2, omb2, wd, gs);
    else lion_slice<kNoCopy>(p, g, m, out, b, e, flr, b1, omb1, b2, omb2, wd, gs);
  });
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ops CPU optimizer kernels (flat fp32 buffers)";
  // The GIL is released: a step over millions of elements should not block other Python threads.
  m.def("adam_step", &adam_step, py::call_guard<py::gil_scoped_release>());
  m.def("adagrad_step", &adagrad_step, py::call_guard<py::gil_scoped_release>());
  m.def("lion_step", &lion_step, py::call_guard<py::gil_scoped_release>());
}
