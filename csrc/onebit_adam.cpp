// 1-bit Adam's compression-stage update (runtime/onebit_adam.py momentum_, mask_unfrozen_, adam_update_,
// bounded_update_) in one pass per op over flat fp32 buffers, bit for bit the torch ops it replaces.
// Loaded with ctypes by runtime/onebit_kernels.py through a plain C ABI (no torch headers).
//
// How each step matches torch 2.13's CPU kernels (checked element for element by tests/unit/test_onebit_kernels.py):
// - m.lerp_(grad, w), w = 1 - beta1 a Python float rounded to fp32 (ATen's opmath for float): the vector kernel
//   (aten/src/ATen/native/cpu/LerpKernel.cpp, lerp_vec) computes fmadd(w, end - start, start) when |w| < 0.5,
//   else fmadd(w - 1, end - start, end); its scalar tail (aten/src/ATen/native/Lerp.h) writes the same
//   expressions, which GCC contracts to the same FMA in torch's AVX2/AVX-512 builds. `fma` selects fused
//   rounding (torch's AVX2/AVX-512 kernels) or a separate multiply and add (its DEFAULT kernels), as in
//   cpu_adam.h.
// - m.masked_fill_(v == 0, 0.0): a select; -0.0 == 0 is true, NaN == 0 is false, as in torch.
// - sqrt(v): NOT computed here. torch's float32 sqrt on x86 is MKL's vector sqrt (VML, high-accuracy mode),
//   faithfully but not correctly rounded (~17% of random inputs differ from IEEE sqrt by 1 ulp on the
//   development host), so the Python wrapper computes it with torch into a cache-sized scratch buffer, one
//   chunk at a time, and passes it in: elementwise, so a chunk's values are those of the whole tensor.
// - denom = sqrt_v / float(sqrt(c2)) + float(eps): a true fp32 division by the scalar (ATen's div_true_kernel
//   divides; it multiplies by a reciprocal only for bf16/fp16) and one rounded add (add_ with alpha 1).
// - p.mul_(float(1 - lr wd)): one rounded multiply.
// - p.addcdiv_(m, denom, value=v): p + (v * m) / denom (aten/src/ATen/native/cpu/PointwiseOpsKernel.cpp), three
//   roundings in that order in the vector and scalar kernels alike.
// - torch.div(m, denom).div_(c1).clamp_(-b, b): two true divisions, then clamp with NaN passed through
//   (vec::clamp, and the scalar kernel's isnan test); p.add_(step, alpha=-lr) is fmadd(step, alpha, p)
//   (aten/src/ATen/native/ufunc/add.h), fused under `fma` as the lerp is.
// Non-finite input: each thread's range stops at its first block (kBlock elements) holding inf or NaN in an input
// and the functions return the ranges left; the caller runs the torch ops there (the ops are elementwise, so the
// split changes no value). NaN payloads and signs then come from torch's own instructions, whatever this build
// would do, and such steps are rare (an overflowing bf16 step).
// Built with -ffp-contract=off: no multiply-add is fused except at the explicit zt_madd<true> sites.
// Threads: torch.get_num_threads() (OpenMP, one contiguous range each, as cpu_adam.cpp). ISA: AVX-512 / AVX2
// instances of each loop are chosen at run time (__builtin_cpu_supports); the baseline one runs elsewhere. All
// round identically.
#include "cpu_adam.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define ZT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define ZT_X86 1
#define ZT_AVX2 __attribute__((target("avx2,fma")))
#define ZT_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define ZT_X86 0
#endif

namespace ztune {
namespace {

constexpr int64_t kBlock = 1024;  // elements per finiteness check: 4 KiB per buffer, in L1 for the pass after
constexpr uint32_t kExpMask = 0x7F800000u;

// Whether any of x[0, n) is inf or NaN (exponent all ones); written branch-free so it vectorises.
ZT_INLINE bool any_non_finite(const float* __restrict__ x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    memcpy(&b, x + i, sizeof(b));
    bad |= static_cast<uint32_t>((b & kExpMask) == kExpMask);
  }
  return bad != 0;
}

// kLocal: equation (4') of runtime/onebit_adam.py in one pass: the local momentum `m` as below, then
// masked_fill_(v == 0, 0.0) on it, then its copy into `out` (the exchanged momentum's buffer).
template <bool kFma, bool kSmall, bool kLocal>
ZT_INLINE int64_t momentum_impl(float* __restrict__ m, const float* __restrict__ g, int64_t n, float coeff,
                                const float* __restrict__ v, float* __restrict__ out) {
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    float* __restrict__ mb = m + begin;
    const float* __restrict__ gb = g + begin;
    if (any_non_finite(mb, len) || any_non_finite(gb, len)) return begin;
    for (int64_t i = 0; i < len; ++i) {
      const float start = mb[i], end = gb[i];
      float x = zt_madd<kFma>(coeff, zt_sub(end, start), kSmall ? start : end);
      if (kLocal) {
        x = v[begin + i] == 0.0f ? 0.0f : x;
        out[begin + i] = x;
      }
      mb[i] = x;
    }
  }
  return n;
}

