// Block codecs of the runtime's compressed collectives, bit for bit the torch code they replace:
//   int4 (ZeRO++ qgZ, runtime/qgz.py quantize_int4 / dequantize_int4),
//   int8 (qwZ and int8 gradient compression, runtime/comm/compress.py int8_compress / int8_decompress and
//         runtime/zeropp.py dequantize_pieces),
//   1-bit signs (runtime/comm/compress.py onebit_compress's packing / onebit_decompress).
// Loaded with ctypes by runtime/codec_kernels.py through a plain C ABI (no torch headers).
//
// How each step matches torch (torch 2.13, CPU):
// - bf16/fp16 -> fp32 is exact (cpu_adam.h's conversions; `x.float()`).
// - scale = absmax / kMax as one fp32 division (torch divides a float32 tensor by a Python int in float32: checked
//   against numpy). The maximum of |x| is exact in any order, so it is taken over the integer bit patterns.
// - q = round(x / safe) with safe = scale, or 1 where scale is 0 (torch.where(scales > 0, ...)); fp32 division,
//   then round-half-to-even: for |v| <= 2^22, (v + 1.5 * 2^23) - 1.5 * 2^23 rounds v to an integer in the
//   default rounding mode (IEEE 754 addition rounds to nearest even; the sum lies in [2^23, 2^24), where the
//   spacing of floats is 1). v is first clamped to +-(kMax + 1), which changes no result after the final clamp
//   to +-kMax and keeps it in that range.
// - dequantized value = float(q) * scale, one fp32 multiply (1-bit: +-scale, exactly +-1.0 * scale); a decoder
//   that adds or subtracts it rounds once more, as `out += v` / `out -= v` do. Built with -ffp-contract=off so
//   no multiply-add is fused, and without -ffast-math (-fno-trapping-math only lets selects become min/max).
// - 1-bit mean scale: sum |x| per chunk in element order, then / count (see onebit_encode_impl).
// - Non-finite input (NaN/inf anywhere in a block, so a non-finite scale): the functions return kNonFinite
//   before their result is complete and the caller runs the torch code instead. C++ leaves float -> int casts
//   of NaN/inf undefined, and torch's results for them come from its vector instructions (NaN -> bf16 is 0xFFFF
//   from torch 2.13 on x86, not c10's scalar 0x7FC0); falling back keeps the output identical by construction
//   whatever the build, and such steps are rare (an fp16 overflow step, which the engine then skips).
// Single-threaded per call (each rank runs one torch thread). ISA: an AVX2 instance of each loop is chosen at
// run time with __builtin_cpu_supports; the baseline instance runs elsewhere. Both round identically (no FMA,
// no approximate instructions), so the result does not depend on the path.
#include "codec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ztune {
namespace {

using namespace codec;  // codec.h's helpers; this file is its only user

// ---- int4 (qgZ) ---------------------------------------------------------------------------------------------
template <int kDType>
ZT_INLINE int quantize_int4_impl(const void* x, int64_t numel, Rows rows, int64_t block, uint8_t* out,
                                 int64_t out_bytes) {
  const int64_t nb = std::max<int64_t>(1, (numel + block - 1) / block);
  const int64_t head = 4 * nb, packed = (numel + 1) / 2;
  if (block <= 0 || block % 2 || block > kMaxBlock || out_bytes < head + packed) return kBadArgument;
  if (rows.row_stride != rows.row_numel && (rows.row_numel <= 0 || numel % rows.row_numel)) return kBadArgument;
  alignas(64) float v[kMaxBlock];
  alignas(64) float q[kMaxBlock + 1];
  uint8_t* __restrict__ values = out + head;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t begin = b * block, n = std::min(block, numel - begin);
    const uint32_t absmax = load_absmax_rows<kDType>(x, rows, begin, n, v);
    if (absmax >= kExpMask) return kNonFinite;
    const float safe = store_scale<7>(absmax, out + 4 * b);
    quantize_values<7>(v, n, safe, 8.0f, q);
    q[n] = 8.0f;  // an odd numel's last pair: torch's zero padding quantizes to 0 + 8
    uint8_t* __restrict__ dst = values + begin / 2;
    const int64_t pairs = (n + 1) / 2;
    for (int64_t k = 0; k < pairs; ++k) {
      const uint32_t lo = static_cast<uint32_t>(q[2 * k]), hi = static_cast<uint32_t>(q[2 * k + 1]);
      dst[k] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
  memset(values + packed, 0, out_bytes - head - packed);
  return kOk;
}

template <int kMode>
struct DequantizeInt4 {
static ZT_INLINE int run(const uint8_t* buf, int64_t numel, int64_t block, float* __restrict__ out) {
  const int64_t nb = std::max<int64_t>(1, (numel + block - 1) / block);
  if (block <= 0 || block % 2) return kBadArgument;
  if (!scales_finite(buf, nb)) return kNonFinite;
  const uint8_t* __restrict__ values = buf + 4 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    float scale;
    memcpy(&scale, buf + 4 * b, sizeof(scale));
    const int64_t begin = b * block, n = std::min(block, numel - begin), pairs = n / 2;
    const uint8_t* __restrict__ src = values + begin / 2;
    float* __restrict__ dst = out + begin;
    for (int64_t k = 0; k < pairs; ++k) {
      const float lo = static_cast<float>(static_cast<int>(src[k] & 15) - 8) * scale;
      const float hi = static_cast<float>(static_cast<int>(src[k] >> 4) - 8) * scale;
      dst[2 * k] = combine<kMode>(dst[2 * k], lo);
      dst[2 * k + 1] = combine<kMode>(dst[2 * k + 1], hi);
    }
    if (n % 2) {
      const float lo = static_cast<float>(static_cast<int>(src[pairs] & 15) - 8) * scale;
      dst[n - 1] = combine<kMode>(dst[n - 1], lo);
    }
  }
  return kOk;
}
};

// ---- int8 ---------------------------------------------------------------------------------------------------
template <int kDType>
ZT_INLINE int quantize_int8_impl(const void* x, int64_t numel, int64_t chunk, uint8_t* scales, int8_t* values) {
  const int64_t nb = std::max<int64_t>(1, (numel + chunk - 1) / chunk);
  if (chunk <= 0 || chunk > kMaxBlock) return kBadArgument;
  alignas(64) float v[kMaxBlock];
  alignas(64) float q[kMaxBlock];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t begin = b * chunk, n = std::min(chunk, numel - begin);
    const uint32_t absmax = load_absmax<kDType>(x, begin, n, v);
    if (absmax >= kExpMask) return kNonFinite;
    const float safe = store_scale<127>(absmax, scales + 4 * b);
    quantize_values<127>(v, n, safe, 0.0f, q);
    int8_t* __restrict__ dst = values + begin;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int8_t>(static_cast<int>(q[i]));
  }
  return kOk;
}

