// Fused CPU kernels for Dice (SPEC section 4) over x (N, C), channels last:
//
//   p = sigmoid(w (x - mu) * invstd + b),   out = x (alpha + p (1 - alpha))
//
// with (mu, var) the batch statistics over the N rows (biased variance) in training, the
// running statistics in eval, and invstd = 1 / sqrt(var + eps). The eager reference makes
// about ten passes over (N, C) forward; here the forward reads x three times (mean,
// variance, apply) and writes out once, the backward reads x and the gradient twice
// (column sums, then dx) and writes dx once.
//
// Column sums are accumulated in double over fixed chunks of rows and the chunks added in
// order, so results do not depend on the thread count. float16/bfloat16 inputs are
// computed in float32 and float64 in float64; the outputs have x's dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fast_math.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace interest_kernels {
namespace dice {
namespace {

constexpr int64_t kChunkRows = 1024;

// Column sums in double of `width` planes of C values: f(begin, end, acc) adds rows
// [begin, end) into acc (width * C); per chunk of rows, then the chunks in order.
template <typename F>
std::vector<double> column_sums(int64_t rows, int64_t cols, int width, const F& f) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<double> partial(static_cast<size_t>(chunks * cols * width), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      f(k * kChunkRows, std::min(rows, (k + 1) * kChunkRows), partial.data() + k * cols * width);
  });
  std::vector<double> total(static_cast<size_t>(cols * width), 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t i = 0; i < cols * width; ++i) total[i] += partial[k * cols * width + i];
  return total;
}

struct Params {
  at::ScalarType cdt;
  at::Tensor x;                     // (N, C) compute dtype, contiguous
  at::Tensor alpha, weight, bias;   // (C,) compute dtype; weight/bias undefined when absent
};

void check_floating_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "dice_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "dice_cpu: ", name,
                    " must be a floating-point tensor, got ", t.scalar_type());
}

// A per-channel argument: a floating CPU tensor of shape (C,).
void check_channel(const at::Tensor& t, const char* name, int64_t C) {
  check_floating_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, "dice_cpu: ", name, " must be (C,) with C = ", C,
                    ", got shape ", t.sizes());
}

Params prepare(const at::Tensor& x, const at::Tensor& alpha, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& bias) {
  check_floating_cpu(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "dice_cpu: x must be (N, C), got shape ", x.sizes());
  const int64_t C = x.size(1);
  Params p;
  p.cdt = at::toOpMathType(x.scalar_type());
  p.x = x.to(p.cdt).contiguous();
  auto channel = [&](const at::Tensor& t, const char* name) {
    check_channel(t, name, C);
    return t.to(p.cdt).contiguous();
  };
  p.alpha = channel(alpha, "alpha");
  if (weight.has_value()) p.weight = channel(*weight, "weight");
  if (bias.has_value()) p.bias = channel(*bias, "bias");
  return p;
}

template <typename T>
struct Affine {  // per column: y = scale * x + shift = w (x - mu) invstd + b
  std::vector<T> scale, shift;
};

template <typename T>
Affine<T> affine(const Params& p, const at::Tensor& mean, const at::Tensor& invstd) {
  const int64_t C = p.x.size(1);
  Affine<T> a{std::vector<T>(C), std::vector<T>(C)};
  const T* mu = mean.data_ptr<T>();
  const T* is = invstd.data_ptr<T>();
  const T* w = p.weight.defined() ? p.weight.data_ptr<T>() : nullptr;
  const T* b = p.bias.defined() ? p.bias.data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    a.scale[c] = is[c] * (w ? w[c] : T(1));
    a.shift[c] = (b ? b[c] : T(0)) - mu[c] * a.scale[c];
  }
  return a;
}

// ---- row kernels (float32 ones compiled per instruction set) ------------------------------

// acc[c] += x (mu null) or (x - mu[c])^2 over rows [begin, end).
template <typename T>
IK_INLINE void stat_rows(const T* __restrict xs, int64_t begin, int64_t end, int64_t C,
                         const double* __restrict mu, double* __restrict acc) {
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict xr = xs + n * C;
    if (mu == nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] += xr[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = xr[c] - mu[c];
        acc[c] += d * d;
      }
    }
  }
}

template <typename T>
IK_INLINE void apply_rows(const T* __restrict xs, T* __restrict o, int64_t begin, int64_t end, int64_t C,
                          const T* __restrict scale, const T* __restrict shift, const T* __restrict al) {
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict xr = xs + n * C;
    T* __restrict orow = o + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T q = fast_sigmoid(scale[c] * xr[c] + shift[c]);
      orow[c] = xr[c] * (al[c] + q * (T(1) - al[c]));
    }
  }
}