template <bool kFma>
ZT_INLINE int64_t momentum_body(float* m, const float* g, int64_t n, float weight, const float* v, float* out) {
  // ATen's is_lerp_weight_small (|w| < 0.5) on the fp32 weight; the large form's coefficient is w - 1 in fp32
  const bool small = std::fabs(weight) < 0.5f;
  const float coeff = small ? weight : zt_sub(weight, 1.0f);
  if (v != nullptr) {
    if (small) return momentum_impl<kFma, true, true>(m, g, n, coeff, v, out);
    return momentum_impl<kFma, false, true>(m, g, n, coeff, v, out);
  }
  if (small) return momentum_impl<kFma, true, false>(m, g, n, coeff, v, out);
  return momentum_impl<kFma, false, false>(m, g, n, coeff, v, out);
}

ZT_INLINE int64_t mask_body(float* __restrict__ m, const float* __restrict__ v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) m[i] = v[i] == 0.0f ? 0.0f : m[i];
  return n;
}

// The step's scalars, each already the fp32 value torch's op uses (runtime/onebit_kernels.py rounds them).
struct UpdateScalars {
  float decay_keep;  // 1 - lr wd (only when has_wd)
  float c2_sqrt;     // sqrt(c2)
  float eps;
  float step_value;  // -lr / c1 (adam_update_'s addcdiv value)
  float c1;          // bounded_update_: the step's second divisor
  float bound;       // bounded_update_: clamp to [-bound, bound]
  float neg_lr;      // bounded_update_: add_'s alpha
};

// kMask: masked_fill_(v == 0, 0.0) on m first (mask_unfrozen_, written back to m), then the update from it.
template <bool kFma, bool kWd, bool kBounded, bool kMask>
ZT_INLINE int64_t update_impl(float* __restrict__ p, float* __restrict__ m, const float* __restrict__ sqrt_v,
                              const float* __restrict__ v, int64_t n, const UpdateScalars& scalars) {
  const UpdateScalars s = scalars;  // a local copy: stores through p cannot change it
  const float lo = -s.bound;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    float* __restrict__ pb = p + begin;
    float* __restrict__ mb = m + begin;
    const float* __restrict__ sb = sqrt_v + begin;
    if (any_non_finite(pb, len) || any_non_finite(mb, len) || any_non_finite(sb, len)) return begin;
    for (int64_t i = 0; i < len; ++i) {
      float x = pb[i];
      float mi = mb[i];
      if (kMask) {
        mi = v[begin + i] == 0.0f ? 0.0f : mi;
        mb[i] = mi;
      }
      if (kWd) x = zt_mul(x, s.decay_keep);
      const float denom = zt_add(zt_div(sb[i], s.c2_sqrt), s.eps);
      if (kBounded) {
        float step = zt_div(zt_div(mi, denom), s.c1);
        // clamp_: min(max(step, lo), hi); a NaN here (0 / 0 at eps 0) passes through as torch's clamp passes it
        step = step != step ? step : std::min(std::max(step, lo), s.bound);
        x = zt_madd<kFma>(step, s.neg_lr, x);
      } else {
        x = zt_add(x, zt_div(zt_mul(s.step_value, mi), denom));
      }
      pb[i] = x;
    }
  }
  return n;
}

template <bool kFma, bool kWd, bool kBounded>
ZT_INLINE int64_t update_masked(float* p, float* m, const float* sqrt_v, const float* v, int64_t n,
                                const UpdateScalars& s) {
  if (v != nullptr) return update_impl<kFma, kWd, kBounded, true>(p, m, sqrt_v, v, n, s);
  return update_impl<kFma, kWd, kBounded, false>(p, m, sqrt_v, v, n, s);
}

template <bool kFma>
ZT_INLINE int64_t update_body(float* p, float* m, const float* sqrt_v, const float* v, int64_t n,
                              const UpdateScalars& s, int has_wd, int bounded) {
  if (has_wd && bounded) return update_masked<kFma, true, true>(p, m, sqrt_v, v, n, s);
  if (has_wd) return update_masked<kFma, true, false>(p, m, sqrt_v, v, n, s);
  if (bounded) return update_masked<kFma, false, true>(p, m, sqrt_v, v, n, s);
  return update_masked<kFma, false, false>(p, m, sqrt_v, v, n, s);
}

