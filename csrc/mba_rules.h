// Per-element update rules of the mini-batch-aware (MBA) optimizers (SPEC section 5).
//
// Shared by the CPU and CUDA kernels so both compute the same expression in the same
// order. `acc_t` is the accumulation type (float for fp32/fp16/bf16 tables, double for
// fp64); `g` is the deduplicated gradient of one element of a touched row and `decay`
// the row's lambda / n_j (from `decay(n_j)`, computed once per row so the per-element
// work has no division). Optimiser state is acc_t, addressed per element.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define IK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IK_HOST_DEVICE inline
#endif

namespace interest_kernels {
namespace mba {

template <typename acc_t>
IK_HOST_DEVICE acc_t ik_sqrt(acc_t x) {
  return sqrt(x);
}

// w <- w - lr * (g + lambda * w / n)   (DIN eq. 7)
template <typename acc_t>
struct SgdRule {
  acc_t lr;
  acc_t weight_decay;

  IK_HOST_DEVICE acc_t decay(acc_t n) const { return weight_decay / n; }

  template <typename scalar_t>
  IK_HOST_DEVICE void operator()(scalar_t& w, acc_t g, acc_t decay, acc_t*, acc_t*) const {
    const acc_t wv = static_cast<acc_t>(w);
    w = static_cast<scalar_t>(wv - lr * (g + decay * wv));
  }
};

// g' = g + lambda * w / n; then torch.optim.Adagrad's sparse step:
// s += g'^2, w <- w - clr * g' / (sqrt(s) + eps), clr = lr / (1 + (step - 1) * lr_decay).
template <typename acc_t>
struct AdagradRule {
  acc_t clr;
  acc_t weight_decay;
  acc_t eps;

  IK_HOST_DEVICE acc_t decay(acc_t n) const { return weight_decay / n; }

  template <typename scalar_t>
  IK_HOST_DEVICE void operator()(scalar_t& w, acc_t g, acc_t decay, acc_t* sum, acc_t*) const {
    const acc_t wv = static_cast<acc_t>(w);
    const acc_t gp = g + decay * wv;
    const acc_t s = *sum + gp * gp;
    *sum = s;
    w = static_cast<scalar_t>(wv - clr * (gp / (ik_sqrt(s) + eps)));
  }
};

// g' = g + lambda * w / n; then torch.optim.SparseAdam's step with the table's global
// step count t: m += (1 - b1)(g' - m), v += (1 - b2)(g'^2 - v),
// w <- w - step_size * m / (sqrt(v) + eps), step_size = lr sqrt(1 - b2^t) / (1 - b1^t).
template <typename acc_t>
struct AdamRule {
  acc_t step_size;
  acc_t beta1;
  acc_t beta2;
  acc_t eps;
  acc_t weight_decay;

  IK_HOST_DEVICE acc_t decay(acc_t n) const { return weight_decay / n; }

  template <typename scalar_t>
  IK_HOST_DEVICE void operator()(scalar_t& w, acc_t g, acc_t decay, acc_t* m, acc_t* v) const {
    const acc_t wv = static_cast<acc_t>(w);
    const acc_t gp = g + decay * wv;
    const acc_t mv = *m + (acc_t(1) - beta1) * (gp - *m);
    const acc_t vv = *v + (acc_t(1) - beta2) * (gp * gp - *v);
    *m = mv;
    *v = vv;
    w = static_cast<scalar_t>(wv - step_size * (mv / (ik_sqrt(vv) + eps)));
  }
};

}  // namespace mba
}  // namespace interest_kernels
