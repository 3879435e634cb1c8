// Fused CPU target attention (SPEC section 1): the forward that recomputes in its
// backward, and the training form that keeps each layer's pre-activation (and computes
// Dice's batch statistics), with their backwards.
//
// Canonical shapes (interest_kernels/ops/target_attention/cpu.py builds them):
//   query (B, Eq, D) with Eq in {1, E};  keys (R, E, T, D), R = B or the history rows
//   named by key_index (B,);  lengths (R,) or mask (R, T) bool;  G = E for one MLP per
//   head, else 1.  weights[0] (G, H1, 4D), weights[l] (G, H_l, H_{l-1});  biases[l]
//   (G, H_l);  out_weight (G, H_L);  out_bias (G,);  act_params per layer: prelu
//   [slope (G, H_l)], dice [alpha, scale, shift] (G, H_l) with
//   dice(z) = z * (alpha + (1 - alpha) * sigmoid(z * scale + shift)), or with batch
//   statistics (the training operator's dice_eps) [alpha, gamma, beta].
// All floating tensors in float32 or float64 (the Python side casts).
//
// One work item is a (query b, head e) pair. The first layer uses SPEC's identity,
//   W_1 x_t = qterm + k_t M,  qterm = (W_q + W_d) q + c_1,  M = (W_k - W_d)^T + diag(q) W_p^T,
// so a tile of keys needs one (rows x D) x (D x H1) GEMM. The keys are walked in tiles
// of kTileRows rows; hidden activations live in a per-thread workspace, so the no-grad
// forward writes nothing of size (B, T, H). Threads take contiguous blocks of queries
// (all heads of a query in one thread, so query and key gradients have one writer);
// weight gradients and statistics gather in the accumulators of a fixed number of blocks,
// summed in block order (the same bits for any thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <tuple>
#include <vector>

// Float compares and conversions may be vectorised (torch itself builds this way).
#pragma GCC optimize("no-trapping-math", "no-math-errno")
// GCC 12's AVX-512 headers start some intrinsics from a self-initialised "undefined" vector.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace interest_kernels {
namespace target_attention {
namespace {

constexpr int64_t kTileRows = 128;
constexpr int kMaxLayers = 3;

enum class Act { kIdentity, kSigmoid, kRelu, kPrelu, kDice };

Act parse_activation(const std::string& name) {
  if (name == "identity") return Act::kIdentity;
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "relu") return Act::kRelu;
  if (name == "prelu") return Act::kPrelu;
  if (name == "dice") return Act::kDice;
  TORCH_CHECK_VALUE(false, "activation: unknown activation '", name, "'");
}

int act_param_count(Act act) { return act == Act::kPrelu ? 1 : act == Act::kDice ? 3 : 0; }

// ---- elementwise math ------------------------------------------------------------
// The float versions are compiled for AVX-512, AVX2 and the baseline and picked at
// load time; exp_poly is a Taylor polynomial the compiler vectorises (relative error
// ~1e-7 for x >= -87; below, it returns e^-87, so sigmoid(x <= -87) = 6e-39). The
// hand-written AVX-512 paths use exp_neg16 below.

__attribute__((always_inline)) inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const int32_t ki = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float k = static_cast<float>(ki);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
__attribute__((always_inline)) inline float sigmoid_of(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

#if defined(__x86_64__)
#define IK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define IK_AVX512 __attribute__((target("avx512f")))
#else
#define IK_CLONES
#endif

#if defined(__x86_64__)
// e^-x on 16 floats (x clamped to [-88, 104]: e^-104 scales to 0, so that a softmax
// weight far below the row's maximum is 0 as std::exp gives): e^-x = 2^n e^r with n = round(-x / ln 2)
// and r = -x - n ln 2 (ln 2 in two parts), e^r by a degree-6 polynomial fitted on
// |r| <= ln 2 / 2 (relative error 3e-9 before rounding), 2^n by scalef. NaN propagates.
IK_AVX512 __attribute__((always_inline)) inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.0f), _mm512_min_ps(_mm512_set1_ps(104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 q = _mm512_set1_ps(1.394858118146658e-3f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.375128731131554e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1666217148303986e-2f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.16666415333747864f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, one);
  q = _mm512_fmadd_ps(q, r, one);
  return _mm512_scalef_ps(q, n);
}

// sigmoid(x) = 1 / (1 + e^-x), the reciprocal by rcp14 and one Newton step (about 1e-7
// relative in all).
IK_AVX512 __attribute__((always_inline)) inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(exp_neg16(x), one);
  const __m512 inv = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(inv, _mm512_fnmadd_ps(d, inv, one), inv);
}

IK_AVX512 __attribute__((always_inline)) inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}
#endif

// h = act(z) on rows x cols (row-major); params (cols,) each.
template <typename T>
__attribute__((always_inline)) inline void act_forward_impl(Act act, const T* __restrict__ z, T* __restrict__ h, int64_t rows,
                                                  int64_t cols, const T* __restrict__ p0,
                                                  const T* __restrict__ p1, const T* __restrict__ p2) {
  const int64_t n = rows * cols;
  switch (act) {
    case Act::kIdentity:
      std::copy(z, z + n, h);
      return;
    case Act::kSigmoid:
      for (int64_t i = 0; i < n; ++i) h[i] = sigmoid_of(z[i]);
      return;
    case Act::kRelu:
      for (int64_t i = 0; i < n; ++i) h[i] = z[i] > T(0) ? z[i] : T(0);
      return;
    case Act::kPrelu:
      for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * cols;
        T* hr = h + r * cols;
        for (int64_t j = 0; j < cols; ++j) hr[j] = zr[j] >= T(0) ? zr[j] : p0[j] * zr[j];
      }
      return;
    case Act::kDice:
      for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * cols;
        T* hr = h + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const T p = sigmoid_of(zr[j] * p1[j] + p2[j]);
          hr[j] = zr[j] * (p0[j] + (T(1) - p0[j]) * p);
        }
      }
      return;
  }
}

// dz = dh * act'(z); parameter gradients added to g0.. (cols,).
template <typename T>
__attribute__((always_inline)) inline void act_backward_impl(Act act, const T* __restrict__ z, const T* __restrict__ h,
                                                   const T* __restrict__ dh, T* __restrict__ dz,
                                                   int64_t rows, int64_t cols,
                                                   const T* __restrict__ p0, const T* __restrict__ p1,
                                                   const T* __restrict__ p2, T* __restrict__ g0,
                                                   T* __restrict__ g1, T* __restrict__ g2) {
  const int64_t n = rows * cols;
  switch (act) {
    case Act::kIdentity:
      std::copy(dh, dh + n, dz);
      return;
    case Act::kSigmoid:
      for (int64_t i = 0; i < n; ++i) dz[i] = dh[i] * h[i] * (T(1) - h[i]);
      return;
    case Act::kRelu:
      for (int64_t i = 0; i < n; ++i) dz[i] = z[i] > T(0) ? dh[i] : T(0);
      return;
    case Act::kPrelu:
      for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * cols;
        const T* dhr = dh + r * cols;
        T* dzr = dz + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const bool pos = zr[j] >= T(0);
          dzr[j] = pos ? dhr[j] : p0[j] * dhr[j];
          g0[j] += pos ? T(0) : zr[j] * dhr[j];
        }
      }
      return;
    case Act::kDice:
      for (int64_t r = 0; r < rows; ++r) {
        const T* zr = z + r * cols;
        const T* dhr = dh + r * cols;
        T* dzr = dz + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const T p = sigmoid_of(zr[j] * p1[j] + p2[j]);
          const T gz = dhr[j] * zr[j];
          const T dpre = gz * (T(1) - p0[j]) * p * (T(1) - p);
          dzr[j] = dhr[j] * (p0[j] + (T(1) - p0[j]) * p) + dpre * p1[j];
          g0[j] += gz * (T(1) - p);
          g1[j] += dpre * zr[j];
          g2[j] += dpre;
        }
      }
      return;
  }
}

#if defined(__x86_64__)
// Sigmoid and Dice (the activations with an exponential) in AVX-512 intrinsics; the
// compiler's vectorisation of exp_poly and of the division costs about three times more.
IK_AVX512 void act_forward_avx512(Act act, const float* z, float* h, int64_t rows, int64_t cols,
                                  const float* p0, const float* p1, const float* p2) {
  if (act == Act::kSigmoid) {
    const int64_t n = rows * cols;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = first_lanes(n - i);
      _mm512_mask_storeu_ps(h + i, m, sigmoid16(_mm512_maskz_loadu_ps(m, z + i)));
    }
    return;
  }
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = first_lanes(cols - j);
    const __m512 alpha = _mm512_maskz_loadu_ps(m, p0 + j), scale = _mm512_maskz_loadu_ps(m, p1 + j),
                 shift = _mm512_maskz_loadu_ps(m, p2 + j);
    const __m512 gate = _mm512_sub_ps(one, alpha);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(m, z + r * cols + j);
      const __m512 p = sigmoid16(_mm512_fmadd_ps(x, scale, shift));
      _mm512_mask_storeu_ps(h + r * cols + j, m, _mm512_mul_ps(x, _mm512_fmadd_ps(gate, p, alpha)));
    }
  }
}

// Dice's backward (see act_backward_impl) on 16 channels at a time.
IK_AVX512 void dice_backward_avx512(const float* z, const float* dh, float* dz, int64_t rows,
                                    int64_t cols, const float* p0, const float* p1, const float* p2,
                                    float* g0, float* g1, float* g2) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = first_lanes(cols - j);
    const __m512 alpha = _mm512_maskz_loadu_ps(m, p0 + j), scale = _mm512_maskz_loadu_ps(m, p1 + j),
                 shift = _mm512_maskz_loadu_ps(m, p2 + j);
    const __m512 gate = _mm512_sub_ps(one, alpha);
    __m512 ga = _mm512_setzero_ps(), gs = _mm512_setzero_ps(), gb = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(m, z + r * cols + j);
      const __m512 d = _mm512_maskz_loadu_ps(m, dh + r * cols + j);
      const __m512 p = sigmoid16(_mm512_fmadd_ps(x, scale, shift));
      const __m512 q = _mm512_sub_ps(one, p);
      const __m512 gz = _mm512_mul_ps(d, x);
      const __m512 dpre = _mm512_mul_ps(_mm512_mul_ps(gz, gate), _mm512_mul_ps(p, q));
      _mm512_mask_storeu_ps(dz + r * cols + j, m,
                            _mm512_fmadd_ps(d, _mm512_fmadd_ps(gate, p, alpha), _mm512_mul_ps(dpre, scale)));
      ga = _mm512_fmadd_ps(gz, q, ga);
      gs = _mm512_fmadd_ps(dpre, x, gs);
      gb = _mm512_add_ps(gb, dpre);
    }
    _mm512_mask_storeu_ps(g0 + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g0 + j), ga));
    _mm512_mask_storeu_ps(g1 + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g1 + j), gs));
    _mm512_mask_storeu_ps(g2 + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g2 + j), gb));
  }
}

// row_dots (below): 16 columns at a time, then one horizontal sum per row.
IK_AVX512 void row_dots_avx512(const float* h, const float* w, float bias, int64_t rows,
                               int64_t cols, float* s, const bool* valid) {
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) {
      s[i] = 0.0f;
      continue;
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = first_lanes(cols - j);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, h + i * cols + j), _mm512_maskz_loadu_ps(m, w + j), acc);
    }
    s[i] = bias + _mm512_reduce_add_ps(acc);
  }
}