template <int kOut, int kMode>
ZT_INLINE int dequantize_int8_impl(const uint8_t* scales, const int8_t* values, int64_t numel, int64_t chunk,
                                   void* out) {
  const int64_t nb = std::max<int64_t>(1, (numel + chunk - 1) / chunk);
  if (chunk <= 0) return kBadArgument;
  if (!scales_finite(scales, nb)) return kNonFinite;
  for (int64_t b = 0; b < nb; ++b) {
    float scale;
    memcpy(&scale, scales + 4 * b, sizeof(scale));
    const int64_t begin = b * chunk, n = std::min(chunk, numel - begin);
    const int8_t* __restrict__ src = values + begin;
    if (kOut == kF32) {
      float* __restrict__ dst = static_cast<float*>(out) + begin;
      for (int64_t i = 0; i < n; ++i) dst[i] = combine<kMode>(dst[i], static_cast<float>(src[i]) * scale);
    } else {
      uint16_t* __restrict__ dst = static_cast<uint16_t*>(out) + begin;
      if (kOut == kBF16) {  // finite values only here, so the NaN branch of the conversion never applies
        for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(static_cast<float>(src[i]) * scale);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16_bits(static_cast<float>(src[i]) * scale);
      }
    }
  }
  return kOk;
}

// ---- 1-bit signs (runtime/comm/compress.py onebit_compress / onebit_decompress) ---------------------------------
// mean scale = sum |x| / count per chunk, summed in element order in fp32: what torch's
// linalg.vector_norm(chunks, ord=1, dim=1) does on CPU (a scalar reduction per row, aten's NormOneOps through
// binary_kernel_reduce; checked bit for bit against torch, and again by runtime/comm/compress.py once per process).
constexpr int64_t kLanes = 8;  // chunks summed side by side: 8 independent add chains instead of one

