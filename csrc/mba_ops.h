// The three MBA update ops, written once for both devices. Each device file supplies an
// `Update` struct whose `run<Rule>(weight, ids, grad_rows, counts, make_rule, state0,
// state1)` validates, deduplicates and applies `Rule` to the touched rows, and registers
// `MbaOps<Update>::sgd / adagrad / adam` with TORCH_LIBRARY_IMPL.
//
// The rule makers turn an op's double arguments into the per-element rule of the
// kernel's accumulation type: `make_rule(acc_t(0))` returns `Rule<acc_t>`.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "mba_checks.h"
#include "mba_rules.h"

namespace interest_kernels {
namespace mba {

struct MakeSgdRule {
  double lr;
  double weight_decay;

  template <typename acc_t>
  SgdRule<acc_t> operator()(acc_t) const {
    return SgdRule<acc_t>{static_cast<acc_t>(lr), static_cast<acc_t>(weight_decay)};
  }
};

struct MakeAdagradRule {
  double clr;  // lr / (1 + (step - 1) * lr_decay)
  double weight_decay;
  double eps;

  template <typename acc_t>
  AdagradRule<acc_t> operator()(acc_t) const {
    return AdagradRule<acc_t>{
        static_cast<acc_t>(clr), static_cast<acc_t>(weight_decay), static_cast<acc_t>(eps)};
  }
};

struct MakeAdamRule {
  double step_size;  // lr sqrt(1 - beta2^step) / (1 - beta1^step)
  double beta1;
  double beta2;
  double eps;
  double weight_decay;

  template <typename acc_t>
  AdamRule<acc_t> operator()(acc_t) const {
    return AdamRule<acc_t>{
        static_cast<acc_t>(step_size), static_cast<acc_t>(beta1), static_cast<acc_t>(beta2),
        static_cast<acc_t>(eps), static_cast<acc_t>(weight_decay)};
  }
};

inline void check_step(int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (this update's 1-based count), got ", step);
}

inline MakeAdagradRule adagrad_rule(
    double lr, double weight_decay, double eps, double lr_decay, int64_t step) {
  check_step(step);
  return MakeAdagradRule{lr / (1.0 + static_cast<double>(step - 1) * lr_decay), weight_decay, eps};
}

inline MakeAdamRule adam_rule(
    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_step(step);
  const double t = static_cast<double>(step);
  const double step_size = lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
  return MakeAdamRule{step_size, beta1, beta2, eps, weight_decay};
}

template <typename Update>
struct MbaOps {
  static void sgd(
      at::Tensor weight, const at::Tensor& ids, const at::Tensor& grad_rows,
      const at::Tensor& counts, double lr, double weight_decay) {
    Update::template run<SgdRule>(
        weight, ids, grad_rows, counts, MakeSgdRule{lr, weight_decay}, nullptr, nullptr);
  }

  static void adagrad(
      at::Tensor weight, at::Tensor state_sum, const at::Tensor& ids,
      const at::Tensor& grad_rows, const at::Tensor& counts, double lr, double weight_decay,
      double eps, double lr_decay, int64_t step) {
    check_state("state_sum", state_sum, weight);
    Update::template run<AdagradRule>(
        weight, ids, grad_rows, counts, adagrad_rule(lr, weight_decay, eps, lr_decay, step),
        &state_sum, nullptr);
  }

  static void adam(
      at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& ids,
      const at::Tensor& grad_rows, const at::Tensor& counts, double lr, double beta1,
      double beta2, double eps, double weight_decay, int64_t step) {
    check_state("exp_avg", exp_avg, weight);
    check_state("exp_avg_sq", exp_avg_sq, weight);
    Update::template run<AdamRule>(
        weight, ids, grad_rows, counts, adam_rule(lr, beta1, beta2, eps, weight_decay, step),
        &exp_avg, &exp_avg_sq);
  }
};

}  // namespace mba
}  // namespace interest_kernels
