// Schemas of the operators in the `interest_kernels` torch.library namespace.
// Implementations: mba_cpu.cpp (CPU) and mba_cuda.cu (CUDA); fake (meta) implementations
// for torch.compile live in interest_kernels/ops/mba/op.py.
#include <torch/library.h>

TORCH_LIBRARY(interest_kernels, m) {
  // Sorted distinct ids (U,) int64 and the fp32 (fp64 for fp64 input) sums of their
  // gradient rows (U, D), duplicates added in order of position.
  m.def("dedup_rows(Tensor ids, Tensor grad_rows, int num_rows) -> (Tensor, Tensor)");
  m.def(
      "mba_sgd_update(Tensor(a!) weight, Tensor ids, Tensor grad_rows, Tensor counts, "
      "float lr, float weight_decay) -> ()");
  m.def(
      "mba_adagrad_update(Tensor(a!) weight, Tensor(b!) state_sum, Tensor ids, "
      "Tensor grad_rows, Tensor counts, float lr, float weight_decay, float eps, "
      "float lr_decay, int step) -> ()");
  m.def(
      "mba_adam_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor ids, Tensor grad_rows, Tensor counts, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step) -> ()");
}