// Per column, three planes of acc: sum d_out x (1 - p) (alpha), sum dy (bias), sum dy xhat
// (weight), with dy = d_out x (1 - alpha) p (1 - p) the gradient of the pre-sigmoid value.
template <typename T>
IK_INLINE void grad_sum_rows(const T* __restrict xs, const T* __restrict gs, int64_t begin, int64_t end,
                             int64_t C, const T* __restrict scale, const T* __restrict shift,
                             const T* __restrict al, const T* __restrict mus, const T* __restrict iss,
                             double* __restrict acc) {
  double* __restrict a_alpha = acc;
  double* __restrict a_dy = acc + C;
  double* __restrict a_dyx = acc + 2 * C;
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict xr = xs + n * C;
    const T* __restrict gr = gs + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T q = fast_sigmoid(scale[c] * xr[c] + shift[c]);
      const T dy = gr[c] * xr[c] * (T(1) - al[c]) * q * (T(1) - q);
      a_alpha[c] += gr[c] * xr[c] * (T(1) - q);
      a_dy[c] += dy;
      a_dyx[c] += dy * (xr[c] - mus[c]) * iss[c];
    }
  }
}

// dx = d_out (alpha + p (1 - alpha)) + w invstd (dy - mean dy - xhat mean(dy xhat)); the
// means are zero in eval.
template <typename T>
IK_INLINE void grad_dx_rows(const T* __restrict xs, const T* __restrict gs, T* __restrict d, int64_t begin,
                            int64_t end, int64_t C, const T* __restrict scale, const T* __restrict shift,
                            const T* __restrict al, const T* __restrict mus, const T* __restrict iss,
                            const T* __restrict k, const T* __restrict m_dy, const T* __restrict m_dyx) {
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict xr = xs + n * C;
    const T* __restrict gr = gs + n * C;
    T* __restrict dr = d + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T q = fast_sigmoid(scale[c] * xr[c] + shift[c]);
      const T dy = gr[c] * xr[c] * (T(1) - al[c]) * q * (T(1) - q);
      const T xhat = (xr[c] - mus[c]) * iss[c];
      dr[c] = gr[c] * (al[c] + q * (T(1) - al[c])) + k[c] * (dy - m_dy[c] - xhat * m_dyx[c]);
    }
  }
}

IK_CLONES void stat_rows_f32(const float* xs, int64_t b, int64_t e, int64_t C, const double* mu, double* acc) {
  stat_rows(xs, b, e, C, mu, acc);
}
IK_CLONES void apply_rows_f32(const float* xs, float* o, int64_t b, int64_t e, int64_t C, const float* scale,
                              const float* shift, const float* al) {
  apply_rows(xs, o, b, e, C, scale, shift, al);
}
IK_CLONES void grad_sum_rows_f32(const float* xs, const float* gs, int64_t b, int64_t e, int64_t C,
                                 const float* scale, const float* shift, const float* al, const float* mus,
                                 const float* iss, double* acc) {
  grad_sum_rows(xs, gs, b, e, C, scale, shift, al, mus, iss, acc);
}
IK_CLONES void grad_dx_rows_f32(const float* xs, const float* gs, float* d, int64_t b, int64_t e, int64_t C,
                                const float* scale, const float* shift, const float* al, const float* mus,
                                const float* iss, const float* k, const float* m_dy, const float* m_dyx) {
  grad_dx_rows(xs, gs, d, b, e, C, scale, shift, al, mus, iss, k, m_dy, m_dyx);
}
void run_stat(const float* xs, int64_t b, int64_t e, int64_t C, const double* mu, double* acc) {
  stat_rows_f32(xs, b, e, C, mu, acc);
}
void run_stat(const double* xs, int64_t b, int64_t e, int64_t C, const double* mu, double* acc) {
  stat_rows(xs, b, e, C, mu, acc);
}
void run_apply(const float* xs, float* o, int64_t b, int64_t e, int64_t C, const float* sc, const float* sh,
               const float* al) {
  apply_rows_f32(xs, o, b, e, C, sc, sh, al);
}
void run_apply(const double* xs, double* o, int64_t b, int64_t e, int64_t C, const double* sc,
               const double* sh, const double* al) {
  apply_rows(xs, o, b, e, C, sc, sh, al);
}
void run_grad_sum(const float* xs, const float* gs, int64_t b, int64_t e, int64_t C, const float* sc,
                  const float* sh, const float* al, const float* mus, const float* iss, double* acc) {
  grad_sum_rows_f32(xs, gs, b, e, C, sc, sh, al, mus, iss, acc);
}
void run_grad_sum(const double* xs, const double* gs, int64_t b, int64_t e, int64_t C, const double* sc,
                  const double* sh, const double* al, const double* mus, const double* iss, double* acc) {
  grad_sum_rows(xs, gs, b, e, C, sc, sh, al, mus, iss, acc);
}
void run_grad_dx(const float* xs, const float* gs, float* d, int64_t b, int64_t e, int64_t C, const float* sc,
                 const float* sh, const float* al, const float* mus, const float* iss, const float* k,
                 const float* m_dy, const float* m_dyx) {
  grad_dx_rows_f32(xs, gs, d, b, e, C, sc, sh, al, mus, iss, k, m_dy, m_dyx);
}
void run_grad_dx(const double* xs, const double* gs, double* d, int64_t b, int64_t e, int64_t C,
                 const double* sc, const double* sh, const double* al, const double* mus, const double* iss,
                 const double* k, const double* m_dy, const double* m_dyx) {
  grad_dx_rows(xs, gs, d, b, e, C, sc, sh, al, mus, iss, k, m_dy, m_dyx);
}

