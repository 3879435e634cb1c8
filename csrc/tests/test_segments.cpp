// Unit tests of the torch-free pieces: duplicate grouping and the per-element rules.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harness.h"
#include "mba_rules.h"
#include "mba_segments.h"

using interest_kernels::mba::AdagradRule;
using interest_kernels::mba::AdamRule;
using interest_kernels::mba::build_segments;
using interest_kernels::mba::first_out_of_range;
using interest_kernels::mba::SgdRule;

IK_TEST(segments_group_duplicates_in_position_order) {
  const std::vector<int64_t> ids = {5, 2, 5, 0, 2, 5};
  const auto seg = build_segments(ids.data(), 6, 8);
  IK_CHECK((seg.unique_ids == std::vector<int64_t>{0, 2, 5}));
  IK_CHECK((seg.starts == std::vector<int64_t>{0, 1, 3, 6}));
  IK_CHECK((seg.order == std::vector<int64_t>{3, 1, 4, 0, 2, 5}));
}

IK_TEST(segments_empty_batch) {
  const auto seg = build_segments(nullptr, 0, 10);
  IK_CHECK(seg.unique_ids.empty() && seg.order.empty());
  IK_CHECK((seg.starts == std::vector<int64_t>{0}));
}

IK_TEST(segments_match_a_stable_sort_over_many_radix_passes) {
  // 10^8 rows (27-bit ids) need three radix passes; the order must equal a stable sort by id.
  std::mt19937_64 gen(7);
  std::uniform_int_distribution<int64_t> pick(0, 99'999'999);
  std::vector<int64_t> ids(5000);
  for (auto& id : ids) id = pick(gen) % 300 * 333'331;  // many duplicates, large values
  const auto seg = build_segments(ids.data(), 5000, 100'000'000);
  for (size_t i = 1; i < seg.order.size(); ++i) {
    const int64_t a = seg.order[i - 1], b = seg.order[i];
    IK_CHECK(ids[a] < ids[b] || (ids[a] == ids[b] && a < b));
  }
  IK_CHECK(seg.starts.back() == 5000);

  for (size_t u = 0; u + 1 < seg.starts.size(); ++u) {
    for (int64_t p = seg.starts[u]; p < seg.starts[u + 1]; ++p) {
      IK_CHECK(ids[seg.order[p]] == seg.unique_ids[u]);
    }
  }
}

IK_TEST(first_out_of_range_finds_the_first_bad_id) {
  const std::vector<int64_t> ids = {1, 2, 9, -1};
  IK_CHECK(first_out_of_range(ids.data(), 4, 9) == 2);
  IK_CHECK(first_out_of_range(ids.data(), 2, 9) == -1);
  IK_CHECK(first_out_of_range(ids.data() + 3, 1, 9) == 0);
}

IK_TEST(sgd_rule_is_din_equation_7) {
  const SgdRule<double> rule{0.5, 0.2};
  double w = 2.0;
  rule(w, 1.0, rule.decay(4.0), nullptr, nullptr);
  IK_CHECK(std::abs(w - (2.0 - 0.5 * (1.0 + 0.2 * 2.0 / 4.0))) < 1e-15);
}

IK_TEST(adagrad_rule_accumulates_squares) {
  const AdagradRule<double> rule{0.1, 0.5, 1e-10};
  double w = 1.0, sum = 3.0;
  rule(w, 2.0, rule.decay(2.0), &sum, nullptr);
  const double gp = 2.0 + 0.5 * 1.0 / 2.0;
  IK_CHECK(std::abs(sum - (3.0 + gp * gp)) < 1e-15);
  IK_CHECK(std::abs(w - (1.0 - 0.1 * gp / (std::sqrt(3.0 + gp * gp) + 1e-10))) < 1e-15);
}

IK_TEST(adam_rule_updates_moments) {
  const double b1 = 0.9, b2 = 0.99, lr = 0.01;
  const double step_size = lr * std::sqrt(1 - b2) / (1 - b1);  // step 1
  const AdamRule<double> rule{step_size, b1, b2, 1e-8, 0.0};
  double w = 1.0, m = 0.0, v = 0.0;
  rule(w, 3.0, rule.decay(1.0), &m, &v);
  IK_CHECK(std::abs(m - 0.3) < 1e-15 && std::abs(v - 0.09) < 1e-15);
  // the first Adam step moves by about lr
  IK_CHECK(std::abs((1.0 - w) - lr) < 1e-8);
}

int main() { return ik_test::run_all(); }