// out (D) = sum of a[t] k[t] over the rows t < n (only where valid[t] when given): 64
// columns at a time in registers, even and odd rows in separate sums.
IK_AVX512 void pool_rows_avx512(const float* a, const float* k, int64_t n, int64_t D,
                                const bool* valid, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __mmask16 m[4];
    for (int v = 0; v < 4; ++v) m[v] = d0 + 16 * v < D ? first_lanes(D - d0 - 16 * v) : __mmask16(0);
    __m512 even[4], odd[4];
    for (int v = 0; v < 4; ++v) even[v] = odd[v] = _mm512_setzero_ps();
    auto add_row = [&](__m512* acc, int64_t t) {
      if (valid && !valid[t]) return;  // padding (NaN included) is not read
      const __m512 at = _mm512_set1_ps(a[t]);
      for (int v = 0; v < 4; ++v)
        if (m[v]) acc[v] = _mm512_fmadd_ps(at, _mm512_maskz_loadu_ps(m[v], k + t * D + d0 + 16 * v), acc[v]);
    };
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      add_row(even, t);
      add_row(odd, t + 1);
    }
    if (t < n) add_row(even, t);
    for (int v = 0; v < 4; ++v)
      if (m[v]) _mm512_mask_storeu_ps(out + d0 + 16 * v, m[v], _mm512_add_ps(even[v], odd[v]));
  }
}

// The first layer's terms (see first_layer_terms_impl), qt kept in registers 64 columns at
// a time.
IK_AVX512 void first_layer_terms_avx512(const float* q, const float* wqd, const float* wkd,
                                        const float* wp, const float* c1, int64_t D, int64_t H1,
                                        float* qt, float* m) {
  for (int64_t j0 = 0; j0 < H1; j0 += 64) {
    __mmask16 mk[4];
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) {
      mk[v] = j0 + 16 * v < H1 ? first_lanes(H1 - j0 - 16 * v) : __mmask16(0);
      acc[v] = _mm512_maskz_loadu_ps(mk[v], c1 + j0 + 16 * v);
    }
    for (int64_t d = 0; d < D; ++d) {
      const __m512 qd = _mm512_set1_ps(q[d]);
      const int64_t at = d * H1 + j0;
      for (int v = 0; v < 4; ++v) {
        if (!mk[v]) continue;
        acc[v] = _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(mk[v], wqd + at + 16 * v), acc[v]);
        _mm512_mask_storeu_ps(m + at + 16 * v, mk[v],
                              _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(mk[v], wp + at + 16 * v),
                                              _mm512_maskz_loadu_ps(mk[v], wkd + at + 16 * v)));
      }
    }
    for (int v = 0; v < 4; ++v)
      if (mk[v]) _mm512_mask_storeu_ps(qt + j0 + 16 * v, mk[v], acc[v]);
  }
}

// first_layer_grads (below) on 16 columns at a time, one horizontal sum per row of dm.
IK_AVX512 void first_layer_grads_avx512(const float* q, const float* dm, const float* dqt,
                                        const float* wqd, const float* wp, int64_t D, int64_t H1,
                                        float* gwqd, float* gwkd, float* gwp, float* gq) {
  for (int64_t d = 0; d < D; ++d) {
    const __m512 qd = _mm512_set1_ps(q[d]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < H1; j += 16) {
      const __mmask16 m = first_lanes(H1 - j);
      const int64_t i = d * H1 + j;
      const __m512 dq = _mm512_maskz_loadu_ps(m, dqt + j), dmi = _mm512_maskz_loadu_ps(m, dm + i);
      _mm512_mask_storeu_ps(gwqd + i, m, _mm512_fmadd_ps(qd, dq, _mm512_maskz_loadu_ps(m, gwqd + i)));
      _mm512_mask_storeu_ps(gwkd + i, m, _mm512_add_ps(dmi, _mm512_maskz_loadu_ps(m, gwkd + i)));
      _mm512_mask_storeu_ps(gwp + i, m, _mm512_fmadd_ps(qd, dmi, _mm512_maskz_loadu_ps(m, gwp + i)));
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wqd + i), dq, acc);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, wp + i), dmi, acc);
    }
    gq[d] += _mm512_reduce_add_ps(acc);
  }
}

// a[t] = e^(s[t] - shift) for t < n.
IK_AVX512 void exp_shifted_avx512(const float* s, float shift, int64_t n, float* a) {
  const __m512 sh = _mm512_set1_ps(shift);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = first_lanes(n - t);
    _mm512_mask_storeu_ps(a + t, m, exp_neg16(_mm512_sub_ps(sh, _mm512_maskz_loadu_ps(m, s + t))));
  }
}
#endif

IK_CLONES void act_forward(Act act, const float* z, float* h, int64_t rows, int64_t cols,
                           const float* p0, const float* p1, const float* p2) {
#if defined(__x86_64__)
  if ((act == Act::kSigmoid || act == Act::kDice) && simd_isa() == Isa::kAvx512)
    return act_forward_avx512(act, z, h, rows, cols, p0, p1, p2);
#endif
  act_forward_impl<float>(act, z, h, rows, cols, p0, p1, p2);
}
void act_forward(Act act, const double* z, double* h, int64_t rows, int64_t cols,
                 const double* p0, const double* p1, const double* p2) {
  act_forward_impl<double>(act, z, h, rows, cols, p0, p1, p2);
}
IK_CLONES void act_backward(Act act, const float* z, const float* h, const float* dh, float* dz,
                            int64_t rows, int64_t cols, const float* p0, const float* p1,
                            const float* p2, float* g0, float* g1, float* g2) {
#if defined(__x86_64__)
  if (act == Act::kDice && simd_isa() == Isa::kAvx512)
    return dice_backward_avx512(z, dh, dz, rows, cols, p0, p1, p2, g0, g1, g2);
#endif
  act_backward_impl<float>(act, z, h, dh, dz, rows, cols, p0, p1, p2, g0, g1, g2);
}
void act_backward(Act act, const double* z, const double* h, const double* dh, double* dz,
                  int64_t rows, int64_t cols, const double* p0, const double* p1,
                  const double* p2, double* g0, double* g1, double* g2) {
  act_backward_impl<double>(act, z, h, dh, dz, rows, cols, p0, p1, p2, g0, g1, g2);
}

// Fortran BLAS, which libtorch_cpu exports when torch is built with MKL or OpenBLAS
// (weak: a torch without them falls back to at::mm on wrapped buffers).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

template <typename T>
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
               const T* beta, T* c, const int* ldc);
template <>
void blas_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b,
                       const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Row-major C (m x n) = op(A) op(B) + beta C; A is m x k after op, B k x n after op,
// lda/ldb/ldc the row strides of the stored matrices.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a,
             int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0 || !have_blas()) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor cm = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    if (beta == T(0)) cm.zero_();
    if (k == 0) return;
    at::Tensor am = at::from_blob(const_cast<T*>(a), trans_a ? at::IntArrayRef{k, m} : at::IntArrayRef{m, k},
                                  {lda, 1}, opts);
    at::Tensor bm = at::from_blob(const_cast<T*>(b), trans_b ? at::IntArrayRef{n, k} : at::IntArrayRef{k, n},
                                  {ldb, 1}, opts);
    cm.add_(at::mm(trans_a ? am.t() : am, trans_b ? bm.t() : bm));
    return;
  }
  // Column-major view: C^T = op(B)^T op(A)^T.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one(1);
  blas_gemm<T>(&ta, &tb, &mi, &ni, &ki, &one, b, &la, a, &lb, &beta, c, &lc);
}

#if defined(__x86_64__)
// Row-major C (M x N) (+)= A (M x K) B (K x N) for the small, many GEMMs of a tile
// (K and N are layer widths). BLAS pays packing and dispatch on every such call; this
// AVX2/FMA kernel keeps a 4 x 24 block of C in registers and streams A and B once.
// With kTransA, A is stored transposed (K x M, row stride lda).
template <bool kTransA>
__attribute__((target("avx2,fma"))) void sgemm_tile_avx2(int64_t M, int64_t N, int64_t K,
                                                         const float* A, int64_t lda,
                                                         const float* B, int64_t ldb, float* C,
                                                         int64_t ldc, bool accumulate) {
  const int64_t a_row = kTransA ? 1 : lda, a_col = kTransA ? lda : 1;
  int64_t j0 = 0;
  for (; j0 + 24 <= N; j0 += 24) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      __m256 c[4][3];
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < 3; ++v)
          c[r][v] = accumulate ? _mm256_loadu_ps(C + (i + r) * ldc + j0 + 8 * v) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const float* bk = B + k * ldb + j0;
        const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8), b2 = _mm256_loadu_ps(bk + 16);
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(A + (i + r) * a_row + k * a_col);
          c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
          c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
          c[r][2] = _mm256_fmadd_ps(a, b2, c[r][2]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < 3; ++v) _mm256_storeu_ps(C + (i + r) * ldc + j0 + 8 * v, c[r][v]);
    }
    for (; i < M; ++i) {
      __m256 c0 = accumulate ? _mm256_loadu_ps(C + i * ldc + j0) : _mm256_setzero_ps();
      __m256 c1 = accumulate ? _mm256_loadu_ps(C + i * ldc + j0 + 8) : _mm256_setzero_ps();
      __m256 c2 = accumulate ? _mm256_loadu_ps(C + i * ldc + j0 + 16) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const float* bk = B + k * ldb + j0;
        const __m256 a = _mm256_broadcast_ss(A + i * a_row + k * a_col);
        c0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(bk), c0);
        c1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(bk + 8), c1);
        c2 = _mm256_fmadd_ps(a, _mm256_loadu_ps(bk + 16), c2);
      }
      _mm256_storeu_ps(C + i * ldc + j0, c0);
      _mm256_storeu_ps(C + i * ldc + j0 + 8, c1);
      _mm256_storeu_ps(C + i * ldc + j0 + 16, c2);
    }
  }
  for (; j0 + 8 <= N; j0 += 8) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      __m256 c[4];
      for (int r = 0; r < 4; ++r)
        c[r] = accumulate ? _mm256_loadu_ps(C + (i + r) * ldc + j0) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + j0);
        for (int r = 0; r < 4; ++r)
          c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + (i + r) * a_row + k * a_col), b0, c[r]);
      }
      for (int r = 0; r < 4; ++r) _mm256_storeu_ps(C + (i + r) * ldc + j0, c[r]);
    }
    for (; i < M; ++i) {
      __m256 c0 = accumulate ? _mm256_loadu_ps(C + i * ldc + j0) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k)
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + i * a_row + k * a_col), _mm256_loadu_ps(B + k * ldb + j0), c0);
      _mm256_storeu_ps(C + i * ldc + j0, c0);
    }
  }
  if (j0 < N) {  // the last 1..7 columns through masked loads and stores
    alignas(32) int32_t bits[8];
    for (int v = 0; v < 8; ++v) bits[v] = j0 + v < N ? -1 : 0;
    const __m256i msk = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits));
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      __m256 c[4];
      for (int r = 0; r < 4; ++r)
        c[r] = accumulate ? _mm256_maskload_ps(C + (i + r) * ldc + j0, msk) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_maskload_ps(B + k * ldb + j0, msk);
        for (int r = 0; r < 4; ++r)
          c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + (i + r) * a_row + k * a_col), b0, c[r]);
      }
      for (int r = 0; r < 4; ++r) _mm256_maskstore_ps(C + (i + r) * ldc + j0, msk, c[r]);
    }
    for (; i < M; ++i) {
      __m256 c0 = accumulate ? _mm256_maskload_ps(C + i * ldc + j0, msk) : _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k)
        c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(A + i * a_row + k * a_col),
                             _mm256_maskload_ps(B + k * ldb + j0, msk), c0);
      _mm256_maskstore_ps(C + i * ldc + j0, msk, c0);
    }
  }
}

