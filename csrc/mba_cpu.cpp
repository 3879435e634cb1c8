// CPU implementations of the MBA operators (SPEC section 5).
//
// `mba_*_update` apply one batch of (ids, gradient rows) with the frequencies n_j as given.
// `mba_*_step` are the MBA optimisers' whole step on one table: every lookup recorded
// since the last step (each with its own padding id), the gradient rows checked finite,
// and, counting online, each touched id's samples added to its count in the same pass.
//
// Both run in three phases: (1) check every id and (the steps) every gradient row; group
// duplicate ids deterministically (mba_segments.h); check the count of every touched row;
// nothing is written before all checks pass; (2) counting online, write the new counts;
// (3) in parallel over distinct rows, sum the row's gradient in acc_t in order of position
// and apply the optimiser rule to the row and its state. The result is the same bitwise
// for any thread count. Work and memory are proportional to the batch's ids, never to N.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mba_checks.h"
#include "mba_ops.h"
#include "mba_rules.h"
#include "mba_segments.h"

namespace interest_kernels {
namespace mba {
namespace {

// One lookup of a table: its ids (any shape; sample b is ids[b] when they have two or more
// dimensions, each id is its own sample otherwise) and their gradient rows.
struct Lookup {
  at::Tensor ids;      // (K,) int64, contiguous
  at::Tensor grad;     // (K, D) contiguous
  int64_t width;       // ids per sample
  int64_t padding_id;  // never updated nor counted; -1: none
};

Lookup make_lookup(const at::Tensor& ids, const at::Tensor& grad_rows, int64_t padding_id) {
  const int64_t k = ids.numel();
  const int64_t d = grad_rows.size(-1);
  const int64_t width = ids.dim() >= 2 && ids.size(0) > 0 ? k / ids.size(0) : 1;
  return Lookup{
      ids.reshape({-1}).to(at::kLong).contiguous(), grad_rows.reshape({k, d}).contiguous(),
      std::max<int64_t>(width, 1), padding_id};
}

// Whether every value of a row is finite: x * 0 is 0 for finite x and NaN otherwise
// (eight independent sums, so that the loop vectorises).
template <typename scalar_t>
inline bool row_is_finite(const scalar_t* row, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[8] = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<acc_t>(row[j + l]) * acc_t(0);
  }
  acc_t zero = 0;
  for (; j < d; ++j) zero += static_cast<acc_t>(row[j]) * acc_t(0);
  for (int l = 0; l < 8; ++l) zero += lanes[l];
  return zero == acc_t(0);
}

// The rows a step touches: the lookups' non-padding positions in order, grouped by id,
// and each distinct id's n_j.
template <typename scalar_t>
struct Rows {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> ids;           // (K,)
  std::vector<const scalar_t*> grad;  // (K,) each position's gradient row
  std::vector<int64_t> sample;        // (K,) each position's sample over all lookups
  Segments seg;                       // over the positions above
  std::vector<acc_t> n;               // (U,) n_j of each distinct id
};

// The calling thread's Rows, kept from call to call (about five words per id of the
// largest step, held until the thread exits): freeing them at the end of each call let
// the allocator hand the top of its heap back to the system, and the next large tensor
// (the next backward's gradient) faulted its pages in again.
template <typename scalar_t>
Rows<scalar_t>& scratch_rows() {
  static thread_local Rows<scalar_t> rows;
  return rows;
}

template <typename scalar_t>
void collect_rows(
    const std::vector<Lookup>& lookups, int64_t num_rows, bool check_finite, bool with_samples,
    Rows<scalar_t>& r) {
  int64_t total = 0;
  for (const Lookup& l : lookups) {
    const int64_t* p = l.ids.data_ptr<int64_t>();
    const int64_t bad = first_out_of_range(p, l.ids.numel(), num_rows);
    TORCH_CHECK_VALUE(
        bad < 0, "ids: id ", bad < 0 ? 0 : p[bad], " (at position ", total + bad,
        ") is outside the table's rows [0, ", num_rows, "); nothing was written");
    total += l.ids.numel();
  }
  r.ids.resize(static_cast<size_t>(total));
  r.grad.resize(static_cast<size_t>(total));
  if (with_samples) r.sample.resize(static_cast<size_t>(total));
  int64_t kept = 0, position = 0, sample = 0;
  for (const Lookup& l : lookups) {
    const int64_t* p = l.ids.data_ptr<int64_t>();
    const scalar_t* g = l.grad.data_ptr<scalar_t>();
    const int64_t d = l.grad.size(1);
    const int64_t k = l.ids.numel();
    for (int64_t i = 0; check_finite && i < k; ++i) {
      TORCH_CHECK_VALUE(
          p[i] == l.padding_id || row_is_finite(g + i * d, d), "grad_rows: the gradient row of id ",
          p[i], " (at position ", position + i, ") holds NaN or Inf; nothing was written (skip "
          "the step, e.g. with a gradient scaler, or find where the loss overflowed)");
    }
    // Every position is written at `kept`, which moves on only past non-padding ones.
    for (int64_t first = 0; first < k; first += l.width, ++sample) {
      const int64_t stop = std::min(first + l.width, k);
      for (int64_t i = first; i < stop; ++i) {
        r.ids[kept] = p[i];
        r.grad[kept] = g + i * d;
        if (with_samples) r.sample[kept] = sample;
        kept += p[i] != l.padding_id;
      }
    }
    position += k;
  }
  r.ids.resize(static_cast<size_t>(kept));
  r.grad.resize(static_cast<size_t>(kept));
  if (with_samples) r.sample.resize(static_cast<size_t>(kept));
  build_segments(r.ids.data(), static_cast<int64_t>(r.ids.size()), num_rows, r.seg);
}

// The touched rows are scattered over a table far larger than the caches: each row's
// update waits on memory unless its lines are requested some rows ahead.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t d, bool for_write) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) {
      __builtin_prefetch(p + off, 1, 3);
    } else {
      __builtin_prefetch(p + off, 0, 3);
    }
  }
}

