// Shared scalar math of the fused Adam/AdamW step, included by the CPU kernel (cpu_adam.cpp) and the CUDA
// kernel (cuda/adam.cu), so both round exactly the same way.
//
// Operation order follows torch.optim.Adam/AdamW's `_single_tensor_adam` (torch/optim/adam.py, torch 2.13),
// the path torch takes for CPU tensors by default:
//   param.mul_(1 - lr * wd)                       (AdamW)  |  grad = grad.add(param, alpha=wd)   (Adam, L2)
//   exp_avg.lerp_(grad, 1 - beta1)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   bias_correction1 = 1 - beta1 ** step;  bias_correction2 = 1 - beta2 ** step      (Python floats)
//   step_size = lr / bias_correction1;     bias_correction2_sqrt = bias_correction2 ** 0.5
//   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)
// With bias_correction false (DeepSpeed's Adam option, deepspeed/ops/csrc/includes/cpu_adam.h) both
// corrections are 1: step_size = lr and bias_correction2_sqrt = 1 (dividing by 1.0f is exact).
// Step scalars are computed in double (as Python does) and rounded to float once, as ATen does when a Python
// scalar meets a float32 tensor. The element-wise rounding mirrors ATen's vectorised CPU kernels:
//   add(self, other, alpha) -> fmadd(other, alpha, self)            (aten/src/ATen/native/ufunc/add.h)
//   lerp(start, end, w)     -> fmadd(w, end - start, start) if |w| < 0.5
//                              else fmadd(w - 1, end - start, end)   (aten/src/ATen/native/Lerp.h, lerp_vec)
//   addcmul                 -> fmadd(value * t1, t2, self)           (PointwiseOpsKernel.cpp; in torch 2.13
//                              the float kernel rounds as one FMA: checked bit for bit against torch)
//   addcdiv                 -> self + (value * t1) / t2              (PointwiseOpsKernel.cpp)
// `kFma` selects fused multiply-add at the fmadd sites: true matches torch on FMA hardware (AVX2/AVX-512,
// aarch64, CUDA); false matches torch's non-FMA (DEFAULT capability) kernels.
// Measured against torch 2.13 on an AVX-512 host: exp_avg and exp_avg_sq agree bit for bit over 100 steps; the
// parameter agrees to ~1 ulp, because torch's float32 sqrt goes through MKL VML in the x86 wheels and is not
// correctly rounded (~0.6% of elements 1 ulp off), while this code uses IEEE sqrt.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ZT_HD __host__ __device__ __forceinline__
#else
#define ZT_HD inline
#endif

namespace ztune {

// Grad / output element types, shared with the Python wrapper (runtime/ops.py) through the C ABI.
enum DType : int { kNone = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// Per-step scalars, already rounded to float the way ATen rounds a Python scalar for a float32 tensor.
struct AdamScalars {
  float decay_keep;      // 1 - lr * wd (AdamW)
  float l2_wd;           // wd (Adam, added to the gradient)
  float lerp_w;          // 1 - beta1
  float lerp_w_minus_1;  // (1 - beta1) - 1 in float, ATen's coefficient for the large-weight lerp branch
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;        // (1 - beta2 ** step) ** 0.5
  float eps;
  float neg_step_size;   // -lr / (1 - beta1 ** step)
  float grad_scale;      // gradients are divided by this (fp16 loss scale); 1 means off
  bool adamw;
  bool has_wd;
  bool has_scale;
  bool lerp_small;       // |1 - beta1| < 0.5: which lerp form ATen uses
};

ZT_HD AdamScalars make_adam_scalars(int64_t step, double lr, double beta1, double beta2, double eps, double wd,
                                    bool adamw, double grad_scale, bool bias_correction = true) {
  AdamScalars s;
  // torch keeps `step` as a float tensor and reads it with .item(), so Python computes beta ** float(step).
  const double step_d = static_cast<double>(step);
  const double bias_correction1 = bias_correction ? 1.0 - pow(beta1, step_d) : 1.0;
  const double bias_correction2 = bias_correction ? 1.0 - pow(beta2, step_d) : 1.0;
  const double step_size = lr / bias_correction1;
  const double lerp_w = 1.0 - beta1;
  s.decay_keep = static_cast<float>(1.0 - lr * wd);
  s.l2_wd = static_cast<float>(wd);
  s.lerp_w = static_cast<float>(lerp_w);
  s.lerp_w_minus_1 = s.lerp_w - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(pow(bias_correction2, 0.5));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-step_size);
  s.grad_scale = static_cast<float>(grad_scale);
  s.adamw = adamw;
  s.has_wd = wd != 0.0;
  s.has_scale = grad_scale != 1.0;
  s.lerp_small = fabs(static_cast<float>(lerp_w)) < 0.5f;
  return s;
}

// Explicitly rounded arithmetic: nvcc contracts a*b+c into an FMA unless told not to, so device code spells
// every rounding; host code is built with -ffp-contract=off for the same reason.
ZT_HD float zt_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ZT_HD float zt_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ZT_HD float zt_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ZT_HD float zt_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ZT_HD float zt_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}
template <bool kFma>
ZT_HD float zt_madd(float a, float b, float c) {  // a * b + c
  if (kFma) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return fmaf(a, b, c);
#endif
  }
  return zt_add(zt_mul(a, b), c);
}

