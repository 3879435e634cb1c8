// Unit tests of the registered operators, called through the dispatcher as Python does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "harness.h"

namespace {

c10::Stack call(const char* name, c10::Stack stack) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack;
}

// DIN eq. 7 on a copy, row by row in double.
at::Tensor naive_sgd(
    const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& rows,
    const at::Tensor& counts, double lr, double lambda) {
  at::Tensor w = weight.to(at::kDouble).clone();
  std::map<int64_t, at::Tensor> g;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int64_t j = ids[i].item<int64_t>();
    const at::Tensor r = rows[i].to(at::kDouble);
    g[j] = g.count(j) ? g[j] + r : r;
  }
  for (const auto& [j, gj] : g) {
    const double n = counts[j].item<double>();
    w[j] = w[j] - lr * (gj + lambda * w[j] / n);
  }
  return w;
}

}  // namespace

IK_TEST(sgd_update_matches_the_equation_and_leaves_other_rows) {
  at::manual_seed(0);
  const at::Tensor weight = at::randn({50, 7});
  const at::Tensor ids = at::randint(0, 10, {40}, at::kLong);
  const at::Tensor rows = at::randn({40, 7});
  const at::Tensor counts = at::randint(1, 6, {50}, at::kLong);
  const at::Tensor want = naive_sgd(weight, ids, rows, counts, 0.3, 0.7);
  at::Tensor w = weight.clone();
  call("interest_kernels::mba_sgd_update", {w, ids, rows, counts, 0.3, 0.7});
  IK_CHECK(at::allclose(w.to(at::kDouble), want, 1e-5, 1e-6));
  IK_CHECK(at::equal(w.narrow(0, 10, 40), weight.narrow(0, 10, 40)));
}

IK_TEST(updates_are_deterministic) {
  at::manual_seed(1);
  const at::Tensor ids = at::randint(0, 3, {20000}, at::kLong);
  const at::Tensor rows = at::randn({20000, 16}) * 1000;
  const at::Tensor counts = at::ones({3}, at::kLong);
  at::Tensor a = at::zeros({3, 16}), b = at::zeros({3, 16});
  call("interest_kernels::mba_sgd_update", {a, ids, rows, counts, 1.0, 0.0});
  call("interest_kernels::mba_sgd_update", {b, ids, rows, counts, 1.0, 0.0});
  IK_CHECK(at::equal(a, b));
}

IK_TEST(half_and_bfloat16_tables_keep_float32_state) {
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor weight = at::randn({20, 8}).to(dtype);
    const at::Tensor ids = at::tensor(std::vector<int64_t>{3, 3, 5});
    const at::Tensor rows = at::randn({3, 8}).to(dtype);
    const at::Tensor counts = at::full({20}, 2, at::kLong);
    at::Tensor w = weight.clone(), m = at::zeros({20, 8}), v = at::zeros({20, 8});
    call("interest_kernels::mba_adam_update",
         {w, m, v, ids, rows, counts, 0.01, 0.9, 0.999, 1e-8, 0.5, int64_t(1)});
    IK_CHECK(w.scalar_type() == dtype);
    IK_CHECK(m[3].abs().sum().item<float>() > 0 && m[4].abs().sum().item<float>() == 0);
    IK_CHECK(at::equal(w[4], weight[4]));
    // a first Adam step moves each touched element by about lr
    const float moved = (w[5].to(at::kFloat) - weight[5].to(at::kFloat)).abs().max().item<float>();
    IK_CHECK(moved > 0.005f && moved < 0.02f);
    IK_CHECK_THROWS(
        c10::Error,
        call("interest_kernels::mba_adam_update",
             {w, m.to(dtype), v, ids, rows, counts, 0.01, 0.9, 0.999, 1e-8, 0.5, int64_t(1)}),
        "exp_avg must be Float");
  }
}

IK_TEST(out_of_range_id_is_named_and_nothing_is_written) {
  const at::Tensor weight = at::randn({10, 4});
  const at::Tensor rows = at::randn({3, 4});
  const at::Tensor counts = at::ones({10}, at::kLong);
  at::Tensor w = weight.clone(), sum = at::zeros({10, 4});
  for (int64_t bad : {10, -2, 123456}) {
    const at::Tensor ids = at::tensor(std::vector<int64_t>{1, bad, 2});
    IK_CHECK_THROWS(
        c10::ValueError,
        call("interest_kernels::mba_adagrad_update",
             {w, sum, ids, rows, counts, 0.1, 0.1, 1e-10, 0.0, int64_t(1)}),
        "id " + std::to_string(bad));
  }
  IK_CHECK(at::equal(w, weight) && at::equal(sum, at::zeros({10, 4})));
}

IK_TEST(zero_count_of_touched_id_is_named_and_nothing_is_written) {
  const at::Tensor weight = at::randn({10, 4});
  at::Tensor counts = at::ones({10}, at::kInt);
  counts[6] = 0;
  at::Tensor w = weight.clone();
  IK_CHECK_THROWS(
      c10::ValueError,
      call("interest_kernels::mba_sgd_update",
           {w, at::tensor(std::vector<int64_t>{1, 6}), at::randn({2, 4}), counts, 0.1, 0.1}),
      "id 6");
  IK_CHECK(at::equal(w, weight));
}

IK_TEST(dedup_rows_returns_sorted_ids_and_sums) {
  const at::Tensor ids = at::tensor(std::vector<int64_t>{4, 1, 4, 4});
  const at::Tensor rows = at::arange(8, at::kFloat).reshape({4, 2});
  const auto out = call("interest_kernels::dedup_rows", {ids, rows, int64_t(5)});
  const at::Tensor unique_ids = out[0].toTensor(), summed = out[1].toTensor();
  IK_CHECK(at::equal(unique_ids, at::tensor(std::vector<int64_t>{1, 4})));
  IK_CHECK(at::equal(summed, at::tensor(std::vector<float>{2, 3, 0 + 4 + 6, 1 + 5 + 7}).reshape({2, 2})));
}

int main() { return ik_test::run_all(); }