// ---- ISA dispatch: each body compiled for the baseline ISA and, on x86, again for AVX2 and AVX-512 -------------
int g_isa_cap = 2;  // zt_onebit_adam_isa_cap: tests run the AVX2 and baseline instances on an AVX-512 host

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

int best_isa() {
#if ZT_X86
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return static_cast<int>(kAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return static_cast<int>(kAvx2);
    return static_cast<int>(kBase);
  }();
  return std::min(isa, g_isa_cap);
#else
  return kBase;
#endif
}

#define ZT_INSTANCES(ret, name, params, args)                                          \
  ret name##_base params { return name##_body args; }                                   \
  ZT_SIMD_INSTANCES(ret, name, params, args)                                            \
  ret name params {                                                                     \
    const int isa = best_isa();                                                         \
    if (isa == kAvx512) return name##_avx512 args;                                      \
    if (isa == kAvx2) return name##_avx2 args;                                          \
    return name##_base args;                                                            \
  }
#if ZT_X86
#define ZT_SIMD_INSTANCES(ret, name, params, args)             \
  ZT_AVX2 ret name##_avx2 params { return name##_body args; } \
  ZT_AVX512 ret name##_avx512 params { return name##_body args; }
#else
#define ZT_SIMD_INSTANCES(ret, name, params, args)   \
  ret name##_avx2 params { return name##_body args; } \
  ret name##_avx512 params { return name##_body args; }
#endif

ZT_INLINE int64_t momentum_fma_body(float* m, const float* g, int64_t n, float w, const float* v, float* out) {
  return momentum_body<true>(m, g, n, w, v, out);
}
ZT_INLINE int64_t momentum_plain_body(float* m, const float* g, int64_t n, float w, const float* v, float* out) {
  return momentum_body<false>(m, g, n, w, v, out);
}
ZT_INLINE int64_t update_fma_body(float* p, float* m, const float* q, const float* v, int64_t n,
                                  const UpdateScalars& s, int wd, int b) {
  return update_body<true>(p, m, q, v, n, s, wd, b);
}
ZT_INLINE int64_t update_plain_body(float* p, float* m, const float* q, const float* v, int64_t n,
                                    const UpdateScalars& s, int wd, int b) {
  return update_body<false>(p, m, q, v, n, s, wd, b);
}
ZT_INSTANCES(int64_t, momentum_fma, (float* m, const float* g, int64_t n, float w, const float* v, float* out),
             (m, g, n, w, v, out))
ZT_INSTANCES(int64_t, momentum_plain, (float* m, const float* g, int64_t n, float w, const float* v, float* out),
             (m, g, n, w, v, out))
ZT_INSTANCES(int64_t, mask, (float* m, const float* v, int64_t n), (m, v, n))
ZT_INSTANCES(int64_t, update_fma,
             (float* p, float* m, const float* q, const float* v, int64_t n, const UpdateScalars& s, int wd, int b),
             (p, m, q, v, n, s, wd, b))
ZT_INSTANCES(int64_t, update_plain,
             (float* p, float* m, const float* q, const float* v, int64_t n, const UpdateScalars& s, int wd, int b),
             (p, m, q, v, n, s, wd, b))

// Runs fn(begin, end) -> the absolute index it finished up to, over [0, n) cut into one contiguous range per
// thread (`num_threads`, as torch.get_num_threads(); fewer below kMinThreadNumel elements each, where a thread team
// costs more than it saves; cut points on kBlock boundaries). Each range a thread left unfinished (a block holding
// inf/NaN) goes to `left` as a (begin, end) pair: room for 2 x num_threads entries. Returns the number of pairs.
constexpr int64_t kMinThreadNumel = 65536;
constexpr int kMaxThreads = 512;

