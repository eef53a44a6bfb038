// Fused CPU Adam/AdamW step over a flat fp32 shard: one pass reads the gradient (fp32, bf16 or fp16), the fp32
// parameter and both moments, writes them back and, optionally, the parameter rounded to bf16/fp16.
//
// ISA paths are chosen at run time (__builtin_cpu_supports) so one binary, built without -march=native, runs
// on any x86-64 and uses AVX-512 or AVX2 where the host has them. The plain C ABI (loaded with ctypes by
// runtime/ops.py) keeps torch and pybind11 headers out of the build, which then takes seconds, not a minute.
#include "cpu_adam.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZT_X86 1
#else
#define ZT_X86 0
#endif

namespace ztune {
namespace {

enum Simd : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kBest = -1 };

struct Shard {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* out;
};

// FMA rounding in the portable path only where the baseline ISA has a fast fmaf (aarch64, or an x86 build
// with -mfma); on baseline x86-64 fmaf is a libm call, and torch's own DEFAULT kernels do not fuse either.
#if defined(__FP_FAST_FMAF)
constexpr bool kPortableFma = true;
#else
constexpr bool kPortableFma = false;
#endif

// Portable path: the header's scalar math, left to the compiler to vectorise for the baseline ISA. The local
// copy of the scalars and the restrict pointers tell it stores cannot change them, so the per-element
// branches are loop-invariant and unswitched. The rounding to `out` runs as a second loop over each
// L1-sized block: fused into the first, the loop grows past GCC's unswitching limit and stays scalar.
template <int kGrad, int kOut>
void run_portable(const Shard& t, const AdamScalars& scalars, int64_t begin, int64_t end) {
  const AdamScalars s = scalars;
  float* __restrict__ param = t.param;
  float* __restrict__ exp_avg = t.exp_avg;
  float* __restrict__ exp_avg_sq = t.exp_avg_sq;
  const void* __restrict__ grad = t.grad;
  void* __restrict__ out = t.out;
  constexpr int64_t kBlock = 512;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t block_end = std::min(end, block + kBlock);
    for (int64_t i = block; i < block_end; ++i) {
      float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
      adam_update<kPortableFma>(load_as_float<kGrad>(grad, i), p, m, v, s);
      param[i] = p;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
    }
    if (kOut != kNone) {
      for (int64_t i = block; i < block_end; ++i) store_low_precision<kOut>(out, i, param[i]);
    }
  }
}

// Scalar tail of the SIMD paths: FMA rounding, as in their vector bodies.
template <int kGrad, int kOut>
inline void run_tail_fma(const Shard& t, const AdamScalars& s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float p = t.param[i], m = t.exp_avg[i], v = t.exp_avg_sq[i];
    adam_update<true>(load_as_float<kGrad>(t.grad, i), p, m, v, s);
    t.param[i] = p;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    if (kOut != kNone) store_low_precision<kOut>(t.out, i, p);
  }
}