// Each distinct id's n_j (into r.n): its count, plus (counting online) its samples in
// this step. Every n_j is checked positive first; only then, counting online, are the new
// counts written (the last check of a step has passed: nothing after this can refuse it).
template <typename count_t, typename scalar_t>
void touched_counts(count_t* counts, Rows<scalar_t>& r, bool count_online) {
  // The counts are read at scattered addresses, one line each: many requests in flight.
  constexpr int64_t kPrefetchCounts = 32;
  const Segments& seg = r.seg;
  const int64_t num_unique = static_cast<int64_t>(seg.unique_ids.size());
  static thread_local std::vector<count_t> c;  // reused, as scratch_rows
  c.resize(static_cast<size_t>(num_unique));
  for (int64_t u = 0; u < num_unique; ++u) {
    if (u + kPrefetchCounts < num_unique) __builtin_prefetch(counts + seg.unique_ids[u + kPrefetchCounts]);
    c[u] = counts[seg.unique_ids[u]];
  }
  if (count_online) {
    // Positions are in order within a segment, and so are their samples.
    for (int64_t u = 0; u < num_unique; ++u) {
      int64_t samples = 0, last = -1;
      for (int64_t p = seg.starts[u]; p < seg.starts[u + 1]; ++p) {
        const int64_t s = r.sample[seg.order[p]];
        samples += s != last;
        last = s;
      }
      if constexpr (std::is_integral_v<count_t>) {
        TORCH_CHECK_VALUE(c[u] <= std::numeric_limits<count_t>::max() - samples, "counts: id ",
                          seg.unique_ids[u], " has count ", c[u], "; adding this step's ", samples,
                          " samples overflows the counts' dtype; nothing was written");
      }
      c[u] = static_cast<count_t>(c[u] + samples);
    }
  }
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t>& n = r.n;
  n.resize(static_cast<size_t>(num_unique));
  for (int64_t u = 0; u < num_unique; ++u) {
    n[u] = static_cast<acc_t>(c[u]);
    TORCH_CHECK_VALUE(
        n[u] > acc_t(0), "counts: id ", seg.unique_ids[u], " is in the batch but its count is ",
        c[u], "; MBA needs n_j >= 1 for every touched id; nothing was written");
  }
  if (count_online) {
    for (int64_t u = 0; u < num_unique; ++u) counts[seg.unique_ids[u]] = c[u];
  }
}

template <typename scalar_t, typename acc_t, typename Rule>
void apply_rule(
    at::Tensor& weight, const Rows<scalar_t>& r, const Rule& rule, at::Tensor* state0,
    at::Tensor* state1) {
  const int64_t d = weight.size(1);
  const Segments& seg = r.seg;
  const int64_t num_unique = static_cast<int64_t>(seg.unique_ids.size());
  scalar_t* w = weight.data_ptr<scalar_t>();
  acc_t* s0 = state0 ? state0->data_ptr<acc_t>() : nullptr;
  acc_t* s1 = state1 ? state1->data_ptr<acc_t>() : nullptr;
  // Rows are short (D ~ 8..256): a chunk of ~256k elements keeps small batches on one
  // thread, where waking the pool would cost more than the update itself.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(d, 1));
  at::parallel_for(0, num_unique, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(d));
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) {
        const int64_t ahead = seg.unique_ids[u + kPrefetchRows] * d;
        prefetch_row(w + ahead, d, true);
        if (s0 != nullptr) prefetch_row(s0 + ahead, d, true);
        if (s1 != nullptr) prefetch_row(s1 + ahead, d, true);
        prefetch_row(r.grad[seg.order[seg.starts[u + kPrefetchRows]]], d, false);
      }
      // The row's gradient: its one row as it is (most ids occur once), else the sum in
      // order of position.
      const acc_t* g = nullptr;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (seg.starts[u + 1] - seg.starts[u] == 1) g = r.grad[seg.order[seg.starts[u]]];
      }
      if (g == nullptr) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t p = seg.starts[u]; p < seg.starts[u + 1]; ++p) {
          const scalar_t* row = r.grad[seg.order[p]];
          for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<acc_t>(row[j]);
        }
        g = acc.data();
      }
      const int64_t off = seg.unique_ids[u] * d;
      const acc_t decay = rule.decay(r.n[u]);
      if (s1 != nullptr) {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], g[j], decay, s0 + off + j, s1 + off + j);
      } else if (s0 != nullptr) {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], g[j], decay, s0 + off + j, nullptr);
      } else {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], g[j], decay, nullptr, nullptr);
      }
    }
  });
}