// Row-major C (M x N) (+)= op(A) (M x K) B (K x N) with AVX-512: a block of MR rows x NV
// vectors of 16 columns of C stays in registers (the last vector masked to N), started
// from C (accumulate), from the row vector init (N,), or from zero. The loops over r and
// v are unrolled so that c and b live in registers.
template <int NV, int MR, bool kTransA>
__attribute__((target("avx512f"), noinline)) void sgemm_block_avx512(
    int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
    __mmask16 last, const float* init, bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
    const __m512 start = init ? _mm512_maskz_loadu_ps(m, init + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      c[r][v] = accumulate ? _mm512_maskz_loadu_ps(m, C + r * ldc + 16 * v) : start;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) b[v] = _mm512_loadu_ps(bk + 16 * v);
    b[NV - 1] = _mm512_maskz_loadu_ps(last, bk + 16 * (NV - 1));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(kTransA ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
    _mm512_mask_storeu_ps(C + r * ldc + 16 * (NV - 1), last, c[r][NV - 1]);
  }
}

// Rows per register block for NV vectors: about 24 accumulators, enough independent
// FMAs in flight to hide their latency.
constexpr int avx512_rows(int nv) { return nv <= 2 ? 12 : nv == 3 ? 8 : nv == 4 ? 6 : 4; }

// One block of exactly rows (1..R) rows.
template <int NV, int R, bool kTransA>
__attribute__((target("avx512f"))) void sgemm_rows_avx512(
    int64_t rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
    int64_t ldc, __mmask16 last, const float* init, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      sgemm_block_avx512<NV, R, kTransA>(K, A, lda, B, ldb, C, ldc, last, init, accumulate);
    } else {
      sgemm_rows_avx512<NV, R - 1, kTransA>(rows, K, A, lda, B, ldb, C, ldc, last, init,
                                            accumulate);
    }
  }
}

// One panel of at most 16 NV columns over all M rows, in ceil(M / MR) blocks of nearly
// equal height (a short last block would wait on the latency of its few accumulators).
template <int NV, bool kTransA>
__attribute__((target("avx512f"))) void sgemm_panel_avx512(
    int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
    int64_t ldc, __mmask16 last, const float* init, bool accumulate) {
  constexpr int MR = avx512_rows(NV);
  const int64_t a_step = kTransA ? 1 : lda;
  const int64_t blocks = (M + MR - 1) / MR;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = M * blk / blocks, i1 = M * (blk + 1) / blocks;
    sgemm_rows_avx512<NV, MR, kTransA>(i1 - i0, K, A + i0 * a_step, lda, B, ldb, C + i0 * ldc, ldc,
                                       last, init, accumulate);
  }
}

// Row-major C (M x N) (+)= op(A) (M x K) B (K x N): panels of 64 columns, the last one (up
// to 80) in a single pass.
template <bool kTransA>
__attribute__((target("avx512f"))) void sgemm_tile_avx512(int64_t M, int64_t N, int64_t K,
                                                          const float* A, int64_t lda,
                                                          const float* B, int64_t ldb, float* C,
                                                          int64_t ldc, const float* init,
                                                          bool accumulate) {
  int64_t j0 = 0;
  for (; N - j0 > 80; j0 += 64)
    sgemm_panel_avx512<4, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, 0xFFFF,
                                   init ? init + j0 : nullptr, accumulate);
  const int64_t rest = N - j0;
  if (M == 0 || rest <= 0) return;
  const int nv = static_cast<int>((rest + 15) / 16);
  const int tail = static_cast<int>(rest - 16 * (nv - 1));
  const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
  const float* in = init ? init + j0 : nullptr;
  switch (nv) {
    case 1: sgemm_panel_avx512<1, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, in, accumulate); break;
    case 2: sgemm_panel_avx512<2, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, in, accumulate); break;
    case 3: sgemm_panel_avx512<3, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, in, accumulate); break;
    case 4: sgemm_panel_avx512<4, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, in, accumulate); break;
    default: sgemm_panel_avx512<5, kTransA>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, in, accumulate); break;
  }
}

#endif  // __x86_64__

// Row-major C (M x N) = op(A) (M x K) B (K x N) + (C with accumulate, else the row vector
// init (N,) when given, else 0); op(A) = A^T with trans_a.
template <typename T>
void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate, bool trans_a = false, const T* init = nullptr) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_isa() == Isa::kAvx512) {
      if (trans_a) {
        sgemm_tile_avx512<true>(M, N, K, A, lda, B, ldb, C, ldc, init, accumulate);
      } else {
        sgemm_tile_avx512<false>(M, N, K, A, lda, B, ldb, C, ldc, init, accumulate);
      }
      return;
    }
  }
#endif
  if (init && !accumulate) {
    for (int64_t i = 0; i < M; ++i) std::copy(init, init + N, C + i * ldc);
    accumulate = true;
  }
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_isa() == Isa::kAvx2) {
      if (trans_a) {
        sgemm_tile_avx2<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
      } else {
        sgemm_tile_avx2<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
      }
      return;
    }
  }
#endif
  gemm_rm<T>(trans_a, false, M, N, K, A, lda, B, ldb, accumulate ? T(1) : T(0), C, ldc);
}

// ---- the problem --------------------------------------------------------------------

template <typename T>
struct Problem {
  int64_t B = 0, R = 0, E = 1, Eq = 1, T_ = 0, D = 0, G = 1, L = 1;
  int64_t H[kMaxLayers] = {0, 0, 0};
  Act act = Act::kSigmoid;
  bool softmax = true;
  // Dice with batch statistics: every position of every history enters the MLP with its
  // stored key (SPEC section 1: the statistics cover padded positions too).
  bool all_positions = false;
  const T* query = nullptr;
  const T* keys = nullptr;
  const int64_t* key_index = nullptr;
  const int64_t* lengths = nullptr;
  const bool* mask = nullptr;
  // First layer split by SPEC's identity, (G, D, H1) each, and the bias (G, H1).
  at::Tensor wqd_t, wkd_t, wp_t;
  at::Tensor wkd_rows, wp_rows;  // (W_k - W_d) and W_p as (G, H1, D)
  const T* c[kMaxLayers] = {};
  const T* w[kMaxLayers] = {};  // layers 2.. (G, H_l, H_{l-1})
  const T* w_t[kMaxLayers] = {};  // the same transposed, (G, H_{l-1}, H_l)
  at::Tensor w_t_store[kMaxLayers];
  const T* wo = nullptr;        // (G, H_L)
  const T* co = nullptr;        // (G,)
  const T* ap[kMaxLayers][3] = {};  // activation parameters (G, H_l)

  int64_t row_of(int64_t b) const { return key_index ? key_index[b] : b; }
  bool valid(int64_t row, int64_t t) const {
    if (mask) return mask[row * T_ + t];
    if (lengths) return t < lengths[row];
    return true;
  }
  // Rows of a history that need computing: positions from the length on are padding.
  int64_t rows_needed(int64_t row) const {
    if (all_positions || !lengths) return T_;
    return length_of(row);
  }
  // The history's length clamped to [0, T] (lengths given).
  int64_t length_of(int64_t row) const {
    return std::min<int64_t>(std::max<int64_t>(lengths[row], 0), T_);
  }
  const T* ap_of(int l, int i, int64_t g) const {
    return ap[l][i] ? ap[l][i] + g * H[l] : nullptr;
  }
  int64_t max_h() const { return *std::max_element(H, H + L); }
  const T* query_of(int64_t b, int64_t e) const { return query + (b * Eq + (Eq > 1 ? e : 0)) * D; }
  const T* keys_of(int64_t row, int64_t e) const { return keys + (row * E + e) * T_ * D; }
};

std::vector<at::Tensor> first_layer_parts(const at::Tensor& w1, int64_t D) {
  // w1 (G, H1, 4D) = [W_q | W_k | W_d | W_p] -> (W_q + W_d)^T, (W_k - W_d)^T, W_p^T as
  // (G, D, H1), and W_k - W_d, W_p as (G, H1, D).
  auto parts = w1.split(D, -1);
  at::Tensor wkd = (parts[1] - parts[2]).contiguous(), wp = parts[3].contiguous();
  return {(parts[0] + parts[2]).transpose(-1, -2).contiguous(), wkd.transpose(-1, -2).contiguous(),
          wp.transpose(-1, -2).contiguous(), wkd, wp};
}

template <typename T>
Problem<T> make_problem(const at::Tensor& query, const at::Tensor& keys,
                        const std::optional<at::Tensor>& key_index,
                        const std::optional<at::Tensor>& lengths,
                        const std::optional<at::Tensor>& mask, at::TensorList weights,
                        at::TensorList biases, const at::Tensor& out_weight,
                        const at::Tensor& out_bias, at::TensorList act_params, Act act,
                        c10::string_view normalization) {
  Problem<T> p;
  p.act = act;
  p.softmax = normalization == "softmax";
  p.B = query.size(0);
  p.Eq = query.size(1);
  p.D = query.size(2);
  p.R = keys.size(0);
  p.E = keys.size(1);
  p.T_ = keys.size(2);
  p.L = static_cast<int64_t>(weights.size());
  p.G = weights[0].size(0);
  for (int l = 0; l < p.L; ++l) p.H[l] = weights[l].size(1);
  p.query = query.data_ptr<T>();
  p.keys = keys.data_ptr<T>();
  if (key_index) p.key_index = key_index->data_ptr<int64_t>();
  if (lengths) p.lengths = lengths->data_ptr<int64_t>();
  if (mask) p.mask = mask->data_ptr<bool>();
  auto parts = first_layer_parts(weights[0], p.D);
  p.wqd_t = parts[0];
  p.wkd_t = parts[1];
  p.wp_t = parts[2];
  p.wkd_rows = parts[3];
  p.wp_rows = parts[4];
  for (int l = 0; l < p.L; ++l) {
    p.c[l] = biases[l].data_ptr<T>();
    if (l > 0) {
      p.w[l] = weights[l].data_ptr<T>();
      p.w_t_store[l] = weights[l].transpose(-1, -2).contiguous();
      p.w_t[l] = p.w_t_store[l].template data_ptr<T>();
    }
  }
  p.wo = out_weight.data_ptr<T>();
  p.co = out_bias.data_ptr<T>();
  const int k = act_param_count(act);
  for (int l = 0; l < p.L; ++l)
    for (int i = 0; i < k; ++i) p.ap[l][i] = act_params[l * k + i].data_ptr<T>();
  return p;
}

// Per-thread scratch for one (query, head) item.
template <typename T>
struct Workspace {
  std::vector<T> kbuf, m, mt, qterm, s, ds, dm, dqterm, dk;
  const T* keys_tile = nullptr;  // the rows of the current tile (load_keys)
  std::vector<T> z[kMaxLayers], h[kMaxLayers];
  std::vector<T> gz, gh, ones;
  std::vector<T> moment_sums;
  Workspace(const Problem<T>& p, bool backward) {
    const int64_t tile = std::min(kTileRows, std::max<int64_t>(p.T_, 1));
    kbuf.resize(tile * p.D);
    m.resize(p.D * p.H[0]);
    qterm.resize(p.H[0]);
    s.resize(std::max<int64_t>(p.T_, 1));
    ds.resize(std::max<int64_t>(p.T_, 1));
    moment_sums.resize(2 * p.max_h());
    for (int l = 0; l < p.L; ++l) {
      z[l].resize(tile * p.H[l]);
      h[l].resize(tile * p.H[l]);
    }
    if (backward) {
      dm.resize(p.D * p.H[0]);
      mt.resize(p.D * p.H[0]);
      dqterm.resize(p.H[0]);
      dk.resize(tile * p.D);
      gz.resize(tile * p.max_h());
      gh.resize(tile * p.max_h());
      ones.assign(tile, T(1));
    }
  }
};