// ---- the ops ------------------------------------------------------------------------------

template <typename T>
void forward_impl(const Params& p, bool training, double eps, at::Tensor& mean, at::Tensor& var,
                  at::Tensor& invstd, at::Tensor& out) {
  const int64_t N = p.x.size(0), C = p.x.size(1);
  const T* xs = p.x.data_ptr<T>();
  if (training) {
    const std::vector<double> sum = column_sums(N, C, 1, [&](int64_t b, int64_t e, double* acc) {
      run_stat(xs, b, e, C, nullptr, acc);
    });
    std::vector<double> mu(C);
    for (int64_t c = 0; c < C; ++c) mu[c] = sum[c] / N;
    const std::vector<double> sq = column_sums(N, C, 1, [&](int64_t b, int64_t e, double* acc) {
      run_stat(xs, b, e, C, mu.data(), acc);
    });
    for (int64_t c = 0; c < C; ++c) {
      mean.data_ptr<T>()[c] = static_cast<T>(mu[c]);
      var.data_ptr<T>()[c] = static_cast<T>(sq[c] / N);
    }
  }
  for (int64_t c = 0; c < C; ++c)
    invstd.data_ptr<T>()[c] = T(1) / std::sqrt(var.data_ptr<T>()[c] + static_cast<T>(eps));
  const Affine<T> a = affine<T>(p, mean, invstd);
  const T* al = p.alpha.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, N, kChunkRows, [&](int64_t begin, int64_t end) {
    run_apply(xs, o, begin, end, C, a.scale.data(), a.shift.data(), al);
  });
}

// Returns out (N, C) in x's dtype, then mean, invstd and the biased variance (C,) in the
// compute dtype: the batch statistics in training, the running ones in eval.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_cpu_forward(
    const at::Tensor& x, const at::Tensor& alpha, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps) {
  const Params p = prepare(x, alpha, weight, bias);
  const int64_t N = p.x.size(0), C = p.x.size(1);
  const auto opts = p.x.options();
  at::Tensor mean, var;
  if (training) {
    TORCH_CHECK_VALUE(N >= 1, "dice_cpu: training needs at least one row");
    mean = at::empty({C}, opts);
    var = at::empty({C}, opts);
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                      "dice_cpu: eval needs running_mean and running_var");
    check_channel(*running_mean, "running_mean", C);
    check_channel(*running_var, "running_var", C);
    mean = running_mean->to(p.cdt).contiguous().clone();
    var = running_var->to(p.cdt).contiguous().clone();
  }
  at::Tensor out = at::empty({N, C}, opts);
  at::Tensor invstd = at::empty({C}, opts);
  if (p.cdt == at::kDouble) {
    forward_impl<double>(p, training, eps, mean, var, invstd, out);
  } else {
    forward_impl<float>(p, training, eps, mean, var, invstd, out);
  }
  return {out.to(x.scalar_type()), mean, invstd, var};
}