// Checks, groups and applies one step's lookups to `weight` with the rule `make_rule` makes.
template <template <typename> class RuleT, typename MakeRule>
void run_update(
    at::Tensor& weight, at::Tensor& counts, const std::vector<Lookup>& lookups,
    bool count_online, bool check_finite, const MakeRule& make_rule, at::Tensor* state0,
    at::Tensor* state1) {
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "the CPU kernel got tensors on ", weight.device());
  TORCH_CHECK_VALUE(counts.is_contiguous(), "counts must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_update_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Rows<scalar_t>& r = scratch_rows<scalar_t>();
        collect_rows<scalar_t>(lookups, weight.size(0), check_finite, count_online, r);
        const RuleT<acc_t> rule = make_rule(acc_t(0));
        // The rows' n_j from counts of any of the four count dtypes.
        const auto update = [&](auto* c) {
          touched_counts(c, r, count_online);
          apply_rule<scalar_t, acc_t>(weight, r, rule, state0, state1);
        };
        AT_DISPATCH_SWITCH(
            counts.scalar_type(), "mba_update_cpu_counts",
            AT_DISPATCH_CASE(at::kLong, [&] { update(counts.data_ptr<scalar_t>()); })
            AT_DISPATCH_CASE(at::kInt, [&] { update(counts.data_ptr<scalar_t>()); })
            AT_DISPATCH_CASE(at::kFloat, [&] { update(counts.data_ptr<scalar_t>()); })
            AT_DISPATCH_CASE(at::kDouble, [&] { update(counts.data_ptr<scalar_t>()); }));
      });
}

// The device half of MbaOps (mba_ops.h): one batch, frequencies as given, no row check
// (the Python op checks finiteness first).
struct CpuUpdate {
  template <template <typename> class RuleT, typename MakeRule>
  static void run(
      at::Tensor& weight, const at::Tensor& ids, const at::Tensor& grad_rows,
      const at::Tensor& counts, const MakeRule& make_rule, at::Tensor* state0,
      at::Tensor* state1) {
    check_update_args(weight, ids, grad_rows, counts);
    at::Tensor read_only_counts = counts.contiguous();
    run_update<RuleT>(
        weight, read_only_counts, {make_lookup(ids, grad_rows, -1)}, /*count_online=*/false,
        /*check_finite=*/false, make_rule, state0, state1);
  }
};

// The optimisers' step: `ids[l]`, `grad_rows[l]` and `padding_ids[l]` (-1: none) for each
// lookup l of the table since the last step, in the order they were recorded.
struct CpuStep {
  template <template <typename> class RuleT, typename MakeRule>
  static void run(
      at::Tensor& weight, at::Tensor& counts, at::TensorList ids, at::TensorList grad_rows,
      at::IntArrayRef padding_ids, bool count_online, bool check_finite,
      const MakeRule& make_rule, at::Tensor* state0, at::Tensor* state1) {
    TORCH_CHECK_VALUE(
        grad_rows.size() == ids.size() && padding_ids.size() == ids.size(),
        "ids, grad_rows and padding_ids must have one entry per lookup, got ", ids.size(), ", ",
        grad_rows.size(), " and ", padding_ids.size());
    std::vector<Lookup> lookups;
    lookups.reserve(ids.size());
    for (size_t l = 0; l < ids.size(); ++l) {
      check_update_args(weight, ids[l], grad_rows[l], counts);
      lookups.push_back(make_lookup(ids[l], grad_rows[l], padding_ids[l]));
    }
    run_update<RuleT>(
        weight, counts, lookups, count_online, check_finite, make_rule, state0, state1);
  }

  static void sgd(
      at::Tensor weight, at::Tensor counts, at::TensorList ids, at::TensorList grad_rows,
      at::IntArrayRef padding_ids, bool count_online, bool check_finite, double lr,
      double weight_decay) {
    run<SgdRule>(
        weight, counts, ids, grad_rows, padding_ids, count_online, check_finite,
        MakeSgdRule{lr, weight_decay}, nullptr, nullptr);
  }

