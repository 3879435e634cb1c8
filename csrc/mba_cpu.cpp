// CPU implementations of the MBA operators (SPEC section 5).
//
// Every update runs in three phases: (1) check every id and the count of every touched
// row, raising before anything is written; (2) group duplicate ids deterministically
// (mba_segments.h); (3) in parallel over distinct rows, sum the row's gradient in acc_t
// in order of position and apply the optimiser rule to the row and its state. Work and
// memory are proportional to the batch's ids, never to the table's N.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "mba_checks.h"
#include "mba_ops.h"
#include "mba_rules.h"
#include "mba_segments.h"

namespace interest_kernels {
namespace mba {
namespace {

struct Batch {
  at::Tensor ids;   // (K,) int64, contiguous
  at::Tensor grad;  // (K, D) contiguous
  Segments seg;
};

Batch group_batch(const at::Tensor& ids, const at::Tensor& grad_rows, int64_t num_rows) {
  Batch b;
  b.ids = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t k = b.ids.numel();
  const int64_t d = grad_rows.size(-1);
  b.grad = grad_rows.reshape({k, d}).contiguous();
  const int64_t* p = b.ids.data_ptr<int64_t>();
  const int64_t bad = first_out_of_range(p, k, num_rows);
  TORCH_CHECK_VALUE(
      bad < 0, "ids: id ", bad < 0 ? 0 : p[bad], " (at position ", bad,
      ") is outside the table's rows [0, ", num_rows, "); nothing was written");
  b.seg = build_segments(p, k, num_rows);
  return b;
}

// n_j of each distinct id, checked positive before any write.
template <typename acc_t>
std::vector<acc_t> gather_counts(const at::Tensor& counts, const Segments& seg) {
  const at::Tensor c = counts.contiguous();
  std::vector<acc_t> n(seg.unique_ids.size());
  AT_DISPATCH_SWITCH(
      c.scalar_type(), "mba_gather_counts",
      AT_DISPATCH_CASE(at::kLong, [&] {
        const auto* src = c.data_ptr<scalar_t>();
        for (size_t u = 0; u < n.size(); ++u) n[u] = static_cast<acc_t>(src[seg.unique_ids[u]]);
      }) AT_DISPATCH_CASE(at::kInt, [&] {
        const auto* src = c.data_ptr<scalar_t>();
        for (size_t u = 0; u < n.size(); ++u) n[u] = static_cast<acc_t>(src[seg.unique_ids[u]]);
      }) AT_DISPATCH_CASE(at::kFloat, [&] {
        const auto* src = c.data_ptr<scalar_t>();
        for (size_t u = 0; u < n.size(); ++u) n[u] = static_cast<acc_t>(src[seg.unique_ids[u]]);
      }) AT_DISPATCH_CASE(at::kDouble, [&] {
        const auto* src = c.data_ptr<scalar_t>();
        for (size_t u = 0; u < n.size(); ++u) n[u] = static_cast<acc_t>(src[seg.unique_ids[u]]);
      }));
  for (size_t u = 0; u < n.size(); ++u) {
    TORCH_CHECK_VALUE(
        n[u] > acc_t(0), "counts: id ", seg.unique_ids[u], " is in the batch but its count is ",
        n[u], "; MBA needs n_j >= 1 for every touched id; nothing was written");
  }
  return n;
}

// The touched rows are scattered over a table far larger than the caches: each row's
// update waits on memory unless its lines are requested a few rows ahead.
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

template <typename scalar_t, typename acc_t, typename Rule>
void apply_rule(
    at::Tensor& weight, const Batch& b, const std::vector<acc_t>& n, const Rule& rule,
    at::Tensor* state0, at::Tensor* state1) {
  const int64_t d = weight.size(1);
  const int64_t num_unique = static_cast<int64_t>(b.seg.unique_ids.size());
  scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* g = b.grad.data_ptr<scalar_t>();
  acc_t* s0 = state0 ? state0->data_ptr<acc_t>() : nullptr;
  acc_t* s1 = state1 ? state1->data_ptr<acc_t>() : nullptr;
  // Rows are short (D ~ 8..256): a chunk of ~256k elements keeps small batches on one
  // thread, where waking the pool would cost more than the update itself.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(d, 1));
  at::parallel_for(0, num_unique, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(d));
    for (int64_t u = begin; u < end; ++u) {
      if (u + kPrefetchRows < end) {
        const int64_t ahead = b.seg.unique_ids[u + kPrefetchRows] * d;
        prefetch_row(w + ahead, d, true);
        if (s0 != nullptr) prefetch_row(s0 + ahead, d, true);
        if (s1 != nullptr) prefetch_row(s1 + ahead, d, true);
        prefetch_row(g + b.seg.order[b.seg.starts[u + kPrefetchRows]] * d, d, false);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = b.seg.starts[u]; p < b.seg.starts[u + 1]; ++p) {
        const scalar_t* row = g + b.seg.order[p] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<acc_t>(row[j]);
      }
      const int64_t off = b.seg.unique_ids[u] * d;
      const acc_t decay = rule.decay(n[u]);
      if (s1 != nullptr) {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], acc[j], decay, s0 + off + j, s1 + off + j);
      } else if (s0 != nullptr) {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], acc[j], decay, s0 + off + j, nullptr);
      } else {
        for (int64_t j = 0; j < d; ++j) rule(w[off + j], acc[j], decay, nullptr, nullptr);
      }
    }
  });
}