#if ZT_X86
#define ZT_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define ZT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int kGrad, int kOut>
ZT_AVX512 void run_avx512(const Shard& t, const AdamScalars& s, int64_t begin, int64_t end) {
  const __m512 decay_keep = _mm512_set1_ps(s.decay_keep), l2_wd = _mm512_set1_ps(s.l2_wd);
  const __m512 lerp_coeff = _mm512_set1_ps(s.lerp_small ? s.lerp_w : s.lerp_w_minus_1);
  const __m512 beta2 = _mm512_set1_ps(s.beta2), one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 bc2_sqrt = _mm512_set1_ps(s.bc2_sqrt), eps = _mm512_set1_ps(s.eps);
  const __m512 neg_step = _mm512_set1_ps(s.neg_step_size), grad_scale = _mm512_set1_ps(s.grad_scale);
  const __m512i bf16_bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i bf16_nan = _mm512_set1_epi32(0x7FC0);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 g;
    if (kGrad == kF32) {
      g = _mm512_loadu_ps(static_cast<const float*>(t.grad) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(t.grad) + i));
      g = kGrad == kBF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    }
    __m512 p = _mm512_loadu_ps(t.param + i);
    __m512 m = _mm512_loadu_ps(t.exp_avg + i);
    __m512 v = _mm512_loadu_ps(t.exp_avg_sq + i);
    if (s.has_scale) g = _mm512_div_ps(g, grad_scale);
    if (s.has_wd) {
      if (s.adamw) {
        p = _mm512_mul_ps(p, decay_keep);
      } else {
        g = _mm512_fmadd_ps(p, l2_wd, g);
      }
    }
    const __m512 diff = _mm512_sub_ps(g, m);
    m = _mm512_fmadd_ps(lerp_coeff, diff, s.lerp_small ? m : g);
    v = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g, _mm512_mul_ps(v, beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step, m), denom));
    _mm512_storeu_ps(t.param + i, p);
    _mm512_storeu_ps(t.exp_avg + i, m);
    _mm512_storeu_ps(t.exp_avg_sq + i, v);
    if (kOut != kNone) {
      __m256i h;
      if (kOut == kBF16) {  // integer round-to-nearest-even, NaN -> 0x7FC0 (vcvtneps2bf16 would flush subnormals)
        const __m512i bits = _mm512_castps_si512(p);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(bf16_bias, lsb)), 16);
        r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q), r, bf16_nan);
        h = _mm512_cvtepi32_epi16(r);
      } else {
        h = _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(t.out) + i), h);
    }
  }
  run_tail_fma<kGrad, kOut>(t, s, i, end);
}

template <int kGrad, int kOut>
ZT_AVX2 void run_avx2(const Shard& t, const AdamScalars& s, int64_t begin, int64_t end) {
  const __m256 decay_keep = _mm256_set1_ps(s.decay_keep), l2_wd = _mm256_set1_ps(s.l2_wd);
  const __m256 lerp_coeff = _mm256_set1_ps(s.lerp_small ? s.lerp_w : s.lerp_w_minus_1);
  const __m256 beta2 = _mm256_set1_ps(s.beta2), one_minus_beta2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 bc2_sqrt = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps);
  const __m256 neg_step = _mm256_set1_ps(s.neg_step_size), grad_scale = _mm256_set1_ps(s.grad_scale);
  const __m256i bf16_bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i bf16_nan = _mm256_set1_epi32(0x7FC0);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 g;
    if (kGrad == kF32) {
      g = _mm256_loadu_ps(static_cast<const float*>(t.grad) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(t.grad) + i));
      g = kGrad == kBF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    }
    __m256 p = _mm256_loadu_ps(t.param + i);
    __m256 m = _mm256_loadu_ps(t.exp_avg + i);
    __m256 v = _mm256_loadu_ps(t.exp_avg_sq + i);
    if (s.has_scale) g = _mm256_div_ps(g, grad_scale);
    if (s.has_wd) {
      if (s.adamw) {
        p = _mm256_mul_ps(p, decay_keep);
      } else {
        g = _mm256_fmadd_ps(p, l2_wd, g);
      }
    }
    const __m256 diff = _mm256_sub_ps(g, m);
    m = _mm256_fmadd_ps(lerp_coeff, diff, s.lerp_small ? m : g);
    v = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, g), g, _mm256_mul_ps(v, beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, m), denom));
    _mm256_storeu_ps(t.param + i, p);
    _mm256_storeu_ps(t.exp_avg + i, m);
    _mm256_storeu_ps(t.exp_avg_sq + i, v);
    if (kOut != kNone) {
      __m128i h;
      if (kOut == kBF16) {
        const __m256i bits = _mm256_castps_si256(p);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bf16_bias, lsb)), 16);
        r = _mm256_blendv_epi8(r, bf16_nan, _mm256_castps_si256(_mm256_cmp_ps(p, p, _CMP_UNORD_Q)));
        // Values are <= 0xFFFF, so the unsigned-saturating pack is exact.
        h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      } else {
        h = _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(t.out) + i), h);
    }
  }
  run_tail_fma<kGrad, kOut>(t, s, i, end);
}
#endif  // ZT_X86

