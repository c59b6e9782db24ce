// SIMD helpers of the native CPU kernels (GNU vector extensions: GCC and Clang): 16-lane float
// vectors, functions compiled for several x86-64 levels and picked at load time, dtype loads.
//
// A kernel's entry point carries LORAMIX_SIMD_CLONES (AVX-512, AVX2 + FMA and baseline x86-64
// builds, chosen by the CPU at load time: GCC 11+'s target_clones, Linux x86-64; other GNU-compatible
// targets get one build for the compiler's flags); everything it calls is LORAMIX_INLINE, so it is
// compiled for each of those targets too. Include only under `#if defined(__GNUC__)`.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

// (GCC 11 named the x86-64-v3 / v4 levels; older GCCs and Clang build once, for their flags.)
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11
#define LORAMIX_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORAMIX_SIMD_CLONES
#endif
// Inlined into the cloned entry point, so compiled for each of its targets.
#define LORAMIX_INLINE inline __attribute__((always_inline))
// The 64-byte vector type passes through inlined helpers only: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace loramix {
namespace simd {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Element dtypes of the float tensors, as the kernels pass them.
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

LORAMIX_INLINE vf splat(float x) { return vf{} + x; }
LORAMIX_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
LORAMIX_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }

LORAMIX_INLINE float load1(const char* p, int dtype) {
  if (dtype == kBF16) return static_cast<float>(*reinterpret_cast<const c10::BFloat16*>(p));
  if (dtype == kF16) return static_cast<float>(*reinterpret_cast<const c10::Half*>(p));
  return *reinterpret_cast<const float*>(p);
}

LORAMIX_INLINE void store1(char* p, float x, int dtype) {
  if (dtype == kBF16) {
    *reinterpret_cast<c10::BFloat16*>(p) = c10::BFloat16(x);
  } else if (dtype == kF16) {
    *reinterpret_cast<c10::Half*>(p) = c10::Half(x);
  } else {
    *reinterpret_cast<float*>(p) = x;
  }
}

// n elements from `src` (element stride in bytes) as fp32 into `dst`.
LORAMIX_INLINE void load_row(float* dst, const char* src, int64_t n, int64_t stride, int dtype,
                             int64_t es) {
  if (stride == es && dtype == kBF16) {  // bf16 -> fp32 is a 16-bit shift (vectorises)
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < n; ++d) {
      const uint32_t b = uint32_t{s[d]} << 16;
      std::memcpy(dst + d, &b, 4);
    }
  } else if (stride == es && dtype == kF32) {
    std::memcpy(dst, src, n * 4);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = load1(src + d * stride, dtype);
  }
}

// Lane-wise x - x of n floats added to z: NaN there iff a value was not finite.
LORAMIX_INLINE void add_nonfinite(const float* x, int64_t n, vf& z) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    vf v;
    std::memcpy(&v, x + d, sizeof v);
    z += v - v;
  }
  for (; d < n; ++d) z[0] += x[d] - x[d];
}

LORAMIX_INLINE float hsum(vf v) {
  float s = 0.0f;
  for (int x = 0; x < kLanes; ++x) s += v[x];
  return s;
}

LORAMIX_INLINE float hmin(vf v) {
  float s = v[0];
  for (int x = 1; x < kLanes; ++x) s = v[x] < s ? v[x] : s;
  return s;
}

}  // namespace simd
}  // namespace loramix