// The first layer's terms of one query q (D): qt (H1) = c1 + sum_d q_d wqd[d] and
// m (D x H1) = wkd + diag(q) wp, from the (D, H1) parts.
template <typename T>
__attribute__((always_inline)) inline void first_layer_terms_impl(
    const T* __restrict__ q, const T* __restrict__ wqd, const T* __restrict__ wkd,
    const T* __restrict__ wp, const T* __restrict__ c1, int64_t D, int64_t H1, T* __restrict__ qt,
    T* __restrict__ m) {
  std::copy(c1, c1 + H1, qt);
  for (int64_t d = 0; d < D; ++d) {
    const T qd = q[d];
    for (int64_t j = 0; j < H1; ++j) {
      qt[j] += qd * wqd[d * H1 + j];
      m[d * H1 + j] = wkd[d * H1 + j] + qd * wp[d * H1 + j];
    }
  }
}
IK_CLONES void first_layer_terms(const float* q, const float* wqd, const float* wkd,
                                 const float* wp, const float* c1, int64_t D, int64_t H1,
                                 float* qt, float* m) {
#if defined(__x86_64__)
  if (simd_isa() == Isa::kAvx512) return first_layer_terms_avx512(q, wqd, wkd, wp, c1, D, H1, qt, m);
#endif
  first_layer_terms_impl<float>(q, wqd, wkd, wp, c1, D, H1, qt, m);
}
void first_layer_terms(const double* q, const double* wqd, const double* wkd, const double* wp,
                       const double* c1, int64_t D, int64_t H1, double* qt, double* m) {
  first_layer_terms_impl<double>(q, wqd, wkd, wp, c1, D, H1, qt, m);
}

// M^T (H1 x D) = wkd^T + wp^T diag(q), from the (H1, D) parts.
template <typename T>
__attribute__((always_inline)) inline void first_layer_transposed_impl(
    const T* __restrict__ q, const T* __restrict__ wkd_rows, const T* __restrict__ wp_rows,
    int64_t D, int64_t H1, T* __restrict__ mt) {
  for (int64_t j = 0; j < H1; ++j)
    for (int64_t d = 0; d < D; ++d) mt[j * D + d] = wkd_rows[j * D + d] + wp_rows[j * D + d] * q[d];
}
IK_CLONES void first_layer_transposed(const float* q, const float* wkd_rows, const float* wp_rows,
                                      int64_t D, int64_t H1, float* mt) {
  first_layer_transposed_impl<float>(q, wkd_rows, wp_rows, D, H1, mt);
}
void first_layer_transposed(const double* q, const double* wkd_rows, const double* wp_rows,
                            int64_t D, int64_t H1, double* mt) {
  first_layer_transposed_impl<double>(q, wkd_rows, wp_rows, D, H1, mt);
}

// qterm and M of item (b, e), into the workspace (and M^T for the backward).
template <typename T>
void first_layer_setup(const Problem<T>& p, Workspace<T>& ws, const T* q, int64_t g,
                       bool transposed = false) {
  const int64_t D = p.D, H1 = p.H[0], off = g * D * H1;
  first_layer_terms(q, p.wqd_t.template data_ptr<T>() + off, p.wkd_t.template data_ptr<T>() + off,
                    p.wp_t.template data_ptr<T>() + off, p.c[0] + g * H1, D, H1, ws.qterm.data(),
                    ws.m.data());
  if (transposed)
    first_layer_transposed(q, p.wkd_rows.template data_ptr<T>() + off,
                           p.wp_rows.template data_ptr<T>() + off, D, H1, ws.mt.data());
}

// Points ws.keys_tile at keys t0..t0+nt of the item. Only a mask can leave padding among
// the rows computed (lengths stop them at the length): then the keys are copied into
// kbuf with padded positions as zero rows (their contents, NaN included, never reach an
// output), except with all_positions.
template <typename T>
void load_keys(const Problem<T>& p, Workspace<T>& ws, const T* k, int64_t row, int64_t t0,
               int64_t nt) {
  const int64_t D = p.D;
  if (!p.mask || p.all_positions) {
    ws.keys_tile = k + t0 * D;
    return;
  }
  for (int64_t i = 0; i < nt; ++i) {
    T* dst = ws.kbuf.data() + i * D;
    if (!p.valid(row, t0 + i)) {
      std::fill(dst, dst + D, T(0));
    } else {
      std::copy(k + (t0 + i) * D, k + (t0 + i + 1) * D, dst);
    }
  }
  ws.keys_tile = ws.kbuf.data();
}

// Pre-activation of layer l on nt rows: z = input W_l^T + bias, the input being the keys
// of the tile (load_keys) through the identity (layer 0) or h_prev (nt x H_{l-1}).
template <typename T>
void layer_forward(const Problem<T>& p, const Workspace<T>& ws, int l, int64_t g, int64_t nt,
                   const T* h_prev, T* z) {
  const int64_t Hl = p.H[l];
  const T* bias = l == 0 ? ws.qterm.data() : p.c[l] + g * Hl;
  if (l == 0) {
    tile_gemm<T>(nt, Hl, p.D, ws.keys_tile, p.D, ws.m.data(), Hl, z, Hl, false, false, bias);
  } else {
    const int64_t Hp = p.H[l - 1];
    tile_gemm<T>(nt, Hl, Hp, h_prev, Hp, p.w_t[l] + g * Hp * Hl, Hl, z, Hl, false, false, bias);
  }
}

template <typename T>
void layer_activation(const Problem<T>& p, int l, int64_t g, int64_t nt, const T* z, T* h) {
  act_forward(p.act, z, h, nt, p.H[l], p.ap_of(l, 0, g), p.ap_of(l, 1, g), p.ap_of(l, 2, g));
}

// Layers 1..L on the nt keys of the tile: z[l] pre-activations (into zs[l] when given, else
// the workspace), h[l] activations.
template <typename T>
void mlp_forward_tile(const Problem<T>& p, Workspace<T>& ws, int64_t g, int64_t nt,
                      T* const* zs = nullptr) {
  for (int l = 0; l < p.L; ++l) {
    T* z = zs ? zs[l] : ws.z[l].data();
    layer_forward(p, ws, l, g, nt, l > 0 ? ws.h[l - 1].data() : nullptr, z);
    layer_activation(p, l, g, nt, z, ws.h[l].data());
  }
}

// s[i] = bias + h[i] . w for the rows x cols matrix h; with valid, rows where it is false
// get 0 and are not read.
template <typename T>
void row_dots(const T* h, const T* w, T bias, int64_t rows, int64_t cols, T* s,
              const bool* valid = nullptr) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_isa() == Isa::kAvx512) return row_dots_avx512(h, w, bias, rows, cols, s, valid);
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    if (valid && !valid[i]) {
      s[i] = T(0);
      continue;
    }
    T acc = bias;
    for (int64_t j = 0; j < cols; ++j) acc += h[i * cols + j] * w[j];
    s[i] = acc;
  }
}

// out (D) = sum of a[t] k[t] over the rows t < n (only where valid[t] when given).
template <typename T>
__attribute__((always_inline)) inline void pool_rows_impl(const T* __restrict__ a,
                                                          const T* __restrict__ k, int64_t n,
                                                          int64_t D, const bool* __restrict__ valid,
                                                          T* __restrict__ out) {
  std::fill(out, out + D, T(0));
  for (int64_t t = 0; t < n; ++t) {
    if (valid && !valid[t]) continue;
    const T at = a[t];
    for (int64_t d = 0; d < D; ++d) out[d] += at * k[t * D + d];
  }
}
IK_CLONES void pool_rows(const float* a, const float* k, int64_t n, int64_t D, const bool* valid,
                         float* out) {
#if defined(__x86_64__)
  if (simd_isa() == Isa::kAvx512) return pool_rows_avx512(a, k, n, D, valid, out);
#endif
  pool_rows_impl<float>(a, k, n, D, valid, out);
}
void pool_rows(const double* a, const double* k, int64_t n, int64_t D, const bool* valid,
               double* out) {
  pool_rows_impl<double>(a, k, n, D, valid, out);
}

// Scores of nt rows from the top layer's activations.
template <typename T>
void score_tile(const Problem<T>& p, const Workspace<T>& ws, int64_t g, int64_t nt, T* s) {
  const int64_t HL = p.H[p.L - 1];
  const T* hL = ws.h[p.L - 1].data();
  const T* wo = p.wo + g * HL;
  row_dots(hL, wo, p.co[g], nt, HL, s);
}

// a[t] = e^(s[t] - shift) for t < n.
template <typename T>
void exp_shifted(const T* s, T shift, int64_t n, T* a) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_isa() == Isa::kAvx512) return exp_shifted_avx512(s, shift, n, a);
  }
#endif
  for (int64_t t = 0; t < n; ++t) a[t] = std::exp(s[t] - shift);
}

// Attention weights a (T,) from the scores s of the first n positions, normalised over
// the valid ones (padding gets weight 0), and the pooled output (D,).
template <typename T>
void normalize_and_pool(const Problem<T>& p, int64_t row, const T* k, int64_t n, const T* s,
                        T* a, T* out) {
  const int64_t D = p.D, T_ = p.T_;
  if (p.softmax) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t t = 0; t < n; ++t)
      if (p.valid(row, t) && s[t] > mx) mx = s[t];
    exp_shifted(s, mx, n, a);
    T sum = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (!p.valid(row, t)) a[t] = T(0);
      sum += a[t];
    }
    std::fill(a + n, a + T_, T(0));
    const T inv = sum > T(0) ? T(1) / sum : T(0);
    for (int64_t t = 0; t < T_; ++t) a[t] *= inv;
  } else {
    for (int64_t t = 0; t < T_; ++t) a[t] = (t < n && p.valid(row, t)) ? s[t] : T(0);
  }
  pool_rows(a, k, n, D, p.mask ? p.mask + row * T_ : nullptr, out);
}

// Contiguous blocks of queries, one per thread; fn(block, b_begin, b_end).
template <typename F>
void for_each_block(int64_t B, int64_t blocks, const F& fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) fn(c, B * c / blocks, B * (c + 1) / blocks);
  });
}

int64_t num_blocks(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
}

// Blocks for work that sums per-block accumulators (weight gradients, Dice statistics):
// a fixed count, not the thread count, so results do not depend on the number of threads.
constexpr int64_t kAccumulatorBlocks = 32;
int64_t accumulator_blocks(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(kAccumulatorBlocks, B));
}

// ---- forward (recomputing: nothing of size (B, T, H) is written) ------------------------

template <typename T>
void forward_item(const Problem<T>& p, Workspace<T>& ws, int64_t b, int64_t e, T* out,
                  T* scores) {
  const int64_t row = p.row_of(b);
  const int64_t g = p.G > 1 ? e : 0;
  const T* k = p.keys_of(row, e);
  const int64_t n = p.rows_needed(row);
  first_layer_setup(p, ws, p.query_of(b, e), g);
  T* s = ws.s.data();
  for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
    const int64_t nt = std::min(kTileRows, n - t0);
    load_keys(p, ws, k, row, t0, nt);
    mlp_forward_tile(p, ws, g, nt);
    score_tile(p, ws, g, nt, s + t0);
  }
  normalize_and_pool(p, row, k, n, s, scores, out);
}

// ---- backward -----------------------------------------------------------------------