  static void adagrad(
      at::Tensor weight, at::Tensor state_sum, at::Tensor counts, at::TensorList ids,
      at::TensorList grad_rows, at::IntArrayRef padding_ids, bool count_online,
      bool check_finite, double lr, double weight_decay, double eps, double lr_decay,
      int64_t step) {
    check_state("state_sum", state_sum, weight);
    run<AdagradRule>(
        weight, counts, ids, grad_rows, padding_ids, count_online, check_finite,
        adagrad_rule(lr, weight_decay, eps, lr_decay, step), &state_sum, nullptr);
  }

  static void adam(
      at::Tensor weight, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor counts,
      at::TensorList ids, at::TensorList grad_rows, at::IntArrayRef padding_ids,
      bool count_online, bool check_finite, double lr, double beta1, double beta2, double eps,
      double weight_decay, int64_t step) {
    check_state("exp_avg", exp_avg, weight);
    check_state("exp_avg_sq", exp_avg_sq, weight);
    run<AdamRule>(
        weight, counts, ids, grad_rows, padding_ids, count_online, check_finite,
        adam_rule(lr, beta1, beta2, eps, weight_decay, step), &exp_avg, &exp_avg_sq);
  }
};

std::tuple<at::Tensor, at::Tensor> dedup_rows_cpu(
    const at::Tensor& ids, const at::Tensor& grad_rows, int64_t num_rows) {
  check_rows_args(ids, grad_rows);
  const int64_t d = grad_rows.size(-1);
  at::Tensor unique_ids, summed;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "dedup_rows_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Rows<scalar_t>& r = scratch_rows<scalar_t>();
        collect_rows<scalar_t>(
            {make_lookup(ids, grad_rows, -1)}, num_rows, /*check_finite=*/false,
            /*with_samples=*/false, r);
        const Segments& seg = r.seg;
        const int64_t num_unique = static_cast<int64_t>(seg.unique_ids.size());
        unique_ids = at::empty({num_unique}, ids.options().dtype(at::kLong));
        std::copy(seg.unique_ids.begin(), seg.unique_ids.end(), unique_ids.data_ptr<int64_t>());
        summed = at::zeros(
            {num_unique, d}, grad_rows.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        acc_t* out = summed.data_ptr<acc_t>();
        const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(d, 1));
        at::parallel_for(0, num_unique, grain, [&](int64_t begin, int64_t end) {
          for (int64_t u = begin; u < end; ++u) {
            for (int64_t p = seg.starts[u]; p < seg.starts[u + 1]; ++p) {
              const scalar_t* row = r.grad[seg.order[p]];
              for (int64_t j = 0; j < d; ++j) out[u * d + j] += static_cast<acc_t>(row[j]);
            }
          }
        });
      });
  return {unique_ids, summed};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // The MBA optimisers' step on one table (CPU only): ids[l], grad_rows[l] (ids[l].shape +
  // (D,) or (ids[l].numel(), D)) and padding_ids[l] (-1: none) for each lookup l since the
  // last step. count_online adds each touched id's samples to counts first (an id counts
  // once per sample ids[l][b] when ids[l] has two or more dimensions; each element of a
  // 1-D ids[l] is a sample of its own); check_finite refuses non-finite gradient rows. Nothing is written when
  // any check fails.
  m.def(
      "mba_sgd_step(Tensor(a!) weight, Tensor(b!) counts, Tensor[] ids, Tensor[] grad_rows, "
      "int[] padding_ids, bool count_online, bool check_finite, float lr, "
      "float weight_decay) -> ()");
  m.def(
      "mba_adagrad_step(Tensor(a!) weight, Tensor(b!) state_sum, Tensor(c!) counts, "
      "Tensor[] ids, Tensor[] grad_rows, int[] padding_ids, bool count_online, "
      "bool check_finite, float lr, float weight_decay, float eps, float lr_decay, "
      "int step) -> ()");
  m.def(
      "mba_adam_step(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) counts, Tensor[] ids, Tensor[] grad_rows, int[] padding_ids, "
      "bool count_online, bool check_finite, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("dedup_rows", &dedup_rows_cpu);
  m.impl("mba_sgd_update", &MbaOps<CpuUpdate>::sgd);
  m.impl("mba_adagrad_update", &MbaOps<CpuUpdate>::adagrad);
  m.impl("mba_adam_update", &MbaOps<CpuUpdate>::adam);
  m.impl("mba_sgd_step", &CpuStep::sgd);
  m.impl("mba_adagrad_step", &CpuStep::adagrad);
  m.impl("mba_adam_step", &CpuStep::adam);
}

}  // namespace mba
}  // namespace interest_kernels