template <typename Fn>
int64_t run_ranges(int64_t n, int num_threads, int64_t* left, Fn&& fn) {
  const int64_t wanted = std::min<int64_t>({std::max(num_threads, 1), std::max<int64_t>(1, n / kMinThreadNumel),
                                            kMaxThreads});
  int64_t begins[kMaxThreads], ends[kMaxThreads], dones[kMaxThreads];
  int64_t team_size = 1;
  if (wanted == 1) {
    begins[0] = 0;
    ends[0] = n;
    dones[0] = fn(int64_t{0}, n);
  } else {
#pragma omp parallel num_threads(static_cast<int>(wanted))
    {
      // The runtime may grant fewer threads than asked for, so ranges follow the team actually running.
      const int64_t team = omp_get_num_threads(), rank = omp_get_thread_num();
      const int64_t per_thread = (n / team + kBlock - 1) / kBlock * kBlock;
      const int64_t begin = std::min<int64_t>(n, per_thread * rank);
      const int64_t end = rank == team - 1 ? n : std::min<int64_t>(n, begin + per_thread);
      begins[rank] = begin;
      ends[rank] = end;
      dones[rank] = begin < end ? fn(begin, end) : end;
      if (rank == 0) team_size = team;
    }
  }
  int64_t count = 0;
  for (int64_t r = 0; r < team_size; ++r) {
    if (dones[r] < ends[r]) {
      left[2 * count] = dones[r];
      left[2 * count + 1] = ends[r];
      ++count;
    }
  }
  return count;
}

}  // namespace
}  // namespace ztune

extern "C" {

// The highest instance calls may run: 0 baseline, 1 AVX2, 2 AVX-512 (the default: the best this CPU has). Tests
// lower it to compare the instances. Returns the instance that runs now.
int zt_onebit_adam_isa_cap(int cap) {
  ztune::g_isa_cap = std::max(0, std::min(cap, 2));
  return ztune::best_isa();
}

// Every function below runs on `num_threads` threads (each a contiguous range) and returns how many ranges it left
// unfinished, written to `left` as (begin, end) element pairs (room for 2 x num_threads): 0 when it wrote the whole
// result. A range is left from the first kBlock-element block of its thread that holds inf/NaN in an input on;
// nothing in it is written, and the caller runs the torch ops there. -1: arguments out of range.

// m[i] <- lerp(m[i], grad[i], weight) for i < numel, as torch's lerp_ with a scalar weight rounds it (fma: 1 for
// torch's FMA kernels, 0 for its DEFAULT ones). With v (not NULL): then m[i] <- 0 where v[i] == 0, and out[i] <-
// m[i] (1-bit Adam's local momentum, (4')). Inputs checked for inf/NaN: m, grad.
int64_t zt_onebit_momentum(float* m, const float* grad, int64_t numel, float weight, const float* v, float* out,
                           int fma, int num_threads, int64_t* left) {
  if (numel <= 0) return 0;
  if (v != nullptr && out == nullptr) return -1;
  return ztune::run_ranges(numel, num_threads, left, [&](int64_t b, int64_t e) -> int64_t {
    const float* vb = v == nullptr ? nullptr : v + b;
    float* ob = out == nullptr ? nullptr : out + b;
    return b + (fma ? ztune::momentum_fma(m + b, grad + b, e - b, weight, vb, ob)
                    : ztune::momentum_plain(m + b, grad + b, e - b, weight, vb, ob));
  });
}

// m[i] <- 0 where v[i] == 0 (masked_fill_(v == 0, 0.0)); takes any input (always returns 0).
int64_t zt_onebit_mask(float* m, const float* v, int64_t numel, int num_threads, int64_t* left) {
  if (numel <= 0) return 0;
  return ztune::run_ranges(numel, num_threads, left,
                           [&](int64_t b, int64_t e) -> int64_t { return b + ztune::mask(m + b, v + b, e - b); });
}

// The frozen-variance update of `numel` masters p from momentum m and sqrt_v (torch's sqrt of the frozen
// variance): adam_update_ (bounded 0) or bounded_update_ (1), weight decay when has_wd. With v (not NULL), first
// m <- 0 where v == 0 (mask_unfrozen_, written to m). Scalars as the UpdateScalars fields. Inputs checked for
// inf/NaN: p, m, sqrt_v (a range left is not written, m included).
int64_t zt_onebit_update(float* p, float* m, const float* sqrt_v, const float* v, int64_t numel, int has_wd,
                         int bounded, float decay_keep, float c2_sqrt, float eps, float step_value, float c1,
                         float bound, float neg_lr, int fma, int num_threads, int64_t* left) {
  if (numel <= 0) return 0;
  const ztune::UpdateScalars s{decay_keep, c2_sqrt, eps, step_value, c1, bound, neg_lr};
  return ztune::run_ranges(numel, num_threads, left, [&](int64_t b, int64_t e) -> int64_t {
    const float* vb = v == nullptr ? nullptr : v + b;
    return b + (fma ? ztune::update_fma(p + b, m + b, sqrt_v + b, vb, e - b, s, has_wd, bounded)
                    : ztune::update_plain(p + b, m + b, sqrt_v + b, vb, e - b, s, has_wd, bounded));
  });
}

}  // extern "C"