#if ZT_X86
// Rows r0..r7 (8 floats each) become columns: afterwards r_k's lane j is the old r_j's lane k.
ZT_AVX2 inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                               __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// mean_scales_whole for fp32 on AVX2: lane j of `acc` is chunk j's sum. Each step loads 8 elements of each of the
// 8 chunks, transposes them, and adds the 8 columns in element order, so every chunk is still summed one element
// after another (chunk % 8 == 0, checked by the caller).
ZT_AVX2 inline void mean_sums_f32_avx2(const float* x, int64_t chunk, float* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < chunk; i += 8) {
    __m256 r0 = _mm256_loadu_ps(x + i), r1 = _mm256_loadu_ps(x + chunk + i);
    __m256 r2 = _mm256_loadu_ps(x + 2 * chunk + i), r3 = _mm256_loadu_ps(x + 3 * chunk + i);
    __m256 r4 = _mm256_loadu_ps(x + 4 * chunk + i), r5 = _mm256_loadu_ps(x + 5 * chunk + i);
    __m256 r6 = _mm256_loadu_ps(x + 6 * chunk + i), r7 = _mm256_loadu_ps(x + 7 * chunk + i);
    transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
    acc = _mm256_add_ps(acc, _mm256_and_ps(r0, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r1, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r2, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r3, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r4, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r5, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r6, abs_mask));
    acc = _mm256_add_ps(acc, _mm256_and_ps(r7, abs_mask));
  }
  _mm256_storeu_ps(sums, acc);
}
#endif

