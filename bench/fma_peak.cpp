// The float32 FMA rate one core reaches from registers alone (24 independent AVX-512
// accumulators, 12 AVX2 ones), by the thread's CPU time: the compute ceiling the target
// attention floors of bench/results/cpu_attention_avx512.md are stated against (MKL's
// sgemm, the rate behind bench_cpu_attention.py's floor, runs a non-AVX-512 path on AMD).
//
//   g++ -O3 -o /tmp/fma_peak bench/fma_peak.cpp && /tmp/fma_peak
#include <immintrin.h>

#include <cstdio>
#include <ctime>

static double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

__attribute__((target("avx512f"))) static double avx512_gflops(long iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(0.5f);
  const __m512 a = _mm512_set1_ps(0.9999f), b = _mm512_set1_ps(1e-4f);
  const double t0 = thread_seconds();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  const double s = thread_seconds() - t0;
  float sink = 0;
  for (int i = 0; i < 24; ++i) sink += _mm512_cvtss_f32(acc[i]);
  return sink == 0.0f ? 0.0 : iters * 24.0 * 16 * 2 / s / 1e9;
}

__attribute__((target("avx2,fma"))) static double avx2_gflops(long iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.5f);
  const __m256 a = _mm256_set1_ps(0.9999f), b = _mm256_set1_ps(1e-4f);
  const double t0 = thread_seconds();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  const double s = thread_seconds() - t0;
  float sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);
  return sink == 0.0f ? 0.0 : iters * 12.0 * 8 * 2 / s / 1e9;
}

int main() {
  const long iters = 20000000;
  for (int round = 0; round < 3; ++round) {
    const double wide = __builtin_cpu_supports("avx512f") ? avx512_gflops(iters) : 0.0;
    std::printf("AVX-512: %6.1f GFLOP/s   AVX2: %6.1f GFLOP/s\n", wide, avx2_gflops(iters));
  }
}
