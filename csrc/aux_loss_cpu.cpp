// DIEN's auxiliary loss on the CPU (SPEC section 3), scoring the valid pairs only.
//
// The eager reference keeps shapes static by running the MLP on all B (T - 1) pairs, the
// padded ones zeroed; here the valid pairs (t, t + 1) are gathered first (a data-dependent
// count N that never leaves the operator), the first layer's state half W_1h h_t is
// computed once for the positive and the negative, and both go through the remaining
// layers as one (2N, .) batch of GEMMs. The forward returns, besides the loss, the pairs'
// rows and every layer's activations, which the backward reuses.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace interest_kernels {
namespace aux_loss {
namespace {

enum class Act { kSigmoid, kRelu, kIdentity };

Act parse_activation(const std::string& name) {
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK_VALUE(
      name == "identity", "activation must be sigmoid, relu or identity, got ", name);
  return Act::kIdentity;
}

void activate_(at::Tensor& z, Act act) {
  if (act == Act::kSigmoid) z.sigmoid_();
  if (act == Act::kRelu) z.relu_();
}

// dL/da -> dL/dz in place, given the activation a = act(z) (relu: a > 0 exactly where
// z > 0): one pass, no new (2N, U) matrix (each fresh one costs its page faults).
void through_activation_(at::Tensor& grad, const at::Tensor& a, Act act) {
  if (act == Act::kSigmoid) at::sigmoid_backward_out(grad, grad, a);
  if (act == Act::kRelu) at::threshold_backward_out(grad, grad, a, 0);
}

// A (0,) bias stands for none.
bool has_bias(const at::Tensor& bias) { return bias.numel() > 0; }

// The problem's shapes, every argument checked against them.
struct Problem {
  int64_t batch, steps, hidden, emb;
  std::vector<int64_t> units;
};

Problem check_problem(
    const at::Tensor& states, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& valid, at::TensorList weights, at::TensorList biases,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias) {
  TORCH_CHECK_VALUE(states.dim() == 3, "states must be (B, T, H), got ", states.sizes());
  Problem p{states.size(0), states.size(1), states.size(2), pos.dim() == 3 ? pos.size(2) : -1, {}};
  TORCH_CHECK_VALUE(
      pos.dim() == 3 && pos.size(0) == p.batch && pos.size(1) == p.steps,
      "pos must be (B, T, E) with B, T of states ", states.sizes(), ", got ", pos.sizes());
  TORCH_CHECK_VALUE(neg.sizes() == pos.sizes(), "neg must be shaped like pos ", pos.sizes(), ", got ", neg.sizes());
  TORCH_CHECK_VALUE(
      valid.dim() == 2 && valid.size(0) == p.batch && valid.size(1) == p.steps &&
          valid.scalar_type() == at::kBool,
      "valid must be a (B, T) bool mask, got ", valid.sizes(), " ", valid.scalar_type());
  TORCH_CHECK_TYPE(
      at::isFloatingType(states.scalar_type()) && pos.scalar_type() == states.scalar_type() &&
          neg.scalar_type() == states.scalar_type(),
      "states, pos and neg must share one floating dtype");
  TORCH_CHECK_VALUE(!weights.empty(), "weights must hold at least one layer");
  TORCH_CHECK_VALUE(
      biases.size() == weights.size(), "biases must have one entry per weight (", weights.size(),
      "), got ", biases.size());
  const at::ScalarType wtype = weights[0].scalar_type();
  TORCH_CHECK_TYPE(
      wtype == states.scalar_type() || wtype == at::kFloat,
      "weights must have the dtype of states or float32, got ", wtype);
  int64_t fan_in = p.hidden + p.emb;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(
        w.dim() == 2 && w.size(1) == fan_in, "weights[", l, "] must be (units, ", fan_in,
        "), got ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == wtype, "weights[", l, "] must be ", wtype);
    const at::Tensor& b = biases[l];
    TORCH_CHECK_VALUE(
        b.dim() == 1 && (b.size(0) == w.size(0) || b.size(0) == 0), "biases[", l, "] must be (",
        w.size(0), ",) or (0,) for none, got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == wtype, "biases[", l, "] must be ", wtype);
    p.units.push_back(w.size(0));
    fan_in = w.size(0);
  }
  TORCH_CHECK_VALUE(
      out_weight.numel() == fan_in && out_weight.dim() >= 1 && out_weight.dim() <= 2 &&
          out_weight.size(-1) == fan_in,
      "out_weight must be (1, ", fan_in, ") or (", fan_in, ",), got ", out_weight.sizes());
  TORCH_CHECK_TYPE(out_weight.scalar_type() == wtype, "out_weight must be ", wtype);
  if (out_bias.has_value()) {
    TORCH_CHECK_VALUE(out_bias->numel() == 1, "out_bias must hold one value, got ", out_bias->sizes());
    TORCH_CHECK_TYPE(out_bias->scalar_type() == wtype, "out_bias must be ", wtype);
  }
  std::vector<at::Tensor> all = {states, pos, neg, valid, out_weight};
  all.insert(all.end(), weights.begin(), weights.end());
  for (const at::Tensor& t : all) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "the CPU aux loss got a tensor on ", t.device());
  }
  return p;
}

// Rows (into the (B T, .) views) of the state h_t of each valid pair (t, t + 1), in order.
at::Tensor pair_rows(const at::Tensor& valid, const Problem& p) {
  if (p.steps < 2) return at::empty({0}, valid.options().dtype(at::kLong));
  const at::Tensor pairs = valid.narrow(1, 0, p.steps - 1) & valid.narrow(1, 1, p.steps - 1);
  const at::Tensor flat = pairs.reshape({-1}).nonzero().reshape({-1});
  return flat + flat.div(p.steps - 1, "floor");  // b (T - 1) + t  ->  b T + t
}

// The pairs' inputs in the compute dtype: h (N, H), e (2N, E) positives then negatives.
std::tuple<at::Tensor, at::Tensor> pair_inputs(
    const at::Tensor& states, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& rows, const Problem& p, at::ScalarType cdt) {
  const at::Tensor h =
      states.reshape({p.batch * p.steps, p.hidden}).index_select(0, rows).to(cdt);
  const at::Tensor next = rows + 1;
  const at::Tensor e = at::cat(
      {pos.reshape({p.batch * p.steps, p.emb}).index_select(0, next),
       neg.reshape({p.batch * p.steps, p.emb}).index_select(0, next)}).to(cdt);
  return {h, e};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> aux_loss_cpu_forward(
    const at::Tensor& states, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& valid, at::TensorList weights,
    at::TensorList biases, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const std::string& activation) {
  const Problem p = check_problem(states, pos, neg, valid, weights, biases, out_weight, out_bias);
  const Act act = parse_activation(activation);
  const at::ScalarType cdt = at::toOpMathType(states.scalar_type());
  const at::Tensor rows = pair_rows(valid, p);
  const int64_t n = rows.numel();
  const auto [h, e] = pair_inputs(states, pos, neg, rows, p, cdt);
  // Layer 1 on [h, e] = W_1h h + W_1e e + c_1, the h half once for both halves of e.
  const at::Tensor w1 = weights[0].to(cdt);
  const at::Tensor w1h = w1.narrow(1, 0, p.hidden), w1e = w1.narrow(1, p.hidden, p.emb);
  const at::Tensor zh =
      has_bias(biases[0]) ? at::addmm(biases[0].to(cdt), h, w1h.t()) : at::mm(h, w1h.t());
  at::Tensor a = at::mm(e, w1e.t());
  a.view({2, n, p.units[0]}).add_(zh.unsqueeze(0));
  activate_(a, act);
  std::vector<at::Tensor> activations = {a};
  for (size_t l = 1; l < weights.size(); ++l) {
    const at::Tensor w = weights[l].to(cdt);
    a = has_bias(biases[l]) ? at::addmm(biases[l].to(cdt), a, w.t()) : at::mm(a, w.t());
    activate_(a, act);
    activations.push_back(a);
  }
  at::Tensor scores = at::mv(a, out_weight.to(cdt).reshape({-1}));
  if (out_bias.has_value()) scores.add_(out_bias->to(cdt).reshape({}));
  const at::Tensor terms =
      at::log_sigmoid(scores.narrow(0, 0, n)) + at::log_sigmoid(-scores.narrow(0, n, n));
  const at::Tensor loss = (-terms.sum() / static_cast<double>(std::max<int64_t>(n, 1)))
                              .to(states.scalar_type());
  activations.push_back(scores);
  return {loss, rows, activations};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
aux_loss_cpu_backward(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& pos,
    const at::Tensor& neg, const at::Tensor& valid, at::TensorList weights,
    at::TensorList biases, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const std::string& activation,
    const at::Tensor& rows, at::TensorList saved) {
  const Problem p = check_problem(states, pos, neg, valid, weights, biases, out_weight, out_bias);
  const Act act = parse_activation(activation);
  const at::ScalarType cdt = at::toOpMathType(states.scalar_type());
  const int64_t n = rows.numel();
  const size_t layers = weights.size();
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value, got ", grad.sizes());
  TORCH_CHECK_VALUE(
      rows.dim() == 1 && rows.scalar_type() == at::kLong && saved.size() == layers + 1,
      "rows and saved must be the forward's outputs");
  for (size_t l = 0; l <= layers; ++l) {
    const bool ok = l < layers ? saved[l].sizes() == at::IntArrayRef({2 * n, p.units[l]})
                               : saved[l].sizes() == at::IntArrayRef({2 * n});
    TORCH_CHECK_VALUE(ok && saved[l].scalar_type() == cdt, "saved[", l, "] is not the forward's");
  }
  if (n > 0) {
    TORCH_CHECK_VALUE(
        rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < p.batch * p.steps - 1,
        "rows must be the forward's pair rows");
  }
  const at::Tensor scores = saved[layers];
  // d(-mean(log s(f+) + log(1 - s(f-))))/df: -(1 - s(f+)) / N and s(f-) / N.
  const at::Tensor scale = grad.to(cdt).reshape({}) / static_cast<double>(std::max<int64_t>(n, 1));
  const at::Tensor sig = scores.sigmoid();
  const at::Tensor d_scores =
      at::cat({(sig.narrow(0, 0, n) - 1) * scale, sig.narrow(0, n, n) * scale});
  const at::Tensor wo = out_weight.to(cdt).reshape({-1});
  const at::Tensor d_out_weight = at::mv(saved[layers - 1].t(), d_scores).reshape(out_weight.sizes());
  const at::Tensor d_out_bias = out_bias.has_value()
                                    ? d_scores.sum().reshape(out_bias->sizes())
                                    : at::empty({0}, d_scores.options());
  std::vector<at::Tensor> d_weights(layers), d_biases(layers);
  at::Tensor d_z = at::outer(d_scores, wo);  // dL/da of the last layer, then dL/dz
  for (size_t l = layers; l-- > 1;) {
    through_activation_(d_z, saved[l], act);
    const at::Tensor w = weights[l].to(cdt);
    d_weights[l] = d_z.t().mm(saved[l - 1]);
    d_biases[l] = d_z.sum(0);
    d_z = d_z.mm(w);
  }
  const auto [h, e] = pair_inputs(states, pos, neg, rows, p, cdt);
  through_activation_(d_z, saved[0], act);
  const at::Tensor w1 = weights[0].to(cdt);
  d_biases[0] = d_z.sum(0);
  const at::Tensor d_w1e = d_z.t().mm(e);
  const at::Tensor d_e = d_z.mm(w1.narrow(1, p.hidden, p.emb));
  // The state half saw h_t twice (positive and negative): its gradient is the halves' sum.
  const at::Tensor d_zh = d_z.narrow(0, 0, n).add_(d_z.narrow(0, n, n));
  d_weights[0] = at::cat({d_zh.t().mm(h), d_w1e}, 1);
  const at::Tensor d_h = d_zh.mm(w1.narrow(1, 0, p.hidden));
  const int64_t flat_rows = p.batch * p.steps;
  const at::Tensor next = rows + 1;
  const auto scatter = [&](const at::Tensor& like, int64_t width, const at::Tensor& at_rows,
                           const at::Tensor& values) {
    return at::zeros({flat_rows, width}, like.options())
        .index_copy_(0, at_rows, values.to(like.scalar_type()))
        .view(like.sizes());
  };
  for (size_t l = 0; l < layers; ++l) {
    d_weights[l] = d_weights[l].to(weights[l].scalar_type());
    d_biases[l] = has_bias(biases[l]) ? d_biases[l].to(biases[l].scalar_type())
                                      : at::empty({0}, biases[l].options());
  }
  return {scatter(states, p.hidden, rows, d_h),
          scatter(pos, p.emb, next, d_e.narrow(0, 0, n)),
          scatter(neg, p.emb, next, d_e.narrow(0, n, n)),
          d_weights,
          d_biases,
          d_out_weight.to(out_weight.scalar_type()),
          d_out_bias.to(out_weight.scalar_type())};
}

}  // namespace
}  // namespace aux_loss
}  // namespace interest_kernels

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // DIEN's auxiliary loss over the valid pairs of valid (B, T) bool, biases[l] (0,) for
  // none: (loss (0-d, states' dtype), rows (N,) of the pairs' states in (B T, .), saved: each layer's activations
  // (2N, U_l) and the scores (2N,), positives first, in the compute dtype).
  m.def(
      "dien_aux_loss_cpu_forward(Tensor states, Tensor pos, Tensor neg, Tensor valid, "
      "Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor? out_bias, "
      "str activation) -> (Tensor, Tensor, Tensor[])");
  // Gradients for (states, pos, neg, weights, biases, out_weight, out_bias); (0,) for an
  // absent bias.
  m.def(
      "dien_aux_loss_cpu_backward(Tensor grad, Tensor states, Tensor pos, Tensor neg, "
      "Tensor valid, Tensor[] weights, Tensor[] biases, Tensor out_weight, Tensor? out_bias, "
      "str activation, Tensor rows, Tensor[] saved) "
      "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("dien_aux_loss_cpu_forward", &interest_kernels::aux_loss::aux_loss_cpu_forward);
  m.impl("dien_aux_loss_cpu_backward", &interest_kernels::aux_loss::aux_loss_cpu_backward);
}