// Gradient accumulators of one block of queries: slices of one zeroed buffer, the same
// layout in every block (blocks are summed element by element, in block order).
template <typename T>
struct Grads {
  T* wqd_t = nullptr;             // (G, D, H1), and wkd_t, wp_t
  T* wkd_t = nullptr;
  T* wp_t = nullptr;
  T* w[kMaxLayers] = {};          // (G, H_l, H_{l-1}), layers 1..
  T* c[kMaxLayers] = {};          // (G, H_l)
  T* wo = nullptr;                // (G, H_L)
  T* co = nullptr;                // (G,)
  T* ap[kMaxLayers][3] = {};      // like the activation parameters, (G, H_l)
  // Points the accumulators into base (null: only counts); returns the elements used.
  int64_t place(const Problem<T>& p, T* base) {
    int64_t used = 0;
    auto take = [&](int64_t n) {
      T* at = base ? base + used : nullptr;
      used += n;
      return at;
    };
    const int64_t G = p.G, H1 = p.H[0];
    wqd_t = take(G * p.D * H1);
    wkd_t = take(G * p.D * H1);
    wp_t = take(G * p.D * H1);
    for (int l = 0; l < p.L; ++l) {
      if (l > 0) w[l] = take(G * p.H[l] * p.H[l - 1]);
      c[l] = take(G * p.H[l]);
    }
    wo = take(G * p.H[p.L - 1]);
    co = take(G);
    for (int l = 0; l < p.L; ++l)
      for (int i = 0; i < act_param_count(p.act); ++i) ap[l][i] = take(G * p.H[l]);
    return used;
  }
  T* apg(const Problem<T>& p, int l, int i, int64_t g) const {
    return ap[l][i] ? ap[l][i] + g * p.H[l] : nullptr;
  }
};

// Score gradients ds (T,) of one item: pooling, then the normalisation (padding
// contributes nothing and gets 0).
template <typename T>
void score_gradients(const Problem<T>& p, int64_t row, const T* k, int64_t n, const T* gout,
                     const T* gscores, const T* scores, T* ds) {
  // Valid positions: t < nv (lengths; n itself covers padding with all_positions) and,
  // with a mask, where it is set.
  const int64_t nv = p.lengths ? std::min(n, p.length_of(row)) : n;
  const bool* valid = p.mask ? p.mask + row * p.T_ : nullptr;
  row_dots(k, gout, T(0), nv, p.D, ds, valid);
  T dot = 0;
  for (int64_t t = 0; t < nv; ++t) {
    if (valid && !valid[t]) continue;
    if (gscores) ds[t] += gscores[t];
    dot += ds[t] * scores[t];
  }
  if (p.softmax)
    for (int64_t t = 0; t < nv; ++t) ds[t] = scores[t] * (ds[t] - dot);
  std::fill(ds + nv, ds + p.T_, T(0));
}

// From the score gradients ds (nt,) to dz of the top layer (into dz); h the top layer's
// activations, z its pre-activations.
template <typename T>
void top_backward_tile(const Problem<T>& p, Workspace<T>& ws, Grads<T>& gr, int64_t g, int64_t nt,
                       const T* ds, const T* z, const T* h, T* dz) {
  const int top_l = static_cast<int>(p.L) - 1;
  const int64_t HL = p.H[top_l];
  T* dh = ws.gh.data();
  const T* wo = p.wo + g * HL;
  T* gwo = gr.wo + g * HL;
  T* gco = gr.co + g;
  // A softmax is invariant to the score bias: its gradient is exactly zero there (the sum
  // of the ds would be rounding noise, which Adam would turn into full-size steps).
  if (!p.softmax)
    for (int64_t i = 0; i < nt; ++i) *gco += ds[i];
  // dh = ds wo^T and gwo += ds^T h as GEMMs (rank one, and one row).
  tile_gemm<T>(nt, HL, 1, ds, 1, wo, HL, dh, HL, false);
  tile_gemm<T>(1, HL, nt, ds, 1, h, HL, gwo, HL, true, true);
  act_backward(p.act, z, h, dh, dz, nt, HL, p.ap_of(top_l, 0, g), p.ap_of(top_l, 1, g),
               p.ap_of(top_l, 2, g), gr.apg(p, top_l, 0, g), gr.apg(p, top_l, 1, g),
               gr.apg(p, top_l, 2, g));
}

// Layer l >= 1 backward on nt rows: from dz (nt x H_l) the bias and weight gradients, and
// the pre-activation gradient of layer l - 1 into dz_prev (nt x H_{l-1}, may alias dz).
template <typename T>
void hidden_backward_tile(const Problem<T>& p, Workspace<T>& ws, Grads<T>& gr, int l, int64_t g,
                          int64_t nt, const T* dz, const T* z_prev, const T* h_prev, T* dz_prev) {
  const int64_t Hl = p.H[l], Hp = p.H[l - 1];
  // Column sums as a one-row GEMM with a vector of ones.
  tile_gemm<T>(1, Hl, nt, ws.ones.data(), 1, dz, Hl, gr.c[l] + g * Hl, Hl, true, true);
  T* dh = ws.gh.data();
  tile_gemm<T>(Hl, Hp, nt, dz, Hl, h_prev, Hp, gr.w[l] + g * Hl * Hp, Hp, true, true);
  tile_gemm<T>(nt, Hp, Hl, dz, Hl, p.w[l] + g * Hl * Hp, Hp, dh, Hp, false);
  act_backward(p.act, z_prev, h_prev, dh, dz_prev, nt, Hp, p.ap_of(l - 1, 0, g),
               p.ap_of(l - 1, 1, g), p.ap_of(l - 1, 2, g), gr.apg(p, l - 1, 0, g),
               gr.apg(p, l - 1, 1, g), gr.apg(p, l - 1, 2, g));
}

// First layer backward on the nt keys of the tile: dM and dqterm into the workspace, the keys'
// MLP gradient into ws.dk.
template <typename T>
void first_backward_tile(const Problem<T>& p, Workspace<T>& ws, int64_t nt, const T* dz) {
  const int64_t H1 = p.H[0];
  tile_gemm<T>(1, H1, nt, ws.ones.data(), 1, dz, H1, ws.dqterm.data(), H1, true, true);
  tile_gemm<T>(p.D, H1, nt, ws.keys_tile, p.D, dz, H1, ws.dm.data(), H1, true, true);
  tile_gemm<T>(nt, p.D, H1, dz, H1, ws.mt.data(), p.D, ws.dk.data(), p.D, false);
}

// Key gradient rows t0..t0+nt of an item (each row written once): the MLP's (ws.dk) plus
// the pooling's a_t gout at valid positions; padding gets only the MLP's with
// all_positions, else zero.
template <typename T>
void write_key_gradients(const Problem<T>& p, const Workspace<T>& ws, int64_t row, int64_t t0,
                         int64_t nt, const T* scores, const T* gout, T* gk) {
  const int64_t D = p.D;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i;
    T* dst = gk + t * D;
    const T* src = ws.dk.data() + i * D;
    if (p.valid(row, t)) {
      const T a = scores[t];
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] + a * gout[d];
    } else if (p.all_positions) {
      std::copy(src, src + D, dst);
    } else {
      std::fill(dst, dst + D, T(0));
    }
  }
}

// Gradients of the first-layer pieces of one query q from dm (D x H1) and dqt (H1): the
// (D, H1) weight parts' gradients added, and gq (D) += wqd dqt + rowsums(wp * dm).
template <typename T>
void first_layer_grads(const T* q, const T* dm, const T* dqt, const T* wqd, const T* wp,
                       int64_t D, int64_t H1, T* gwqd, T* gwkd, T* gwp, T* gq) {
  for (int64_t d = 0; d < D; ++d) {
    const T qd = q[d];
    T acc = 0;
    for (int64_t j = 0; j < H1; ++j) {
      const int64_t i = d * H1 + j;
      gwqd[i] += qd * dqt[j];
      gwkd[i] += dm[i];
      gwp[i] += qd * dm[i];
      acc += wqd[i] * dqt[j] + wp[i] * dm[i];
    }
    gq[d] += acc;
  }
}

// Gradients of the first-layer pieces of item (b, e) from dM and dqterm.
template <typename T>
void first_layer_backward(const Problem<T>& p, Workspace<T>& ws, Grads<T>& gr, const T* q,
                          T* gq, int64_t g) {
  const int64_t D = p.D, H1 = p.H[0], off = g * D * H1;
  T* gc1 = gr.c[0] + g * H1;
  const T* dqt = ws.dqterm.data();
  for (int64_t j = 0; j < H1; ++j) gc1[j] += dqt[j];
  const T* wqd = p.wqd_t.template data_ptr<T>() + off;
  const T* wp = p.wp_t.template data_ptr<T>() + off;
  T* gwqd = gr.wqd_t + off;
  T* gwkd = gr.wkd_t + off;
  T* gwp = gr.wp_t + off;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (simd_isa() == Isa::kAvx512)
      return first_layer_grads_avx512(q, ws.dm.data(), dqt, wqd, wp, D, H1, gwqd, gwkd, gwp, gq);
  }
#endif
  first_layer_grads(q, ws.dm.data(), dqt, wqd, wp, D, H1, gwqd, gwkd, gwp, gq);
}

// Pre-activations saved by the training forward, (B, E, T, H_l) per layer; null when the
// backward recomputes them.
template <typename T>
struct SavedZ {
  T* z[kMaxLayers] = {};
  T* tile(int l, const Problem<T>& p, int64_t item, int64_t t0) const {
    return z[l] + (item * p.T_ + t0) * p.H[l];
  }
};

// Backward of one (query, head) item through every layer, tile by tile: the hidden
// layers recomputed (saved.z null) or read back from the training forward.
template <typename T>
void backward_item(const Problem<T>& p, Workspace<T>& ws, Grads<T>& gr, const SavedZ<T>& saved,
                   int64_t b, int64_t e, const T* gout, const T* gscores, const T* scores, T* gq,
                   T* gk) {
  const int64_t row = p.row_of(b);
  const int64_t g = p.G > 1 ? e : 0;
  const int64_t item = b * p.E + e;
  const T* k = p.keys_of(row, e);
  const int64_t n = p.rows_needed(row);
  score_gradients(p, row, k, n, gout, gscores, scores, ws.ds.data());
  first_layer_setup(p, ws, p.query_of(b, e), g, true);
  std::fill(ws.dm.begin(), ws.dm.end(), T(0));
  std::fill(ws.dqterm.begin(), ws.dqterm.end(), T(0));
  const int top = static_cast<int>(p.L) - 1;
  for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
    const int64_t nt = std::min(kTileRows, n - t0);
    load_keys(p, ws, k, row, t0, nt);
    const T* z[kMaxLayers];
    if (saved.z[0]) {
      for (int l = 0; l < p.L; ++l) {
        z[l] = saved.tile(l, p, item, t0);
        layer_activation(p, l, g, nt, z[l], ws.h[l].data());
      }
    } else {
      mlp_forward_tile(p, ws, g, nt);
      for (int l = 0; l < p.L; ++l) z[l] = ws.z[l].data();
    }
    T* dz = ws.gz.data();
    top_backward_tile(p, ws, gr, g, nt, ws.ds.data() + t0, z[top], ws.h[top].data(), dz);
    for (int l = top; l > 0; --l)
      hidden_backward_tile(p, ws, gr, l, g, nt, dz, z[l - 1], ws.h[l - 1].data(), dz);
    first_backward_tile(p, ws, nt, dz);
    write_key_gradients(p, ws, row, t0, nt, scores, gout, gk);
  }
  std::fill(gk + n * p.D, gk + p.T_ * p.D, T(0));
  first_layer_backward(p, ws, gr, p.query_of(b, e), gq, g);
}

// Every gradient: (grad_query, grad_keys, grad_weights, grad_biases, grad_out_weight,
// grad_out_bias, grad_act_params).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, at::Tensor, at::Tensor,
                                  std::vector<at::Tensor>>;

