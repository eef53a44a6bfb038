// Scalar building blocks of the block codecs in codec.cpp: dtype loads with the block's absmax, the round-to-
// nearest-even quantizer, scales, and the decoders' write/add/subtract. Included by codec.cpp only; the file
// comment there says how each step matches torch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_adam.h"

namespace ztune {
namespace codec {

constexpr int kOk = 0;
constexpr int kNonFinite = 1;
constexpr int kBadArgument = -1;
constexpr int64_t kMaxBlock = 8192;  // codec.cpp keeps a block (or two) of scratch on the stack: 32 KiB each
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kExpMask = 0x7F800000u;  // |bits| >= this: inf or NaN

#define ZT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define ZT_X86 1
#define ZT_AVX2 __attribute__((target("avx2,f16c")))
#else
#define ZT_X86 0
#endif

ZT_INLINE uint32_t float_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
}

ZT_INLINE float bits_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

// `n` elements of `x` (dtype kDType) from `begin`, widened to fp32 into `dst`; returns max |bits| (the absmax's
// bit pattern for finite input; >= kExpMask when any element is inf or NaN).
template <int kDType>
ZT_INLINE uint32_t load_absmax(const void* x, int64_t begin, int64_t n, float* __restrict__ dst) {
  uint32_t m = 0;
  if (kDType == kBF16) {
    const uint16_t* __restrict__ src = static_cast<const uint16_t*>(x) + begin;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t b = static_cast<uint32_t>(src[i]) << 16;
      dst[i] = bits_float(b);
      const uint32_t a = b & kAbsMask;
      m = a > m ? a : m;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = load_as_float<kDType>(x, begin + i);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t a = float_bits(dst[i]) & kAbsMask;
      m = a > m ? a : m;
    }
  }
  return m;
}

// The input of a quantizer: row-major rows of row_numel elements whose starts lie row_stride elements apart (a
// contiguous tensor: row_stride == row_numel). qgZ quantizes a strided [hosts, shard] slice of its bucket.
struct Rows {
  int64_t row_numel;
  int64_t row_stride;
};

// load_absmax of logical elements [begin, begin + n) of `rows`.
template <int kDType>
ZT_INLINE uint32_t load_absmax_rows(const void* x, Rows rows, int64_t begin, int64_t n, float* __restrict__ dst) {
  if (rows.row_stride == rows.row_numel) return load_absmax<kDType>(x, begin, n, dst);
  uint32_t m = 0;
  for (int64_t done = 0; done < n;) {
    const int64_t i = begin + done, r = i / rows.row_numel, c = i % rows.row_numel;
    const int64_t len = std::min(n - done, rows.row_numel - c);
    const uint32_t part = load_absmax<kDType>(x, r * rows.row_stride + c, len, dst + done);
    m = part > m ? part : m;
    done += len;
  }
  return m;
}

// round(v / safe) clamped to +-kMax, plus `offset`, for `n` values (see the file comment for the rounding).
template <int kMax>
ZT_INLINE void quantize_values(const float* __restrict__ v, int64_t n, float safe, float offset,
                               float* __restrict__ q) {
  constexpr float kLimit = static_cast<float>(kMax + 1);
  for (int64_t i = 0; i < n; ++i) {
    float t = v[i] / safe;
    t = t < -kLimit ? -kLimit : t;
    t = t > kLimit ? kLimit : t;
    t = (t + kRoundMagic) - kRoundMagic;
    t = t < -static_cast<float>(kMax) ? -static_cast<float>(kMax) : t;
    t = t > static_cast<float>(kMax) ? static_cast<float>(kMax) : t;
    q[i] = t + offset;
  }
}

// scale = absmax / kMax written as raw bytes at `scale_out`; returns the divisor for the values.
template <int kMax>
ZT_INLINE float store_scale(uint32_t absmax_bits, uint8_t* scale_out) {
  const float scale = bits_float(absmax_bits) / static_cast<float>(kMax);
  memcpy(scale_out, &scale, sizeof(scale));
  return scale > 0.0f ? scale : 1.0f;
}

// Decoders write (kMode 0), add (1) or subtract (-1) each value: `out = v`, `out += v`, `out -= v` in torch, each
// one fp32 rounding (torch's sub_ is add with alpha -1: a + (-1 x b), exact before the one rounding).
template <int kMode>
ZT_INLINE float combine(float dst, float value) {
  return kMode == 0 ? value : (kMode > 0 ? dst + value : dst - value);
}

template <template <int> class Impl, typename... Args>
ZT_INLINE int by_mode(int mode, Args... args) {
  if (mode == 0) return Impl<0>::run(args...);
  if (mode == 1) return Impl<1>::run(args...);
  if (mode == -1) return Impl<-1>::run(args...);
  return kBadArgument;
}

ZT_INLINE bool scales_finite(const uint8_t* scales, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    uint32_t bits;
    memcpy(&bits, scales + 4 * b, sizeof(bits));
    if ((bits & kAbsMask) >= kExpMask) return false;
  }
  return true;
}

}  // namespace codec
}  // namespace ztune
