// Adam / AdamW on the CPU in one pass over memory.
//
// For each element: read the gradient (fp32, bf16 or fp16, optionally unscaled by a loss scale),
// update the fp32 first and second moments and the fp32 master weight, and write the low-precision
// working copy of the weight (bf16 or fp16) if one is given. torch.optim.AdamW plus a separate copy
// to bf16 reads and writes the weight twice; this reads each stream once and writes it once.
//
// The loop is split over OpenMP threads in contiguous blocks and vectorised by the compiler
// (-O3 -march=native); conversions to and from bf16 are bit operations (round to nearest even),
// fp16 goes through the hardware converter when the target has F16C.

// Only the tensor class and pybind11's tensor caster: <torch/extension.h> (every ATen op, the
// autograd and nn APIs) made the build 55 s on 2 cores; these take 15 s.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {  // branch-free, so the loop vectorises
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // nearest, ties to even
  const uint32_t nan = (bits >> 16) | 0x0040u;                             // keep a NaN a NaN
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  return c10::Half(f).x;
#endif
}

enum class Kind { F32, BF16, F16, NONE };

Kind kind_of(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return Kind::NONE;
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kBFloat16: return Kind::BF16;
    case at::kHalf: return Kind::F16;
    default: TORCH_CHECK(false, "cpu_adam: unsupported dtype ", t.scalar_type());
  }
  return Kind::NONE;
}

// The step's constants, computed in double from the Python floats and rounded once, as
// torch.optim does (1 - 0.999 rounded to float differs from 1.0f - 0.999f by 5e-5 relative).
struct Consts {
  float beta1, beta2, one_minus_b1, one_minus_b2, step_size, bias2_sqrt, eps, decay, l2, grad_scale;
};

template <Kind G, Kind W>
void adam_loop(float* __restrict p, const void* grad_ptr, float* __restrict m, float* __restrict v,
               void* work_ptr, int64_t n, const Consts c) {
  const float beta1 = c.beta1, beta2 = c.beta2, one_minus_b1 = c.one_minus_b1, one_minus_b2 = c.one_minus_b2;
  const float step_size = c.step_size, bias2_sqrt = c.bias2_sqrt, eps = c.eps, decay = c.decay, l2 = c.l2;
  const float grad_scale = c.grad_scale;
  const float* __restrict g32 = static_cast<const float*>(grad_ptr);
  const uint16_t* __restrict g16 = static_cast<const uint16_t*>(grad_ptr);
  uint16_t* __restrict w16 = static_cast<uint16_t*>(work_ptr);
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < n; block += 4096) {
    const int64_t end = block + 4096 < n ? block + 4096 : n;
#pragma omp simd
    for (int64_t i = block; i < end; ++i) {
      float g;
      if constexpr (G == Kind::F32) g = g32[i];
      else if constexpr (G == Kind::BF16) g = bf16_to_float(g16[i]);
      else g = half_to_float(g16[i]);
      g *= grad_scale;
      float w = p[i];
      g += l2 * w;
      const float mi = beta1 * m[i] + one_minus_b1 * g;
      const float vi = beta2 * v[i] + one_minus_b2 * g * g;
      m[i] = mi;
      v[i] = vi;
      const float denom = std::sqrt(vi) / bias2_sqrt + eps;
      w = w * decay - step_size * mi / denom;
      p[i] = w;
      if constexpr (W == Kind::BF16) w16[i] = float_to_bf16(w);
      else if constexpr (W == Kind::F16) w16[i] = float_to_half(w);
    }
  }
}

template <Kind G>
void dispatch_work(Kind w, float* p, const void* g, float* m, float* v, void* work, int64_t n, const Consts& c) {
  switch (w) {
    case Kind::BF16: adam_loop<G, Kind::BF16>(p, g, m, v, work, n, c); break;
    case Kind::F16: adam_loop<G, Kind::F16>(p, g, m, v, work, n, c); break;
    default: adam_loop<G, Kind::NONE>(p, g, m, v, work, n, c); break;
  }
}

}  // namespace

// One Adam(W) step, in place. `work` may be an empty tensor (no low-precision copy to write).
void adam_step(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
               at::Tensor work, double lr, double beta1, double beta2, double eps, double weight_decay,
               bool adamw, int64_t step, bool bias_correction, double grad_scale) {
  TORCH_CHECK(param.device().is_cpu() && param.scalar_type() == at::kFloat && param.is_contiguous(),
              "cpu_adam: the master weight must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat &&
                  exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
              "cpu_adam: moments must be contiguous fp32");
  TORCH_CHECK(grad.is_contiguous() && grad.device().is_cpu(), "cpu_adam: the gradient must be contiguous on the CPU");
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n && exp_avg.numel() == n && exp_avg_sq.numel() == n, "cpu_adam: size mismatch");
  Kind wk = kind_of(work);
  TORCH_CHECK(wk == Kind::NONE || wk == Kind::BF16 || wk == Kind::F16, "cpu_adam: the working copy must be bf16 or fp16");
  TORCH_CHECK(wk == Kind::NONE || (work.numel() == n && work.is_contiguous()), "cpu_adam: working copy size mismatch");
  // In double, as torch.optim computes them in Python floats.
  const double bc1d = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
  const double bc2d = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
  Consts c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_b1 = static_cast<float>(1.0 - beta1);
  c.one_minus_b2 = static_cast<float>(1.0 - beta2);
  c.step_size = static_cast<float>(lr / bc1d);
  c.bias2_sqrt = static_cast<float>(std::sqrt(bc2d));
  c.eps = static_cast<float>(eps);
  c.decay = adamw ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  c.l2 = adamw ? 0.0f : static_cast<float>(weight_decay);
  c.grad_scale = static_cast<float>(grad_scale);
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  void* w = wk == Kind::NONE ? nullptr : work.data_ptr();
  const void* g = grad.data_ptr();
  switch (kind_of(grad)) {
    case Kind::F32: dispatch_work<Kind::F32>(wk, p, g, m, v, w, n, c); break;
    case Kind::BF16: dispatch_work<Kind::BF16>(wk, p, g, m, v, w, n, c); break;
    case Kind::F16: dispatch_work<Kind::F16>(wk, p, g, m, v, w, n, c); break;
    default: TORCH_CHECK(false, "cpu_adam: empty gradient");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernel runs: an optimizer thread can step one chunk while
  // Python code (autograd hooks, IO threads) goes on in the others.
  m.def("adam_step", &adam_step, "Adam/AdamW step on fp32 master weights, writing an optional bf16/fp16 copy",
        py::call_guard<py::gil_scoped_release>());
}