// The gradient tensors of the problem, and per-block accumulators of the weights'.
template <typename T>
struct BackwardState {
  at::Tensor gq, gk_items;
  at::Tensor accumulators;  // (blocks, per_block), zeros
  std::vector<Grads<T>> grads;
  int64_t blocks, per_block;
  BackwardState(const Problem<T>& p, const at::TensorOptions& opts) {
    gq = at::zeros({p.B, p.Eq, p.D}, opts);
    // With a shared history, several queries read one key row: each query gets its own
    // gradient rows, added into the history afterwards.
    // Every row is written by the item's backward.
    gk_items = at::empty({p.B, p.E, p.T_, p.D}, opts);
    blocks = accumulator_blocks(p.B);
    per_block = Grads<T>().place(p, nullptr);
    accumulators = at::zeros({blocks, per_block}, opts);
    grads.resize(blocks);
    for (int64_t c = 0; c < blocks; ++c) grads[c].place(p, accumulators.data_ptr<T>() + c * per_block);
  }
  T* gq_of(const Problem<T>& p, int64_t b, int64_t e) {
    return gq.data_ptr<T>() + (b * p.Eq + (p.Eq > 1 ? e : 0)) * p.D;
  }
  T* gk_of(const Problem<T>& p, int64_t item) { return gk_items.data_ptr<T>() + item * p.T_ * p.D; }
  // Adds blocks 1.. into block 0 (in block order) on the n accumulators from the one
  // block 0 has at `from`; with clear, those of blocks 1.. become zero.
  void reduce(const T* from, int64_t n, bool clear) {
    T* dst = const_cast<T*>(from);
    for (int64_t c = 1; c < blocks; ++c) {
      T* src = dst + c * per_block;
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
      if (clear) std::fill(src, src + n, T(0));
    }
  }
  // Sums the blocks' accumulators and maps the identity's pieces back to
  // W_1 = [W_q | W_k | W_d | W_p].
  BackwardResult finish(const Problem<T>& p, const at::Tensor& key_index,
                        const at::TensorOptions& opts) {
    const Grads<T>& gr = grads[0];
    reduce(gr.wqd_t, per_block, false);
    auto tensor_of = [&](const T* data, at::IntArrayRef sizes) {
      return at::from_blob(const_cast<T*>(data), sizes, opts).clone();
    };
    at::Tensor gk = gk_items;
    if (key_index.defined()) {
      gk = at::zeros({p.R, p.E, p.T_, p.D}, opts).index_add_(0, key_index, gk_items);
    }
    const int64_t G = p.G, D = p.D, H1 = p.H[0];
    at::Tensor gqd = tensor_of(gr.wqd_t, {G, D, H1}).transpose(-1, -2);
    at::Tensor gkd = tensor_of(gr.wkd_t, {G, D, H1}).transpose(-1, -2);
    at::Tensor gw1 = at::cat({gqd, gkd, gqd - gkd, tensor_of(gr.wp_t, {G, D, H1}).transpose(-1, -2)}, -1);
    std::vector<at::Tensor> gw{gw1}, gc, gap;
    for (int l = 0; l < p.L; ++l) {
      if (l > 0) gw.push_back(tensor_of(gr.w[l], {G, p.H[l], p.H[l - 1]}));
      gc.push_back(tensor_of(gr.c[l], {G, p.H[l]}));
      for (int i = 0; i < act_param_count(p.act); ++i) gap.push_back(tensor_of(gr.ap[l][i], {G, p.H[l]}));
    }
    return {gq, gk, gw, gc, tensor_of(gr.wo, {G, p.H[p.L - 1]}), tensor_of(gr.co, {G}), gap};
  }
};

template <typename T>
BackwardResult backward_impl(const Problem<T>& p, const SavedZ<T>& saved,
                             const at::Tensor& key_index, const T* gout, const T* gscores,
                             const T* scores, const at::TensorOptions& opts) {
  BackwardState<T> st(p, opts);
  for_each_block(p.B, st.blocks, [&](int64_t c, int64_t b0, int64_t b1) {
    Workspace<T> ws(p, true);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t e = 0; e < p.E; ++e) {
        const int64_t item = b * p.E + e;
        backward_item(p, ws, st.grads[c], saved, b, e, gout + item * p.D,
                      gscores ? gscores + item * p.T_ : nullptr, scores + item * p.T_,
                      st.gq_of(p, b, e), st.gk_of(p, item));
      }
  });
  return st.finish(p, key_index, opts);
}

// ---- Dice with batch statistics (training) -------------------------------------------------
//
// Layer l's statistics cover every position of the batch (padding included, SPEC
// section 1) before layer l's activation can run, so the training forward goes one layer
// at a time over the whole batch and keeps each layer's pre-activation z_l (B, E, T, H_l);
// the backward reads them instead of recomputing. With dice_params [alpha, gamma, beta]
// per layer and the batch mean mu and biased variance var of z_l per channel (channels
// per head with one MLP per head),
//   scale = gamma / sqrt(var + eps),  shift = beta - mu * scale,
//   dice(z) = z * (alpha + (1 - alpha) * sigmoid(z * scale + shift)),
// and the backward adds the statistics' part to every position's dz:
//   dz += (dL/dmu + 2 dL/dvar (z - mu)) / N.

// Running (count, mean, M2) per channel, merged with Chan's formula (stable variance).
struct Moments {
  std::vector<double> n, mean, m2;
  void init(int64_t size) {
    n.assign(size, 0.0);
    mean.assign(size, 0.0);
    m2.assign(size, 0.0);
  }
  void merge(int64_t j, double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double na = n[j], tot = na + nb, delta = mb - mean[j];
    mean[j] += delta * nb / tot;
    m2[j] += m2b + delta * delta * na * nb / tot;
    n[j] = tot;
  }
};

// Merges the moments of the nt x H rows z (nt <= kTileRows) into channels
// offset..offset+H; scratch 2H. One pass: sums of the deviations from the tile's first
// row (a sample, so no cancellation to speak of) in the input precision, merged in double.
template <typename T>
__attribute__((always_inline)) inline void accumulate_moments_impl(
    Moments& mom, int64_t offset, const T* __restrict__ z, int64_t nt, int64_t H,
    T* __restrict__ scratch) {
  T* __restrict__ s1 = scratch;
  T* __restrict__ s2 = scratch + H;
  std::fill(s1, s1 + 2 * H, T(0));
  for (int64_t i = 1; i < nt; ++i)
    for (int64_t j = 0; j < H; ++j) {
      const T d = z[i * H + j] - z[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  const double n = static_cast<double>(nt);
  for (int64_t j = 0; j < H; ++j) {
    const double a = s1[j], b = s2[j];
    mom.merge(offset + j, n, static_cast<double>(z[j]) + a / n, std::max(b - a * a / n, 0.0));
  }
}
IK_CLONES void accumulate_moments(Moments& mom, int64_t offset, const float* z, int64_t nt,
                                  int64_t H, float* scratch) {
  accumulate_moments_impl<float>(mom, offset, z, nt, H, scratch);
}
void accumulate_moments(Moments& mom, int64_t offset, const double* z, int64_t nt, int64_t H,
                        double* scratch) {
  accumulate_moments_impl<double>(mom, offset, z, nt, H, scratch);
}

// Batch statistics of every Dice layer and the scale/shift they give.
template <typename T>
struct DiceStats {
  double eps[kMaxLayers] = {};
  double count = 0;  // positions per channel
  const T* gamma[kMaxLayers] = {};
  const T* beta[kMaxLayers] = {};
  std::vector<T> mean[kMaxLayers], var[kMaxLayers], scale[kMaxLayers], shift[kMaxLayers];

  // Layer l's statistics (G x H_l each) and its scale and shift, pointed at by p.ap.
  void set(Problem<T>& p, int l, std::vector<T> mu, std::vector<T> v) {
    mean[l] = std::move(mu);
    var[l] = std::move(v);
    const int64_t n = p.G * p.H[l];
    scale[l].resize(n);
    shift[l].resize(n);
    for (int64_t i = 0; i < n; ++i) {
      scale[l][i] = gamma[l][i] / std::sqrt(var[l][i] + T(eps[l]));
      shift[l][i] = beta[l][i] - mean[l][i] * scale[l][i];
    }
    p.ap[l][1] = scale[l].data();
    p.ap[l][2] = shift[l].data();
  }

  // From dL/dscale and dL/dshift of layer l (in the slots of gamma and beta of ga, summed
  // over the batch): dL/dgamma and dL/dbeta in place, and the per-channel coefficients
  // (c0, c1) of the statistics' part dz += c0 + c1 * z.
  void backward(const Problem<T>& p, int l, T* g_scale, T* g_shift, std::vector<T>& c0,
                std::vector<T>& c1) const {
    const int64_t n = p.G * p.H[l];
    c0.resize(n);
    c1.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const T inv = T(1) / std::sqrt(var[l][i] + T(eps[l]));
      const T gs = g_scale[i], gb = g_shift[i];
      const T g_mean = -scale[l][i] * gb;
      const T g_var = (gs - mean[l][i] * gb) * gamma[l][i] * T(-0.5) * inv * inv * inv;
      g_scale[i] = (gs - mean[l][i] * gb) * inv;
      c1[i] = T(2) * g_var / T(count);
      c0[i] = g_mean / T(count) - c1[i] * mean[l][i];
    }
  }
};

// Calls fn(b, e, item, row, g, n) for every item of block [b0, b1).
template <typename T, typename F>
void for_each_item(const Problem<T>& p, int64_t b0, int64_t b1, const F& fn) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t e = 0; e < p.E; ++e) {
      const int64_t row = p.row_of(b);
      fn(b, e, b * p.E + e, row, p.G > 1 ? e : 0, p.rows_needed(row));
    }
}

// The training forward with the pre-activations kept in saved.z. With stats (Dice batch
// statistics) the layers run one at a time over the batch; without, tile by tile.
template <typename T>
void train_forward(Problem<T>& p, const SavedZ<T>& saved, DiceStats<T>* stats, T* out, T* scores) {
  const int64_t D = p.D, T_ = p.T_;
  if (stats) {
    const int64_t blocks = accumulator_blocks(p.B);
    for (int l = 0; l < p.L; ++l) {
      const int64_t Hl = p.H[l];
      std::vector<Moments> moms(blocks);
      for_each_block(p.B, blocks, [&](int64_t c, int64_t b0, int64_t b1) {
        Workspace<T> ws(p, false);
        moms[c].init(p.G * Hl);
        for_each_item(p, b0, b1, [&](int64_t b, int64_t e, int64_t item, int64_t row, int64_t g, int64_t n) {
          if (l == 0) first_layer_setup(p, ws, p.query_of(b, e), g);
          for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
            const int64_t nt = std::min(kTileRows, n - t0);
            const T* h_prev = nullptr;
            if (l == 0) {
              load_keys(p, ws, p.keys_of(row, e), row, t0, nt);
            } else {
              layer_activation(p, l - 1, g, nt, saved.tile(l - 1, p, item, t0), ws.h[l - 1].data());
              h_prev = ws.h[l - 1].data();
            }
            T* z = saved.tile(l, p, item, t0);
            layer_forward(p, ws, l, g, nt, h_prev, z);
            accumulate_moments(moms[c], g * Hl, z, nt, Hl, ws.moment_sums.data());
          }
        });
      });
      Moments total;
      total.init(p.G * Hl);
      for (auto& m : moms)
        for (int64_t j = 0; j < p.G * Hl; ++j) total.merge(j, m.n[j], m.mean[j], m.m2[j]);
      std::vector<T> mu(p.G * Hl), v(p.G * Hl);
      for (int64_t j = 0; j < p.G * Hl; ++j) {
        mu[j] = static_cast<T>(total.mean[j]);
        v[j] = static_cast<T>(total.n[j] > 0 ? total.m2[j] / total.n[j] : 0.0);
      }
      stats->set(p, l, std::move(mu), std::move(v));
    }
  }
  const int top = static_cast<int>(p.L) - 1;
  for_each_block(p.B, num_blocks(p.B), [&](int64_t, int64_t b0, int64_t b1) {
    Workspace<T> ws(p, false);
    for_each_item(p, b0, b1, [&](int64_t b, int64_t e, int64_t item, int64_t row, int64_t g, int64_t n) {
      if (!stats) first_layer_setup(p, ws, p.query_of(b, e), g);
      T* s = ws.s.data();
      for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
        const int64_t nt = std::min(kTileRows, n - t0);
        if (stats) {
          layer_activation(p, top, g, nt, saved.tile(top, p, item, t0), ws.h[top].data());
        } else {
          load_keys(p, ws, p.keys_of(row, e), row, t0, nt);
          T* zs[kMaxLayers];
          for (int l = 0; l < p.L; ++l) zs[l] = saved.tile(l, p, item, t0);
          mlp_forward_tile(p, ws, g, nt, zs);
        }
        score_tile(p, ws, g, nt, s + t0);
      }
      // Positions past the length are not computed: their saved rows are zeros.
      for (int l = 0; l < p.L; ++l)
        std::fill(saved.tile(l, p, item, n), saved.tile(l, p, item, T_), T(0));
      normalize_and_pool(p, row, p.keys_of(row, e), n, s, scores + item * T_, out + item * D);
    });
  });
}