template <int kDType, bool kAvx2>
ZT_INLINE void mean_scales_whole(const void* x, int64_t first_chunk, int64_t chunk, float* sums) {
#if ZT_X86
  if constexpr (kAvx2 && kDType == kF32 && kLanes == 8) {
    mean_sums_f32_avx2(static_cast<const float*>(x) + first_chunk * chunk, chunk, sums);
    return;
  }
#endif
  float acc[kLanes] = {};
  const int64_t base = first_chunk * chunk;
  for (int64_t i = 0; i < chunk; ++i) {
    for (int64_t j = 0; j < kLanes; ++j) {
      acc[j] = acc[j] + std::fabs(load_as_float<kDType>(x, base + j * chunk + i));
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) sums[j] = acc[j];
}

template <int kDType>
ZT_INLINE uint8_t sign_byte(const void* x, int64_t begin, int64_t count) {
  uint32_t byte = 0;
  for (int64_t j = 0; j < count; ++j) {
    byte |= static_cast<uint32_t>(load_as_float<kDType>(x, begin + j) >= 0.0f) << (7 - j);
  }
  return static_cast<uint8_t>(byte);
}

template <int kDType, bool kAvx2>
ZT_INLINE int onebit_encode_impl(const void* x, int64_t numel, int64_t chunk, int mean_scales, uint8_t* scales,
                                 uint8_t* packed) {
  if (chunk <= 0 || chunk % 8) return kBadArgument;
  const int64_t nb = std::max<int64_t>(1, (numel + chunk - 1) / chunk);
  if (mean_scales) {
    for (int64_t b0 = 0; b0 < nb; b0 += kLanes) {
      float sums[kLanes];
      const int64_t lanes = std::min(kLanes, nb - b0);
      if (lanes == kLanes && (b0 + kLanes) * chunk <= numel) {
        mean_scales_whole<kDType, kAvx2>(x, b0, chunk, sums);
      } else {
        for (int64_t j = 0; j < lanes; ++j) {
          const int64_t begin = (b0 + j) * chunk, n = std::min(chunk, numel - begin);
          float sum = 0.0f;
          for (int64_t i = 0; i < n; ++i) sum = sum + std::fabs(load_as_float<kDType>(x, begin + i));
          sums[j] = sum;
        }
      }
      for (int64_t j = 0; j < lanes; ++j) {
        const int64_t b = b0 + j, n = std::min(chunk, numel - b * chunk);
        // torch's counts: chunk for whole chunks, what is left for the last (numel 0: 0 / 0, NaN, as torch)
        const float scale = sums[j] / static_cast<float>(n);
        if ((float_bits(scale) & kAbsMask) >= kExpMask) return kNonFinite;
        memcpy(scales + 4 * b, &scale, sizeof(scale));
      }
    }
  }
  // Most significant bit first; 1 = x >= 0 (NaN: 0, -0.0: 1); an odd tail's padding bits are 0.
  const int64_t whole = numel / 8;
  for (int64_t k = 0; k < whole; ++k) packed[k] = sign_byte<kDType>(x, 8 * k, 8);
  if (numel % 8) packed[whole] = sign_byte<kDType>(x, 8 * whole, numel % 8);
  return kOk;
}

template <int kMode>
ZT_INLINE void onebit_decode_byte(uint32_t byte, uint32_t scale_bits, int64_t count, float* __restrict__ dst) {
  for (int64_t j = 0; j < count; ++j) {
    // +scale for a set bit, -scale (the sign bit flipped) otherwise
    const float value = bits_float(scale_bits ^ ((((byte >> (7 - j)) & 1u) ^ 1u) << 31));
    dst[j] = combine<kMode>(dst[j], value);
  }
}

template <int kMode>
struct OnebitDecode {
static ZT_INLINE int run(const uint8_t* packed, const uint8_t* scales, int64_t numel, int64_t chunk,
                         float* __restrict__ out) {
  if (chunk <= 0 || chunk % 8) return kBadArgument;
  const int64_t nb = std::max<int64_t>(1, (numel + chunk - 1) / chunk);
  if (!scales_finite(scales, nb)) return kNonFinite;  // +-1 x NaN/inf: left to torch's multiply
  // torch multiplies +-1.0 by the scale: for a finite scale that is exactly +scale or -scale (0 -> -0.0 too)
  for (int64_t b = 0; b < nb; ++b) {
    uint32_t scale_bits;
    memcpy(&scale_bits, scales + 4 * b, sizeof(scale_bits));
    const int64_t begin = b * chunk, n = std::min(chunk, numel - begin);
    const uint8_t* __restrict__ src = packed + begin / 8;
    float* __restrict__ dst = out + begin;
    for (int64_t k = 0; k < n / 8; ++k) onebit_decode_byte<kMode>(src[k], scale_bits, 8, dst + 8 * k);
    if (n % 8) onebit_decode_byte<kMode>(src[n / 8], scale_bits, n % 8, dst + 8 * (n / 8));
  }
  return kOk;
}
};

// ---- ISA dispatch ---------------------------------------------------------------------------------------------
// Each entry point below is instantiated twice: for the baseline ISA and, on x86, for AVX2 (the always-inline
// bodies above are compiled again inside the AVX2 function and vectorised for it).
#define ZT_DISPATCH(ret, name, params, args)       \
  ret name##_base params { return name##_body args; } \
  ZT_DISPATCH_AVX2(ret, name, params, args)        \
  ret name params {                                \
    if (use_avx2()) return name##_avx2 args;       \
    return name##_base args;                       \
  }

int g_baseline_only = 0;  // zt_codec_baseline_only(1): tests run the baseline instance on an AVX2 host

#if ZT_X86
#define ZT_DISPATCH_AVX2(ret, name, params, args) ZT_AVX2 ret name##_avx2 params { return name##_body args; }
bool use_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes && !g_baseline_only;
}
#else
#define ZT_DISPATCH_AVX2(ret, name, params, args) \
  ret name##_avx2 params { return name##_body args; }
bool use_avx2() { return false; }
#endif

