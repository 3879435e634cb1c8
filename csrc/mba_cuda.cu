// CUDA implementations of the MBA operators (SPEC section 5).
//
// Same three phases as the CPU kernels: ids are sorted stably on the device (at::sort),
// cut into segments of equal ids, and both checks (ids in range, counts of touched rows
// positive) are read back to the host, two scalars each, before any write. One block
// per distinct row then sums the row's gradient in acc_t, in order of position (no
// atomics, so the result is deterministic), and applies the rule of mba_rules.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "mba_checks.h"
#include "mba_ops.h"
#include "mba_rules.h"

namespace interest_kernels {
namespace mba {
namespace {

struct DeviceSegments {
  at::Tensor unique_ids;  // (U,) int64 ascending
  at::Tensor starts;      // (U + 1,) int64
  at::Tensor order;       // (K,) int64 positions sorted by (id, position)
  int64_t num_unique = 0;
};

// Sorts and checks the ids; when `counts` is given, also gathers n_j (as acc dtype) and
// checks it positive. Throws before anything is written.
DeviceSegments group_ids(
    const at::Tensor& ids, int64_t num_rows, const at::Tensor* counts, at::ScalarType acc_dtype,
    at::Tensor* n_out) {
  DeviceSegments s;
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong);
  const int64_t k = flat.numel();
  if (k == 0) {
    s.unique_ids = at::empty({0}, flat.options());
    s.starts = at::zeros({1}, flat.options());
    s.order = at::empty({0}, flat.options());
    if (n_out) *n_out = at::empty({0}, flat.options().dtype(acc_dtype));
    return s;
  }
  at::Tensor sorted;
  std::tie(sorted, s.order) = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor ends = at::stack({sorted[0], sorted[k - 1]}).cpu();
  const int64_t lo = ends[0].item<int64_t>(), hi = ends[1].item<int64_t>();
  TORCH_CHECK_VALUE(
      lo >= 0 && hi < num_rows, "ids: id ", lo < 0 ? lo : hi, " is outside the table's rows [0, ",
      num_rows, "); nothing was written");
  at::Tensor seg_counts;
  std::tie(s.unique_ids, std::ignore, seg_counts) =
      at::unique_consecutive(sorted, /*return_inverse=*/false, /*return_counts=*/true, 0);
  s.num_unique = s.unique_ids.numel();
  s.starts = at::zeros({s.num_unique + 1}, flat.options());
  s.starts.narrow(0, 1, s.num_unique).copy_(seg_counts.cumsum(0));
  if (counts != nullptr) {
    at::Tensor n = counts->index_select(0, s.unique_ids).to(acc_dtype);
    const at::Tensor bad = n <= 0;
    if (bad.any().item<bool>()) {
      const int64_t id = s.unique_ids.masked_select(bad)[0].item<int64_t>();
      TORCH_CHECK_VALUE(
          false, "counts: id ", id,
          " is in the batch but its count is not positive; MBA needs n_j >= 1 for every "
          "touched id; nothing was written");
    }
    *n_out = n;
  }
  return s;
}

template <typename scalar_t, typename acc_t, typename Rule>
__global__ void segment_update_kernel(
    scalar_t* __restrict__ weight, const scalar_t* __restrict__ grad,
    const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
    const int64_t* __restrict__ unique_ids, const acc_t* __restrict__ n, int64_t num_unique,
    int64_t d, Rule rule, acc_t* __restrict__ state0, acc_t* __restrict__ state1) {
  for (int64_t u = blockIdx.x; u < num_unique; u += gridDim.x) {
    const int64_t begin = starts[u], end = starts[u + 1];
    const int64_t row = unique_ids[u];
    const acc_t decay = rule.decay(n[u]);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      acc_t g = acc_t(0);
      for (int64_t p = begin; p < end; ++p) g += static_cast<acc_t>(grad[order[p] * d + j]);
      const int64_t off = row * d + j;
      rule(
          weight[off], g, decay, state0 ? state0 + off : nullptr, state1 ? state1 + off : nullptr);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_sum_kernel(
    acc_t* __restrict__ out, const scalar_t* __restrict__ grad, const int64_t* __restrict__ order,
    const int64_t* __restrict__ starts, int64_t num_unique, int64_t d) {
  for (int64_t u = blockIdx.x; u < num_unique; u += gridDim.x) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      acc_t g = acc_t(0);
      for (int64_t p = starts[u]; p < starts[u + 1]; ++p) {
        g += static_cast<acc_t>(grad[order[p] * d + j]);
      }
      out[u * d + j] = g;
    }
  }
}

void launch_shape(int64_t num_unique, int64_t d, dim3* grid, dim3* block) {
  const int64_t threads = std::min<int64_t>(256, std::max<int64_t>(32, (d + 31) / 32 * 32));
  *block = dim3(static_cast<unsigned>(threads));
  *grid = dim3(static_cast<unsigned>(std::min<int64_t>(num_unique, 65535 * 8)));
}

// The device half of MbaOps (mba_ops.h).
struct CudaUpdate {
  template <template <typename> class RuleT, typename MakeRule>
  static void run(
      at::Tensor& weight, const at::Tensor& ids, const at::Tensor& grad_rows,
      const at::Tensor& counts, const MakeRule& make_rule, at::Tensor* state0,
      at::Tensor* state1) {
    check_update_args(weight, ids, grad_rows, counts);
    TORCH_CHECK_VALUE(weight.is_cuda(), "the CUDA kernel got tensors on ", weight.device());
    const c10::cuda::CUDAGuard guard(weight.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "mba_update_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          at::Tensor n;
          const DeviceSegments s = group_ids(
              ids, weight.size(0), &counts, c10::CppTypeToScalarType<acc_t>::value, &n);
          if (s.num_unique == 0) return;
          const int64_t d = weight.size(1);
          const at::Tensor grad = grad_rows.reshape({-1, d}).contiguous();
          const RuleT<acc_t> rule = make_rule(acc_t(0));
          dim3 grid, block;
          launch_shape(s.num_unique, d, &grid, &block);
          segment_update_kernel<scalar_t, acc_t, RuleT<acc_t>>
              <<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  weight.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                  s.order.data_ptr<int64_t>(), s.starts.data_ptr<int64_t>(),
                  s.unique_ids.data_ptr<int64_t>(), n.data_ptr<acc_t>(), s.num_unique, d, rule,
                  state0 ? state0->data_ptr<acc_t>() : nullptr,
                  state1 ? state1->data_ptr<acc_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
};

std::tuple<at::Tensor, at::Tensor> dedup_rows_cuda(
    const at::Tensor& ids, const at::Tensor& grad_rows, int64_t num_rows) {
  check_rows_args(ids, grad_rows);
  const c10::cuda::CUDAGuard guard(grad_rows.device());
  const int64_t d = grad_rows.size(-1);
  at::Tensor summed;
  DeviceSegments s;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "dedup_rows_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        s = group_ids(ids, num_rows, nullptr, c10::CppTypeToScalarType<acc_t>::value, nullptr);
        summed = at::empty(
            {s.num_unique, d}, grad_rows.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        if (s.num_unique == 0 || d == 0) return;
        const at::Tensor grad = grad_rows.reshape({-1, d}).contiguous();
        dim3 grid, block;
        launch_shape(s.num_unique, d, &grid, &block);
        segment_sum_kernel<scalar_t, acc_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
            summed.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), s.order.data_ptr<int64_t>(),
            s.starts.data_ptr<int64_t>(), s.num_unique, d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {s.unique_ids, summed};
}

}  // namespace

TORCH_LIBRARY_IMPL(interest_kernels, CUDA, m) {
  m.impl("dedup_rows", &dedup_rows_cuda);
  m.impl("mba_sgd_update", &MbaOps<CudaUpdate>::sgd);
  m.impl("mba_adagrad_update", &MbaOps<CudaUpdate>::adagrad);
  m.impl("mba_adam_update", &MbaOps<CudaUpdate>::adam);
}

}  // namespace mba
}  // namespace interest_kernels