// The backward of the batch-statistics forward: layer by layer over the batch, since the
// statistics' part of layer l's dz needs every position's gradient of layer l first.
template <typename T>
BackwardResult dice_stats_backward(Problem<T>& p, const SavedZ<T>& saved, const DiceStats<T>& stats,
                                   const at::Tensor& key_index, const T* gout, const T* gscores,
                                   const T* scores, const at::TensorOptions& opts) {
  BackwardState<T> st(p, opts);
  const int top = static_cast<int>(p.L) - 1;
  // dz of the layer being processed, (B, E, T, H_l), the activation's part only: at most
  // two layers' at a time (the one read and the one below it, written).
  std::vector<at::Tensor> dz_store(p.L);
  auto allocate_dz = [&](int l) { dz_store[l] = at::empty({p.B * p.E * p.T_ * p.H[l]}, opts); };
  allocate_dz(top);
  auto dz_tile = [&](int l, int64_t item, int64_t t0) {
    return dz_store[l].template data_ptr<T>() + (item * p.T_ + t0) * p.H[l];
  };
  std::vector<T> c0, c1;
  // Layer l's statistics part: sums the blocks' dscale/dshift, turns them into
  // dgamma/dbeta (kept in block 0) and the coefficients c0, c1.
  auto finish_layer = [&](int l) {
    const Grads<T>& g0 = st.grads[0];
    for (int i = 0; i < 3; ++i) st.reduce(g0.ap[l][i], p.G * p.H[l], true);
    stats.backward(p, l, g0.ap[l][1], g0.ap[l][2], c0, c1);
  };
  // dz of nt rows of layer l: the activation's part plus the statistics'.
  auto complete_dz = [&](int l, int64_t g, int64_t nt, const T* z, T* dz) {
    const int64_t Hl = p.H[l];
    const T* a = c0.data() + g * Hl;
    const T* m = c1.data() + g * Hl;
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = 0; j < Hl; ++j) dz[i * Hl + j] += a[j] + m[j] * z[i * Hl + j];
  };
  for_each_block(p.B, st.blocks, [&](int64_t c, int64_t b0, int64_t b1) {
    Workspace<T> ws(p, true);
    for_each_item(p, b0, b1, [&](int64_t, int64_t e, int64_t item, int64_t row, int64_t g, int64_t n) {
      score_gradients(p, row, p.keys_of(row, e), n, gout + item * p.D,
                      gscores ? gscores + item * p.T_ : nullptr, scores + item * p.T_, ws.ds.data());
      for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
        const int64_t nt = std::min(kTileRows, n - t0);
        const T* z = saved.tile(top, p, item, t0);
        layer_activation(p, top, g, nt, z, ws.h[top].data());
        top_backward_tile(p, ws, st.grads[c], g, nt, ws.ds.data() + t0, z, ws.h[top].data(),
                          dz_tile(top, item, t0));
      }
    });
  });
  for (int l = top; l > 0; --l) {
    finish_layer(l);
    allocate_dz(l - 1);
    for_each_block(p.B, st.blocks, [&](int64_t c, int64_t b0, int64_t b1) {
      Workspace<T> ws(p, true);
      for_each_item(p, b0, b1, [&](int64_t, int64_t, int64_t item, int64_t, int64_t g, int64_t n) {
        for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
          const int64_t nt = std::min(kTileRows, n - t0);
          T* dz = dz_tile(l, item, t0);
          complete_dz(l, g, nt, saved.tile(l, p, item, t0), dz);
          const T* z_prev = saved.tile(l - 1, p, item, t0);
          layer_activation(p, l - 1, g, nt, z_prev, ws.h[l - 1].data());
          hidden_backward_tile(p, ws, st.grads[c], l, g, nt, dz, z_prev, ws.h[l - 1].data(),
                               dz_tile(l - 1, item, t0));
        }
      });
    });
    dz_store[l] = at::Tensor();
  }
  finish_layer(0);
  for_each_block(p.B, st.blocks, [&](int64_t c, int64_t b0, int64_t b1) {
    Workspace<T> ws(p, true);
    for_each_item(p, b0, b1, [&](int64_t b, int64_t e, int64_t item, int64_t row, int64_t g, int64_t n) {
      first_layer_setup(p, ws, p.query_of(b, e), g, true);
      std::fill(ws.dm.begin(), ws.dm.end(), T(0));
      std::fill(ws.dqterm.begin(), ws.dqterm.end(), T(0));
      for (int64_t t0 = 0; t0 < n; t0 += kTileRows) {
        const int64_t nt = std::min(kTileRows, n - t0);
        load_keys(p, ws, p.keys_of(row, e), row, t0, nt);
        T* dz = dz_tile(0, item, t0);
        complete_dz(0, g, nt, saved.tile(0, p, item, t0), dz);
        first_backward_tile(p, ws, nt, dz);
        write_key_gradients(p, ws, row, t0, nt, scores + item * p.T_, gout + item * p.D,
                          st.gk_of(p, item));
      }
      first_layer_backward(p, ws, st.grads[c], p.query_of(b, e), st.gq_of(p, b, e), g);
    });
  });
  return st.finish(p, key_index, opts);
}

// ---- operator entry points --------------------------------------------------------------

void check_inputs(const at::Tensor& query, const at::Tensor& keys) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 4, "target_attention_cpu: query (B, Eq, D) and keys (R, E, T, D)");
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu(), "target_attention_cpu: CPU tensors only");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "target_attention_cpu: query and keys differ in dtype");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "target_attention_cpu: float32 or float64 only");
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& t) {
  if (!t) return t;
  return t->contiguous();
}

std::vector<at::Tensor> contig(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

void check_tensor(const at::Tensor& t, const std::string& name, at::ScalarType dtype,
                  at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == dtype, name, ": expected a CPU tensor of ",
                    dtype, ", got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// The contiguous arguments shared by every operator.
struct Args {
  at::Tensor query, keys, out_weight, out_bias;
  std::optional<at::Tensor> key_index, lengths, mask;
  std::vector<at::Tensor> weights, biases, act_params;
  Act act;
  Args(const at::Tensor& query_, const at::Tensor& keys_, const std::optional<at::Tensor>& key_index_,
       const std::optional<at::Tensor>& lengths_, const std::optional<at::Tensor>& mask_,
       at::TensorList weights_, at::TensorList biases_, const at::Tensor& out_weight_,
       const at::Tensor& out_bias_, at::TensorList act_params_, c10::string_view activation) {
    check_inputs(query_, keys_);
    query = query_.contiguous();
    keys = keys_.contiguous();
    key_index = contig(key_index_);
    lengths = contig(lengths_);
    mask = contig(mask_);
    weights = contig(weights_);
    biases = contig(biases_);
    act_params = contig(act_params_);
    out_weight = out_weight_.contiguous();
    out_bias = out_bias_.contiguous();
    act = parse_activation(std::string(activation));
    check_shapes();
  }
  int64_t B() const { return query.size(0); }
  int64_t E() const { return keys.size(1); }
  int64_t T() const { return keys.size(2); }
  int64_t D() const { return query.size(2); }
  int64_t G() const { return weights[0].size(0); }
  at::ScalarType dtype() const { return query.scalar_type(); }
  static void check_range(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
    const int64_t* v = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK_VALUE(v[i] >= lo && v[i] <= hi, name, "[", i, "] = ", v[i], " is outside [", lo, ", ", hi, "]");
    }
  }

  // Every argument's shape against the problem's dimensions, and the index values.
  void check_shapes() const {
    const int64_t R = keys.size(0);
    TORCH_CHECK_VALUE(keys.size(3) == D(), "keys: last dimension ", keys.size(3), " differs from query's D = ", D());
    TORCH_CHECK_VALUE(query.size(1) == 1 || query.size(1) == E(), "query: expected (B, 1 or E, D) with E = ", E(),
                      ", got ", query.sizes());
    if (key_index) {
      check_tensor(*key_index, "key_index", at::kLong, {B()});
    } else {
      TORCH_CHECK_VALUE(R == B(), "keys: ", R, " history rows for ", B(), " queries without key_index");
    }
    if (lengths) check_tensor(*lengths, "lengths", at::kLong, {R});
    if (mask) check_tensor(*mask, "mask", at::kBool, {R, T()});
    // The values that address memory (a host read of B + R integers, on the CPU only).
    if (key_index) check_range(*key_index, "key_index", 0, R - 1);
    if (lengths) check_range(*lengths, "lengths", 0, T());
    const size_t L = weights.size();
    TORCH_CHECK_VALUE(L >= 1 && L <= kMaxLayers, "weights: 1 to 3 layers, got ", L);
    TORCH_CHECK_VALUE(biases.size() == L, "biases: one per layer (", L, "), got ", biases.size());
    TORCH_CHECK_VALUE(weights[0].dim() == 3, "weights[0]: expected (G, H1, 4D), got ", weights[0].sizes());
    TORCH_CHECK_VALUE(G() == 1 || G() == E(), "weights[0]: G = ", G(), " must be 1 or E = ", E());
    const int k = act_param_count(act);
    TORCH_CHECK_VALUE(act_params.size() == k * L, "act_params: expected ", k * L, " tensors, got ",
                      act_params.size());
    int64_t width = 4 * D();
    for (size_t l = 0; l < L; ++l) {
      const at::Tensor& w = weights[l];
      TORCH_CHECK_VALUE(w.dim() == 3, indexed("weights", l), ": expected (G, H, ", width, "), got ", w.sizes());
      const int64_t H = w.size(1);
      check_tensor(w, indexed("weights", l), dtype(), {G(), H, width});
      check_tensor(biases[l], indexed("biases", l), dtype(), {G(), H});
      for (int i = 0; i < k; ++i)
        check_tensor(act_params[l * k + i], indexed("act_params", l * k + i), dtype(), {G(), H});
      width = H;
    }
    check_tensor(out_weight, "out_weight", dtype(), {G(), width});
    check_tensor(out_bias, "out_bias", dtype(), {G()});
  }
  // The gradients and saved scores a backward receives.
  void check_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_scores,
                      const at::Tensor& scores) const {
    check_tensor(grad_out, "grad_out", dtype(), {B(), E(), D()});
    if (grad_scores) check_tensor(*grad_scores, "grad_scores", dtype(), {B(), E(), T()});
    check_tensor(scores, "scores", dtype(), {B(), E(), T()});
  }
  template <typename T>
  Problem<T> problem(c10::string_view normalization) const {
    return make_problem<T>(query, keys, key_index, lengths, mask, weights, biases, out_weight,
                           out_bias, act_params, act, normalization);
  }
  at::Tensor key_index_or_undefined() const { return key_index ? *key_index : at::Tensor(); }
};