ZT_INLINE int quantize_int4_body(const void* x, int dtype, int64_t numel, int64_t row_numel, int64_t row_stride,
                                 int64_t block, uint8_t* out, int64_t out_bytes) {
  const Rows rows{row_numel, row_stride};
  if (dtype == kF32) return quantize_int4_impl<kF32>(x, numel, rows, block, out, out_bytes);
  if (dtype == kBF16) return quantize_int4_impl<kBF16>(x, numel, rows, block, out, out_bytes);
  if (dtype == kF16) return quantize_int4_impl<kF16>(x, numel, rows, block, out, out_bytes);
  return kBadArgument;
}
ZT_DISPATCH(int, quantize_int4,
            (const void* x, int dtype, int64_t numel, int64_t row_numel, int64_t row_stride, int64_t block,
             uint8_t* out, int64_t out_bytes),
            (x, dtype, numel, row_numel, row_stride, block, out, out_bytes))

ZT_INLINE int dequantize_int4_body(const uint8_t* buf, int64_t numel, int64_t block, float* out, int mode) {
  return by_mode<DequantizeInt4>(mode, buf, numel, block, out);
}
ZT_DISPATCH(int, dequantize_int4, (const uint8_t* buf, int64_t numel, int64_t block, float* out, int mode),
            (buf, numel, block, out, mode))

ZT_INLINE int quantize_int8_body(const void* x, int dtype, int64_t numel, int64_t chunk, uint8_t* scales,
                                 int8_t* values) {
  if (dtype == kF32) return quantize_int8_impl<kF32>(x, numel, chunk, scales, values);
  if (dtype == kBF16) return quantize_int8_impl<kBF16>(x, numel, chunk, scales, values);
  if (dtype == kF16) return quantize_int8_impl<kF16>(x, numel, chunk, scales, values);
  return kBadArgument;
}
ZT_DISPATCH(int, quantize_int8,
            (const void* x, int dtype, int64_t numel, int64_t chunk, uint8_t* scales, int8_t* values),
            (x, dtype, numel, chunk, scales, values))

ZT_INLINE int dequantize_int8_body(const uint8_t* scales, const int8_t* values, int64_t numel, int64_t chunk,
                                   void* out, int out_dtype, int mode) {
  if (out_dtype == kF32 && mode == 0) return dequantize_int8_impl<kF32, 0>(scales, values, numel, chunk, out);
  if (out_dtype == kF32 && mode == 1) return dequantize_int8_impl<kF32, 1>(scales, values, numel, chunk, out);
  if (out_dtype == kF32 && mode == -1) return dequantize_int8_impl<kF32, -1>(scales, values, numel, chunk, out);
  if (mode != 0) return kBadArgument;  // only an fp32 `out` accumulates
  if (out_dtype == kBF16) return dequantize_int8_impl<kBF16, 0>(scales, values, numel, chunk, out);
  if (out_dtype == kF16) return dequantize_int8_impl<kF16, 0>(scales, values, numel, chunk, out);
  return kBadArgument;
}
ZT_DISPATCH(int, dequantize_int8,
            (const uint8_t* scales, const int8_t* values, int64_t numel, int64_t chunk, void* out, int out_dtype,
             int mode),
            (scales, values, numel, chunk, out, out_dtype, mode))

// Dispatched by hand: the AVX2 instance also sums fp32 mean scales with intrinsics (mean_sums_f32_avx2).
template <bool kAvx2>
ZT_INLINE int onebit_encode_body(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales,
                                 uint8_t* scales, uint8_t* packed) {
  if (dtype == kF32) return onebit_encode_impl<kF32, kAvx2>(x, numel, chunk, mean_scales, scales, packed);
  if (dtype == kBF16) return onebit_encode_impl<kBF16, kAvx2>(x, numel, chunk, mean_scales, scales, packed);
  if (dtype == kF16) return onebit_encode_impl<kF16, kAvx2>(x, numel, chunk, mean_scales, scales, packed);
  return kBadArgument;
}
int onebit_encode_base(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales, uint8_t* scales,
                       uint8_t* packed) {
  return onebit_encode_body<false>(x, dtype, numel, chunk, mean_scales, scales, packed);
}
#if ZT_X86
ZT_AVX2 int onebit_encode_avx2(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales,
                               uint8_t* scales, uint8_t* packed) {
  return onebit_encode_body<true>(x, dtype, numel, chunk, mean_scales, scales, packed);
}
#else
int onebit_encode_avx2(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales, uint8_t* scales,
                       uint8_t* packed) {
  return onebit_encode_body<false>(x, dtype, numel, chunk, mean_scales, scales, packed);
}
#endif
int onebit_encode(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales, uint8_t* scales,
                  uint8_t* packed) {
  if (use_avx2()) return onebit_encode_avx2(x, dtype, numel, chunk, mean_scales, scales, packed);
  return onebit_encode_base(x, dtype, numel, chunk, mean_scales, scales, packed);
}