template <typename T>
void backward_impl(const Params& p, const at::Tensor& g, const at::Tensor& mu, const at::Tensor& is,
                   bool training, at::Tensor& dx, at::Tensor& d_alpha, at::Tensor& d_weight,
                   at::Tensor& d_bias) {
  const int64_t N = p.x.size(0), C = p.x.size(1);
  const Affine<T> a = affine<T>(p, mu, is);
  const T* xs = p.x.data_ptr<T>();
  const T* gs = g.data_ptr<T>();
  const T* al = p.alpha.data_ptr<T>();
  const T* mus = mu.data_ptr<T>();
  const T* iss = is.data_ptr<T>();
  const T* w = p.weight.defined() ? p.weight.data_ptr<T>() : nullptr;
  const std::vector<double> sums = column_sums(N, C, 3, [&](int64_t b, int64_t e, double* acc) {
    run_grad_sum(xs, gs, b, e, C, a.scale.data(), a.shift.data(), al, mus, iss, acc);
  });
  for (int64_t c = 0; c < C; ++c) {
    d_alpha.data_ptr<T>()[c] = static_cast<T>(sums[c]);
    if (d_bias.numel()) d_bias.data_ptr<T>()[c] = static_cast<T>(sums[C + c]);
    if (d_weight.numel()) d_weight.data_ptr<T>()[c] = static_cast<T>(sums[2 * C + c]);
  }
  std::vector<T> k(C), m_dy(C), m_dyx(C);
  for (int64_t c = 0; c < C; ++c) {
    k[c] = (w ? w[c] : T(1)) * iss[c];
    m_dy[c] = training ? static_cast<T>(sums[C + c] / N) : T(0);
    m_dyx[c] = training ? static_cast<T>(sums[2 * C + c] / N) : T(0);
  }
  T* d = dx.data_ptr<T>();
  at::parallel_for(0, N, kChunkRows, [&](int64_t begin, int64_t end) {
    run_grad_dx(xs, gs, d, begin, end, C, a.scale.data(), a.shift.data(), al, mus, iss, k.data(),
                m_dy.data(), m_dyx.data());
  });
}

// Gradients of dice_cpu_forward's out for x, alpha, weight, bias ((0,) for an absent
// weight or bias). `mean`, `invstd`: what the forward returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_cpu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& alpha,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  const Params p = prepare(x, alpha, weight, bias);
  const int64_t N = p.x.size(0), C = p.x.size(1);
  check_floating_cpu(grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "dice_cpu_backward: grad_out must be shaped like x ",
                    x.sizes(), ", got ", grad_out.sizes());
  check_channel(mean, "mean", C);
  check_channel(invstd, "invstd", C);
  const at::Tensor g = grad_out.to(p.cdt).contiguous();
  const at::Tensor mu = mean.to(p.cdt).contiguous(), is = invstd.to(p.cdt).contiguous();
  at::Tensor dx = at::empty({N, C}, p.x.options());
  at::Tensor d_alpha = at::empty({C}, p.x.options());
  at::Tensor d_weight = p.weight.defined() ? at::empty({C}, p.x.options()) : at::empty({0}, p.x.options());
  at::Tensor d_bias = p.bias.defined() ? at::empty({C}, p.x.options()) : at::empty({0}, p.x.options());
  if (p.cdt == at::kDouble) {
    backward_impl<double>(p, g, mu, is, training, dx, d_alpha, d_weight, d_bias);
  } else {
    backward_impl<float>(p, g, mu, is, training, dx, d_alpha, d_weight, d_bias);
  }
  const auto param_dtype = alpha.scalar_type();
  return {dx.to(x.scalar_type()), d_alpha.to(param_dtype),
          weight.has_value() ? d_weight.to(weight->scalar_type()) : d_weight,
          bias.has_value() ? d_bias.to(bias->scalar_type()) : d_bias};
}

}  // namespace
}  // namespace dice
}  // namespace interest_kernels

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // Dice over x (N, C): (out (N, C) in x's dtype, mean, invstd, biased var (C,) in the
  // compute dtype). training: batch statistics (running ones are not read); eval: the
  // running statistics.
  m.def(
      "dice_cpu_forward(Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients for (x, alpha, weight, bias); (0,) for an absent weight or bias.
  m.def(
      "dice_cpu_backward(Tensor grad_out, Tensor x, Tensor alpha, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("dice_cpu_forward", &interest_kernels::dice::dice_cpu_forward);
  m.impl("dice_cpu_backward", &interest_kernels::dice::dice_cpu_backward);
}
