// Argument checks of the MBA ops, shared by the CPU and CUDA implementations.
//
// The Python wrappers (interest_kernels/ops/mba/op.py) check the same things first with
// friendlier messages; these keep direct torch.ops calls from reading or writing out of
// bounds. TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>

namespace interest_kernels {
namespace mba {

inline at::ScalarType state_dtype_for(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows_args(const at::Tensor& ids, const at::Tensor& grad_rows) {
  TORCH_CHECK_TYPE(
      ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
      "ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_TYPE(
      at::isFloatingType(grad_rows.scalar_type()),
      "grad_rows must be floating point, got ", grad_rows.scalar_type());
  TORCH_CHECK_VALUE(
      grad_rows.dim() >= 1 && grad_rows.numel() == ids.numel() * grad_rows.size(-1),
      "grad_rows must hold one row per id: ids has ", ids.numel(),
      " elements, grad_rows has shape ", grad_rows.sizes());
  TORCH_CHECK_VALUE(
      ids.device() == grad_rows.device(), "ids is on ", ids.device(),
      " but grad_rows is on ", grad_rows.device());
}

inline void check_state(const char* name, const at::Tensor& state, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(
      state.sizes() == weight.sizes(), name, " must have the weight's shape ", weight.sizes(),
      ", got ", state.sizes());
  TORCH_CHECK_TYPE(
      state.scalar_type() == state_dtype_for(weight.scalar_type()), name, " must be ",
      state_dtype_for(weight.scalar_type()), " for a ", weight.scalar_type(), " weight, got ",
      state.scalar_type());
  TORCH_CHECK_VALUE(state.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(
      state.device() == weight.device(), name, " is on ", state.device(),
      " but weight is on ", weight.device());
}

inline void check_update_args(
    const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& grad_rows,
    const at::Tensor& counts) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be (N, D), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK_TYPE(
      at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
      weight.scalar_type());
  check_rows_args(ids, grad_rows);
  TORCH_CHECK_VALUE(
      grad_rows.size(-1) == weight.size(1), "grad_rows rows have ", grad_rows.size(-1),
      " columns but the weight has D = ", weight.size(1));
  TORCH_CHECK_TYPE(
      grad_rows.scalar_type() == weight.scalar_type(), "grad_rows has dtype ",
      grad_rows.scalar_type(), " but weight has ", weight.scalar_type());
  TORCH_CHECK_VALUE(
      counts.dim() == 1 && counts.size(0) == weight.size(0),
      "counts must be (N,) with N = ", weight.size(0), ", got shape ", counts.sizes());
  TORCH_CHECK_TYPE(
      counts.scalar_type() == at::kLong || counts.scalar_type() == at::kInt ||
          counts.scalar_type() == at::kFloat || counts.scalar_type() == at::kDouble,
      "counts must be int64, int32, float32 or float64, got ", counts.scalar_type());
  for (const at::Tensor* t : {&ids, &grad_rows, &counts}) {
    TORCH_CHECK_VALUE(
        t->device() == weight.device(), "every input must be on the weight's device ",
        weight.device(), ", got one on ", t->device());
  }
}

}  // namespace mba
}  // namespace interest_kernels