ZT_INLINE int onebit_decode_body(const uint8_t* packed, const uint8_t* scales, int64_t numel, int64_t chunk,
                                 float* out, int mode) {
  return by_mode<OnebitDecode>(mode, packed, scales, numel, chunk, out);
}
ZT_DISPATCH(int, onebit_decode,
            (const uint8_t* packed, const uint8_t* scales, int64_t numel, int64_t chunk, float* out,
             int mode),
            (packed, scales, numel, chunk, out, mode))

}  // namespace
}  // namespace ztune

extern "C" {

// 1: every call runs the baseline-ISA instance (tests compare both); 0: the best this CPU has. Returns whether
// the AVX2 instance would run.
int zt_codec_baseline_only(int on) {
  ztune::g_baseline_only = on;
  return ztune::use_avx2();
}

// Every function returns 0 when it wrote its whole result, 1 when the input holds inf or NaN (the caller then
// runs the torch code, which overwrites whatever was written), and -1 for arguments out of range.

// qgZ int4 piece (runtime/qgz.py): `numel` elements of `x` (dtype code 1 fp32, 2 bf16, 3 fp16; rows of
// row_numel elements, row_stride elements apart; contiguous: both = numel) into `out` (out_bytes >= 4 * blocks +
// ceil(numel / 2)): fp32 scales, then q + 8 two per byte (low nibble first), then zeros to out_bytes.
int zt_quantize_int4(const void* x, int dtype, int64_t numel, int64_t row_numel, int64_t row_stride, int64_t block,
                     uint8_t* out, int64_t out_bytes) {
  return ztune::quantize_int4(x, dtype, numel, row_numel, row_stride, block, out, out_bytes);
}

// fp32 [numel] from a zt_quantize_int4 piece: written to `out` (mode 0), added to it (1) or subtracted (-1).
int zt_dequantize_int4(const uint8_t* buf, int64_t numel, int64_t block, float* out, int mode) {
  return ztune::dequantize_int4(buf, numel, block, out, mode);
}

// int8 blocks (runtime/comm/compress.py): fp32 scales (raw bytes, ceil(numel / chunk) of them) and int8 values.
int zt_quantize_int8(const void* x, int dtype, int64_t numel, int64_t chunk, uint8_t* scales, int8_t* values) {
  return ztune::quantize_int8(x, dtype, numel, chunk, scales, values);
}

// float(value) * scale per element into `out` of dtype code out_dtype (fp32, or bf16/fp16 rounded to nearest
// even as torch's copy_ rounds finite values); mode 0 writes, 1 adds, -1 subtracts (fp32 `out` only).
int zt_dequantize_int8(const uint8_t* scales, const int8_t* values, int64_t numel, int64_t chunk, void* out,
                       int out_dtype, int mode) {
  return ztune::dequantize_int8(scales, values, numel, chunk, out, out_dtype, mode);
}

// 1-bit signs of `numel` elements of `x` (dtype code), 8 per byte, most significant bit first, 1 = x >= 0, into
// `packed` (ceil(numel / 8) bytes); with mean_scales, also the per-chunk mean |x| as fp32 bytes into `scales`
// (`scales` is not touched otherwise: the caller computed them).
int zt_onebit_encode(const void* x, int dtype, int64_t numel, int64_t chunk, int mean_scales, uint8_t* scales,
                     uint8_t* packed) {
  return ztune::onebit_encode(x, dtype, numel, chunk, mean_scales, scales, packed);
}

// fp32 [numel] = +scale for a set bit, -scale otherwise: written to `out` (mode 0), added (1) or subtracted (-1).
int zt_onebit_decode(const uint8_t* packed, const uint8_t* scales, int64_t numel, int64_t chunk, float* out,
                     int mode) {
  return ztune::onebit_decode(packed, scales, numel, chunk, out, mode);
}

}  // extern "C"
