// target_attention_cpu with `Tensor[]? act_params`, for AOTInductor packages.
//
// AOTInductor's proxy executor (torch 2.13) hands an empty `Tensor[]` argument of an
// operator over as None, which aborts the call; the fused target attention's act_params
// is empty for the sigmoid, relu and identity activations. interest_kernels.export
// rewrites such calls in a package's graph to this operator with act_params None; it
// forwards to interest_kernels::target_attention_cpu with an empty list.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
    at::TensorList, c10::string_view, c10::string_view);

std::tuple<at::Tensor, at::Tensor> target_attention_cpu_packaged(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& key_index,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, at::TensorList weights,
    at::TensorList biases, const at::Tensor& out_weight, const at::Tensor& out_bias,
    std::optional<at::TensorList> act_params, c10::string_view activation, c10::string_view normalization) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("interest_kernels::target_attention_cpu", "")
                             .typed<Forward>();
  return op.call(query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
                 act_params.value_or(at::TensorList()), activation, normalization);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  m.def(
      "target_attention_cpu_packaged(Tensor query, Tensor keys, Tensor? key_index, Tensor? lengths, "
      "Tensor? mask, Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor out_bias, "
      "Tensor[]? act_params, str activation, str normalization) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("target_attention_cpu_packaged", &target_attention_cpu_packaged);
}