// bf16 and fp16 are handled as raw 16-bit patterns so this header needs no vendor half types.
ZT_HD float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even; NaN becomes the canonical quiet NaN 0x7FC0 (as c10::BFloat16 does).
// Written as a select rather than an early return so compilers can vectorise it.
ZT_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  const uint32_t rounded = (bits + rounding_bias) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

// IEEE binary16 <-> binary32, exact in the widening direction, round-to-nearest-even in the narrowing one,
// subnormals kept (as F16C's vcvtph2ps / vcvtps2ph with rounding mode 0 do).
ZT_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise the mantissa
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

ZT_HD uint16_t float_to_f16_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) {  // inf or NaN (NaN stays quiet)
    return sign | (abs_bits > 0x7F800000u ? 0x7E00u : 0x7C00u);
  }
  if (abs_bits >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 2^16: overflow to inf
  if (abs_bits < 0x38800000u) {                        // below 2^-14: fp16 subnormal or zero
    if (abs_bits < 0x33000000u) return sign;           // below half the smallest subnormal (2^-25)
    const uint32_t exp = abs_bits >> 23;
    const uint32_t man = (abs_bits & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24: moves the value to units of 2^-24
    const uint32_t half_ulp = 1u << (shift - 1);
    uint32_t result = man >> shift;
    const uint32_t rest = man & ((1u << shift) - 1u);
    if (rest > half_ulp || (rest == half_ulp && (result & 1u))) ++result;
    return sign | static_cast<uint16_t>(result);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rebased = abs_bits - (112u << 23);
  const uint32_t rounded = rebased + 0xFFFu + ((rebased >> 13) & 1u);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

template <int kDType>
ZT_HD float load_as_float(const void* base, int64_t i) {
  if (kDType == kBF16) return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  if (kDType == kF16) return f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

template <int kDType>
ZT_HD void store_low_precision(void* base, int64_t i, float x) {
  if (kDType == kBF16) static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(x);
  if (kDType == kF16) static_cast<uint16_t*>(base)[i] = float_to_f16_bits(x);
}

// One element of the step. `g` is the gradient already widened to float; p, m, v are updated in place.
template <bool kFma>
ZT_HD void adam_update(float g, float& p, float& m, float& v, const AdamScalars& s) {
  if (s.has_scale) g = zt_div(g, s.grad_scale);
  if (s.has_wd) {
    if (s.adamw) {
      p = zt_mul(p, s.decay_keep);
    } else {
      g = zt_madd<kFma>(p, s.l2_wd, g);
    }
  }
  const float diff = zt_sub(g, m);
  m = zt_madd<kFma>(s.lerp_small ? s.lerp_w : s.lerp_w_minus_1, diff, s.lerp_small ? m : g);
  v = zt_madd<kFma>(zt_mul(s.one_minus_beta2, g), g, zt_mul(v, s.beta2));
  const float denom = zt_add(zt_div(zt_sqrt(v), s.bc2_sqrt), s.eps);
  p = zt_add(p, zt_div(zt_mul(s.neg_step_size, m), denom));
}

}  // namespace ztune