bool cpu_has(int simd) {
  if (simd == kPortable) return true;
#if ZT_X86
  __builtin_cpu_init();
  if (simd == kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (simd == kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && cpu_has(kAvx2);
  }
#endif
  return false;
}

using RangeFn = void (*)(const Shard&, const AdamScalars&, int64_t, int64_t);

template <int kGrad, int kOut>
RangeFn pick(int simd) {
#if ZT_X86
  if (simd == kAvx512) return &run_avx512<kGrad, kOut>;
  if (simd == kAvx2) return &run_avx2<kGrad, kOut>;
#endif
  return &run_portable<kGrad, kOut>;
}

template <int kGrad>
RangeFn pick_out(int out_dtype, int simd) {
  if (out_dtype == kBF16) return pick<kGrad, kBF16>(simd);
  if (out_dtype == kF16) return pick<kGrad, kF16>(simd);
  return pick<kGrad, kNone>(simd);
}

}  // namespace
}  // namespace ztune

extern "C" {

// 1 if this CPU can run `simd` (0 portable, 1 avx2, 2 avx512), else 0.
int zt_cpu_supports(int simd) { return ztune::cpu_has(simd) ? 1 : 0; }

// The best path this CPU has.
int zt_best_simd() {
  using namespace ztune;
  return cpu_has(kAvx512) ? kAvx512 : (cpu_has(kAvx2) ? kAvx2 : kPortable);
}

// In-place fused Adam/AdamW step over n contiguous elements. Returns 0, or -1 for an unsupported simd request,
// -2 for a bad dtype code. The shard is cut into one contiguous range per thread, cut points on 64-element
// (256-byte) boundaries so threads never share a cache line.
int zt_adam_step(float* param, const void* grad, int grad_dtype, float* exp_avg, float* exp_avg_sq, void* out,
                 int out_dtype, int64_t n, int64_t step, double lr, double beta1, double beta2, double eps,
                 double weight_decay, int adamw, double grad_scale, int simd, int num_threads,
                 int bias_correction) {
  using namespace ztune;
  if (simd == kBest) simd = zt_best_simd();
  if (simd < kPortable || simd > kAvx512 || !cpu_has(simd)) return -1;
  if (out_dtype != kNone && out_dtype != kBF16 && out_dtype != kF16) return -2;
  RangeFn fn;
  if (grad_dtype == kF32) {
    fn = pick_out<kF32>(out_dtype, simd);
  } else if (grad_dtype == kBF16) {
    fn = pick_out<kBF16>(out_dtype, simd);
  } else if (grad_dtype == kF16) {
    fn = pick_out<kF16>(out_dtype, simd);
  } else {
    return -2;
  }
  if (n <= 0) return 0;
  const AdamScalars s = make_adam_scalars(step, lr, beta1, beta2, eps, weight_decay, adamw != 0, grad_scale,
                                            bias_correction != 0);
  const Shard t{param, grad, exp_avg, exp_avg_sq, out};
  constexpr int64_t kAlign = 64;
  // Below ~64K elements a thread team costs more than it saves.
  const int64_t max_threads = std::max<int64_t>(1, n / 65536);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), max_threads));
  if (threads == 1) {
    fn(t, s, 0, n);
    return 0;
  }
#pragma omp parallel num_threads(threads)
  {
    // The runtime may grant fewer threads than asked for, so ranges follow the team actually running.
    const int64_t team = omp_get_num_threads(), rank = omp_get_thread_num();
    const int64_t per_thread = (n / team + kAlign - 1) / kAlign * kAlign;
    const int64_t begin = std::min<int64_t>(n, per_thread * rank);
    const int64_t end = rank == team - 1 ? n : std::min<int64_t>(n, begin + per_thread);
    fn(t, s, begin, end);
  }
  return 0;
}

}  // extern "C"