std::tuple<at::Tensor, at::Tensor> target_attention_cpu_forward(
    const at::Tensor& query_, const at::Tensor& keys_, const std::optional<at::Tensor>& key_index_,
    const std::optional<at::Tensor>& lengths_, const std::optional<at::Tensor>& mask_,
    at::TensorList weights_, at::TensorList biases_, const at::Tensor& out_weight_,
    const at::Tensor& out_bias_, at::TensorList act_params_, c10::string_view activation,
    c10::string_view normalization) {
  const Args a(query_, keys_, key_index_, lengths_, mask_, weights_, biases_, out_weight_,
               out_bias_, act_params_, activation);
  const int64_t B = a.query.size(0), E = a.keys.size(1), T_ = a.keys.size(2), D = a.query.size(2);
  at::Tensor out = at::empty({B, E, D}, a.query.options());
  at::Tensor scores = at::empty({B, E, T_}, a.query.options());
  AT_DISPATCH_FLOATING_TYPES(a.query.scalar_type(), "target_attention_cpu_forward", [&] {
    const auto p = a.problem<scalar_t>(normalization);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s = scores.data_ptr<scalar_t>();
    for_each_block(B, num_blocks(B), [&](int64_t, int64_t b0, int64_t b1) {
      Workspace<scalar_t> ws(p, false);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t e = 0; e < E; ++e)
          forward_item(p, ws, b, e, o + (b * E + e) * D, s + (b * E + e) * T_);
    });
  });
  return {out, scores};
}

BackwardResult target_attention_cpu_backward(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_scores_,
    const at::Tensor& scores_, const at::Tensor& query_, const at::Tensor& keys_,
    const std::optional<at::Tensor>& key_index_, const std::optional<at::Tensor>& lengths_,
    const std::optional<at::Tensor>& mask_, at::TensorList weights_, at::TensorList biases_,
    const at::Tensor& out_weight_, const at::Tensor& out_bias_, at::TensorList act_params_,
    c10::string_view activation, c10::string_view normalization) {
  const Args a(query_, keys_, key_index_, lengths_, mask_, weights_, biases_, out_weight_,
               out_bias_, act_params_, activation);
  a.check_backward(grad_out_, grad_scores_, scores_);
  const at::Tensor grad_out = grad_out_.contiguous(), scores = scores_.contiguous();
  const auto grad_scores = contig(grad_scores_);
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES(a.query.scalar_type(), "target_attention_cpu_backward", [&] {
    const auto p = a.problem<scalar_t>(normalization);
    result = backward_impl<scalar_t>(
        p, SavedZ<scalar_t>(), a.key_index_or_undefined(), grad_out.data_ptr<scalar_t>(),
        grad_scores ? grad_scores->data_ptr<scalar_t>() : nullptr, scores.data_ptr<scalar_t>(),
        a.query.options());
  });
  return result;
}

// The training forward's problem: the activation parameters, and for Dice with batch
// statistics (dice_eps given) [alpha, gamma, beta] per layer turned into the statistics.
template <typename T>
Problem<T> train_problem(const Args& a, c10::string_view normalization,
                         const std::optional<at::ArrayRef<double>>& dice_eps,
                         DiceStats<T>& stats) {
  Problem<T> p = a.problem<T>(normalization);
  if (dice_eps) {
    TORCH_CHECK(p.act == Act::kDice, "dice_eps: only for the dice activation");
    p.all_positions = true;
    TORCH_CHECK(static_cast<int64_t>(dice_eps->size()) == p.L, "dice_eps: one per layer");
    stats.count = static_cast<double>(p.B) * p.T_ * (p.G > 1 ? 1 : p.E);
    for (int l = 0; l < p.L; ++l) {
      stats.eps[l] = (*dice_eps)[l];
      stats.gamma[l] = p.ap[l][1];
      stats.beta[l] = p.ap[l][2];
    }
  }
  return p;
}

template <typename T>
SavedZ<T> saved_from(const std::vector<at::Tensor>& zs) {
  SavedZ<T> s;
  for (size_t l = 0; l < zs.size(); ++l) s.z[l] = zs[l].data_ptr<T>();
  return s;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
target_attention_cpu_train(const at::Tensor& query_, const at::Tensor& keys_,
                           const std::optional<at::Tensor>& key_index_,
                           const std::optional<at::Tensor>& lengths_,
                           const std::optional<at::Tensor>& mask_, at::TensorList weights_,
                           at::TensorList biases_, const at::Tensor& out_weight_,
                           const at::Tensor& out_bias_, at::TensorList act_params_,
                           c10::string_view activation, c10::string_view normalization,
                           std::optional<at::ArrayRef<double>> dice_eps) {
  const Args a(query_, keys_, key_index_, lengths_, mask_, weights_, biases_, out_weight_,
               out_bias_, act_params_, activation);
  const auto opts = a.query.options();
  const int64_t B = a.query.size(0), E = a.keys.size(1), T_ = a.keys.size(2), D = a.query.size(2);
  at::Tensor out = at::empty({B, E, D}, opts);
  at::Tensor scores = at::empty({B, E, T_}, opts);
  std::vector<at::Tensor> zs, stats_out;
  for (const auto& w : a.weights) zs.push_back(at::empty({B, E, T_, w.size(1)}, opts));
  AT_DISPATCH_FLOATING_TYPES(a.query.scalar_type(), "target_attention_cpu_train", [&] {
    DiceStats<scalar_t> stats;
    auto p = train_problem<scalar_t>(a, normalization, dice_eps, stats);
    train_forward<scalar_t>(p, saved_from<scalar_t>(zs), dice_eps ? &stats : nullptr,
                            out.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>());
    if (dice_eps) {
      for (int l = 0; l < p.L; ++l) {
        at::Tensor st = at::empty({p.G, 2, p.H[l]}, opts);
        scalar_t* o = st.data_ptr<scalar_t>();
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t H = p.H[l];
          std::copy_n(stats.mean[l].data() + g * H, H, o + (g * 2) * H);
          std::copy_n(stats.var[l].data() + g * H, H, o + (g * 2 + 1) * H);
        }
        stats_out.push_back(st);
      }
    }
  });
  return {out, scores, zs, stats_out};
}

BackwardResult target_attention_cpu_train_backward(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_scores_,
    const at::Tensor& scores_, at::TensorList pre_activations, at::TensorList stats_,
    const at::Tensor& query_, const at::Tensor& keys_, const std::optional<at::Tensor>& key_index_,
    const std::optional<at::Tensor>& lengths_, const std::optional<at::Tensor>& mask_,
    at::TensorList weights_, at::TensorList biases_, const at::Tensor& out_weight_,
    const at::Tensor& out_bias_, at::TensorList act_params_, c10::string_view activation,
    c10::string_view normalization, std::optional<at::ArrayRef<double>> dice_eps) {
  const Args a(query_, keys_, key_index_, lengths_, mask_, weights_, biases_, out_weight_,
               out_bias_, act_params_, activation);
  a.check_backward(grad_out_, grad_scores_, scores_);
  const size_t L = a.weights.size();
  TORCH_CHECK_VALUE(pre_activations.size() == L, "pre_activations: one per layer (", L, "), got ",
                    pre_activations.size());
  TORCH_CHECK_VALUE(stats_.size() == (dice_eps ? L : 0), "stats: one per layer with dice_eps, none without; got ",
                    stats_.size());
  for (size_t l = 0; l < L; ++l) {
    const int64_t H = a.weights[l].size(1);
    check_tensor(pre_activations[l], indexed("pre_activations", l), a.dtype(), {a.B(), a.E(), a.T(), H});
    if (dice_eps) check_tensor(stats_[l], indexed("stats", l), a.dtype(), {a.G(), 2, H});
  }
  const at::Tensor grad_out = grad_out_.contiguous(), scores = scores_.contiguous();
  const auto grad_scores = contig(grad_scores_);
  const auto zs = contig(pre_activations), st = contig(stats_);
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES(a.query.scalar_type(), "target_attention_cpu_train_backward", [&] {
    const scalar_t* gs = grad_scores ? grad_scores->data_ptr<scalar_t>() : nullptr;
    DiceStats<scalar_t> stats;
    auto p = train_problem<scalar_t>(a, normalization, dice_eps, stats);
    const auto saved = saved_from<scalar_t>(zs);
    if (!dice_eps) {
      result = backward_impl<scalar_t>(p, saved, a.key_index_or_undefined(),
                                       grad_out.data_ptr<scalar_t>(), gs,
                                       scores.data_ptr<scalar_t>(), a.query.options());
      return;
    }
    for (int l = 0; l < p.L; ++l) {
      const int64_t H = p.H[l];
      std::vector<scalar_t> mu(p.G * H), v(p.G * H);
      const scalar_t* s = st[l].data_ptr<scalar_t>();
      for (int64_t g = 0; g < p.G; ++g) {
        std::copy_n(s + (g * 2) * H, H, mu.data() + g * H);
        std::copy_n(s + (g * 2 + 1) * H, H, v.data() + g * H);
      }
      stats.set(p, l, std::move(mu), std::move(v));
    }
    result = dice_stats_backward<scalar_t>(p, saved, stats, a.key_index_or_undefined(),
                                           grad_out.data_ptr<scalar_t>(), gs,
                                           scores.data_ptr<scalar_t>(), a.query.options());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // Fused target attention on the canonical layout of the header comment; returns the
  // pooled output (B, E, D) and the attention weights (B, E, T). Writes nothing of size
  // (B, T, H); its backward recomputes the hidden layers.
  m.def(
      "target_attention_cpu(Tensor query, Tensor keys, Tensor? key_index, Tensor? lengths, "
      "Tensor? mask, Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor out_bias, "
      "Tensor[] act_params, str activation, str normalization) -> (Tensor, Tensor)");
  m.def(
      "target_attention_cpu_backward(Tensor grad_out, Tensor? grad_scores, Tensor scores, "
      "Tensor query, Tensor keys, Tensor? key_index, Tensor? lengths, Tensor? mask, "
      "Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor out_bias, "
      "Tensor[] act_params, str activation, str normalization) -> (Tensor, Tensor, Tensor[], "
      "Tensor[], Tensor, Tensor, Tensor[])");
  // The training form: also returns each layer's pre-activation (B, E, T, H_l) for its
  // backward (rows past a history's length are zeros). With dice_eps, Dice normalises
  // with batch statistics over every position (padding included): act_params are then
  // [alpha, gamma, beta] per layer, and stats the batch mean and biased variance
  // (G, 2, H_l) per layer (empty list without dice_eps).
  m.def(
      "target_attention_cpu_train(Tensor query, Tensor keys, Tensor? key_index, Tensor? lengths, "
      "Tensor? mask, Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor out_bias, "
      "Tensor[] act_params, str activation, str normalization, float[]? dice_eps) -> "
      "(Tensor, Tensor, Tensor[], Tensor[])");
  m.def(
      "target_attention_cpu_train_backward(Tensor grad_out, Tensor? grad_scores, Tensor scores, "
      "Tensor[] pre_activations, Tensor[] stats, Tensor query, Tensor keys, Tensor? key_index, "
      "Tensor? lengths, Tensor? mask, Tensor[] weights, Tensor[] biases, Tensor out_weight, "
      "Tensor out_bias, Tensor[] act_params, str activation, str normalization, "
      "float[]? dice_eps) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("target_attention_cpu", &target_attention_cpu_forward);
  m.impl("target_attention_cpu_backward", &target_attention_cpu_backward);
  m.impl("target_attention_cpu_train", &target_attention_cpu_train);
  m.impl("target_attention_cpu_train_backward", &target_attention_cpu_train_backward);
}

}  // namespace target_attention
}  // namespace interest_kernels