// The device half of MbaOps (mba_ops.h).
struct CpuUpdate {
  template <template <typename> class RuleT, typename MakeRule>
  static void run(
      at::Tensor& weight, const at::Tensor& ids, const at::Tensor& grad_rows,
      const at::Tensor& counts, const MakeRule& make_rule, at::Tensor* state0,
      at::Tensor* state1) {
    check_update_args(weight, ids, grad_rows, counts);
    TORCH_CHECK_VALUE(weight.device().is_cpu(), "the CPU kernel got tensors on ", weight.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_update_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const Batch b = group_batch(ids, grad_rows, weight.size(0));
          const std::vector<acc_t> n = gather_counts<acc_t>(counts, b.seg);
          const RuleT<acc_t> rule = make_rule(acc_t(0));
          apply_rule<scalar_t, acc_t>(weight, b, n, rule, state0, state1);
        });
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
        const Batch b = group_batch(ids, grad_rows, num_rows);
        const int64_t num_unique = static_cast<int64_t>(b.seg.unique_ids.size());
        unique_ids = at::empty({num_unique}, ids.options().dtype(at::kLong));
        std::copy(
            b.seg.unique_ids.begin(), b.seg.unique_ids.end(), unique_ids.data_ptr<int64_t>());
        summed = at::zeros({num_unique, d}, grad_rows.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        acc_t* out = summed.data_ptr<acc_t>();
        const scalar_t* g = b.grad.data_ptr<scalar_t>();
        const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(d, 1));
        at::parallel_for(0, num_unique, grain, [&](int64_t begin, int64_t end) {
          for (int64_t u = begin; u < end; ++u) {
            for (int64_t p = b.seg.starts[u]; p < b.seg.starts[u + 1]; ++p) {
              const scalar_t* row = g + b.seg.order[p] * d;
              for (int64_t j = 0; j < d; ++j) out[u * d + j] += static_cast<acc_t>(row[j]);
            }
          }
        });
      });
  return {unique_ids, summed};
}

}  // namespace

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("dedup_rows", &dedup_rows_cpu);
  m.impl("mba_sgd_update", &MbaOps<CpuUpdate>::sgd);
  m.impl("mba_adagrad_update", &MbaOps<CpuUpdate>::adagrad);
  m.impl("mba_adam_update", &MbaOps<CpuUpdate>::adam);
}

}  // namespace mba
}  // namespace interest_kernels
