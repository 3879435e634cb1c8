// Branch-free exp (and sigmoid) for the CPU kernels' elementwise loops: loops over it vectorise (GCC),
// unlike calls to std::exp. Shared by gru_scan_cpu.cpp and dice_cpu.cpp.
#pragma once

#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>

namespace interest_kernels {

#if defined(__GNUC__) && !defined(__clang__)
#define IK_INLINE inline __attribute__((always_inline))
#else
#define IK_INLINE inline
#endif

// A function compiled for several x86 instruction sets, the loader picking one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IK_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "avx", "default")))
#else
#define IK_CLONES
#endif

// exp(x) for float: range reduction x = k ln2 + r, a degree-6 polynomial for e^r, and 2^k
// through the exponent bits. The argument is clamped to [-87, 87] (results stay finite and
// normal) by comparing its magnitude's bits as integers: a float comparison in a select
// keeps GCC from vectorising the loop unless -fno-trapping-math. No branches, so loops
// over it vectorise. Relative error a few ulp.
IK_INLINE float fast_exp(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  const int32_t magnitude = bits & INT32_MAX;
  const int32_t limit = std::bit_cast<int32_t>(87.0f);
  x = std::bit_cast<float>((magnitude > limit ? limit : magnitude) | (bits & INT32_MIN));
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float k = x * 1.44269504088896341f + shifter;
  k -= shifter;
  float r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
}

IK_INLINE double fast_exp(double x) { return std::exp(x); }

template <typename T>
IK_INLINE T fast_sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

}  // namespace interest_kernels
