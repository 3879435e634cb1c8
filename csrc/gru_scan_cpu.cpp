// Fused CPU kernels for the GRU-family scans (SPEC section 2): gru, aigru, agru, augru,
// variants paper and tensorflow, forward and backward.
//
// Layout. Rows are ordered once, here, by their number of valid steps (longest first),
// and the valid steps of each row are numbered 0, 1, ...; with a mask a row's valid steps
// are its true positions (a masked step leaves h unchanged, so skipping it is exact). At
// scan step s the rows still running are then the prefix [0, count[s]) of that order, and
// their data lives "packed": packed row offset[s] + i is row perm[i] at its s-th valid
// position (PyTorch's PackedSequence layout). Finished rows and padding cost nothing and
// padding is never read.
//
// Forward: one GEMM projects every valid input (N, I) -> (N, 3H); then per step one GEMM
// h_prev (n, H) x W_hh^T and one fused pass over the n running rows (gates, update,
// writes of the output, of h_last and of what the backward needs). The backward walks
// the steps in reverse with one GEMM per step for dh, writes the gate gradients packed,
// and finishes with single GEMMs for the weight and input gradients.
//
// Saved for the backward ("workspace", (B*T, 5H) in the compute dtype, first N rows
// used): per packed row [h_prev, r, z, n, X], X = W_hn h_prev + b_hn (paper) or
// r * h_prev (tensorflow).
//
// float32 and float64 are computed in their own dtype; float16/bfloat16 inputs (and
// float32 weights) are computed in float32. Inputs to the float32 gate passes go through
// exp/tanh approximations accurate to a few ulp that the compiler vectorises, compiled
// for several instruction sets and chosen at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace interest_kernels {
namespace gru {
namespace {

enum Mode : int { kGru = 0, kAigru = 1, kAgru = 2, kAugru = 3 };

Mode parse_mode(const std::string& mode) {
  if (mode == "gru") return kGru;
  if (mode == "aigru") return kAigru;
  if (mode == "agru") return kAgru;
  TORCH_CHECK_VALUE(mode == "augru", "mode must be gru, aigru, agru or augru, got ", mode);
  return kAugru;
}

bool parse_tensorflow(const std::string& variant) {
  TORCH_CHECK_VALUE(variant == "paper" || variant == "tensorflow",
                    "variant must be paper or tensorflow, got ", variant);
  return variant == "tensorflow";
}

// ---- elementwise math -------------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__)
#define IK_INLINE inline __attribute__((always_inline))
#else
#define IK_INLINE inline
#endif

// exp(x) for float: range reduction x = k ln2 + r, a degree-6 polynomial for e^r, and 2^k
// through the exponent bits; no branches, so loops over it vectorise. Relative error a
// few ulp; the argument is clamped to [-87, 87] (results stay finite and normal).
IK_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float k = x * 1.44269504088896341f + shifter;
  k -= shifter;
  float r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

IK_INLINE double fast_exp(double x) { return std::exp(x); }

template <typename T>
IK_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

// tanh through e^{-2|x|}: (1 - e) / (1 + e) with the sign of x (no cancellation near 0
// beyond that of 1 - e).
template <typename T>
IK_INLINE T tanh_(T x) {
  const T e = fast_exp(T(-2) * std::abs(x));
  const T t = (T(1) - e) / (T(1) + e);
  return x < T(0) ? -t : t;
}

IK_INLINE double tanh_(double x) { return std::tanh(x); }

// ---- the schedule -------------------------------------------------------------------------

struct Schedule {
  int64_t batch = 0, seq_len = 0, steps = 0, packed = 0;
  std::vector<int64_t> perm;    // sorted position i -> row b
  std::vector<int64_t> count;   // rows running at step s (steps + 1 entries, last 0)
  std::vector<int64_t> offset;  // first packed row of step s (steps + 1 entries)
  at::Tensor src;               // (N,) int64: flat b * T + t of each packed row
};

// Valid steps per row from lengths (clamped to [0, T]: value checks may have been skipped)
// or from a mask; rows sorted by that number, longest first, ties in row order.
Schedule make_schedule(int64_t batch, int64_t seq_len, const std::optional<at::Tensor>& lengths,
                       const std::optional<at::Tensor>& mask) {
  Schedule sc;
  sc.batch = batch;
  sc.seq_len = seq_len;
  std::vector<int64_t> valid(batch, seq_len);
  std::vector<int64_t> positions;  // with a mask: row b's valid t, at b * T + k
  at::Tensor mask_c;
  if (lengths.has_value()) {
    const at::Tensor len = lengths->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == batch, "lengths must have shape (B,)");
    const int64_t* p = len.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) valid[b] = std::min(std::max(p[b], int64_t(0)), seq_len);
  } else if (mask.has_value()) {
    mask_c = mask->to(at::kBool).contiguous();
    TORCH_CHECK_VALUE(mask_c.dim() == 2 && mask_c.size(0) == batch && mask_c.size(1) == seq_len,
                      "mask must have shape (B, T)");
    const bool* m = mask_c.data_ptr<bool>();
    positions.resize(batch * seq_len);
    for (int64_t b = 0; b < batch; ++b) {
      int64_t k = 0;
      for (int64_t t = 0; t < seq_len; ++t)
        if (m[b * seq_len + t]) positions[b * seq_len + k++] = t;
      valid[b] = k;
    }
  }
  sc.perm.resize(batch);
  std::iota(sc.perm.begin(), sc.perm.end(), int64_t(0));
  std::stable_sort(sc.perm.begin(), sc.perm.end(),
                   [&](int64_t a, int64_t b) { return valid[a] > valid[b]; });
  sc.steps = batch > 0 ? valid[sc.perm[0]] : 0;
  sc.count.assign(sc.steps + 1, 0);
  sc.offset.assign(sc.steps + 1, 0);
  int64_t running = batch;
  for (int64_t s = 0; s < sc.steps; ++s) {
    while (running > 0 && valid[sc.perm[running - 1]] <= s) --running;
    sc.count[s] = running;
    sc.offset[s + 1] = sc.offset[s] + running;
  }
  sc.packed = sc.offset[sc.steps];
  sc.src = at::empty({sc.packed}, at::kLong);
  int64_t* src = sc.src.data_ptr<int64_t>();
  for (int64_t s = 0; s < sc.steps; ++s) {
    for (int64_t i = 0; i < sc.count[s]; ++i) {
      const int64_t b = sc.perm[i];
      const int64_t t = positions.empty() ? s : positions[b * seq_len + s];
      src[sc.offset[s] + i] = b * seq_len + t;
    }
  }
  return sc;
}

// ---- per-step gate passes over a block of running rows --------------------------------------

template <typename T>
struct ForwardStep {
  int64_t hidden;
  int mode;
  bool tensorflow;
  const T* gi;       // this step's first packed row, stride 3H
  const T* gh;       // (n, 3H) paper; (n, 2H) r, z then tensorflow's ghn in gh_n
  const T* gh_n;     // tensorflow: W_hn (r h) rows, stride H
  const T* b_hn;     // paper: (H,) or null
  const T* att;      // this step's packed attention scores, or null
  const T* h_prev;   // stride hp_stride
  int64_t hp_stride;
  T* h_next;         // next step's h_prev rows (i < next_count), stride hn_stride
  int64_t hn_stride;
  int64_t next_count;
  T* saved;          // this step's workspace rows (stride 5H), or null
  T* states;         // (B*T, H) or null
  T* h_last;         // (B, H)
  const int64_t* src;   // this step's packed flat indices
  const int64_t* perm;
};

// Tensorflow variant, first half: r and z, and r * h (into `rh`, stride rh_stride).
template <typename T>
IK_INLINE void forward_reset_rows(const ForwardStep<T>& a, T* rh, int64_t rh_stride,
                                  int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t i = begin; i < end; ++i) {
    const T* gi = a.gi + i * 3 * H;
    const T* gh = a.gh + i * 2 * H;
    const T* h = a.h_prev + i * a.hp_stride;
    T* out = rh + i * rh_stride;
    for (int64_t j = 0; j < H; ++j) out[j] = sigmoid(gi[j] + gh[j]) * h[j];
  }
}

template <typename T>
IK_INLINE void forward_rows(const ForwardStep<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  const int64_t gh_stride = a.tensorflow ? 2 * H : 3 * H;
  for (int64_t i = begin; i < end; ++i) {
    const T* gi = a.gi + i * 3 * H;
    const T* gh = a.gh + i * gh_stride;
    const T* h = a.h_prev + i * a.hp_stride;
    const T at = a.att != nullptr ? a.att[i] : T(0);
    T* keep = a.saved != nullptr ? a.saved + i * 5 * H : nullptr;
    T* out = i < a.next_count ? a.h_next + i * a.hn_stride : a.h_last + a.perm[i] * H;
    T* st = a.states != nullptr ? a.states + a.src[i] * H : nullptr;
    for (int64_t j = 0; j < H; ++j) {
      const T r = sigmoid(gi[j] + gh[j]);
      const T z = sigmoid(gi[H + j] + gh[H + j]);
      T x;  // paper: W_hn h + b_hn; tensorflow: r h (W_hn (r h) is in gh_n)
      T pre_n;
      if (a.tensorflow) {
        x = r * h[j];
        pre_n = gi[2 * H + j] + a.gh_n[i * H + j];
      } else {
        x = gh[2 * H + j] + (a.b_hn != nullptr ? a.b_hn[j] : T(0));
        pre_n = gi[2 * H + j] + r * x;
      }
      const T n = tanh_(pre_n);
      T hn;
      if (a.mode == kGru || a.mode == kAigru) {
        hn = n + z * (h[j] - n);
      } else if (a.mode == kAgru) {
        hn = h[j] + at * (n - h[j]);
      } else if (!a.tensorflow) {
        hn = h[j] + at * z * (n - h[j]);
      } else {
        hn = n + (T(1) - at) * z * (h[j] - n);
      }
      out[j] = hn;
      if (st != nullptr) st[j] = hn;
      if (keep != nullptr) {
        keep[j] = h[j];
        keep[H + j] = r;
        keep[2 * H + j] = z;
        keep[3 * H + j] = n;
        keep[4 * H + j] = x;
      }
    }
  }
}

template <typename T>
struct BackwardStep {
  int64_t hidden;
  int mode;
  bool tensorflow;
  const T* saved;     // this step's workspace rows, stride 5H
  const T* att;       // packed scores of this step, or null
  const T* d_states;  // (B*T, H) or null
  const int64_t* src;
  T* dh;              // (n, H): in: gradient reaching h after this step; out: `direct` part
  T* d_gi;            // this step's packed rows of (N, 3H)
  T* d_gh;            // paper: this step's packed rows of (N, 3H) ([r, z, r * d_pre_n])
  T* d_att;           // packed, or null
  const T* d_rh;      // tensorflow second pass: d(r h) rows (n, H)
};

template <typename T>
IK_INLINE void backward_rows(const BackwardStep<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t i = begin; i < end; ++i) {
    const T* sv = a.saved + i * 5 * H;
    const T* h = sv;
    const T* r = sv + H;
    const T* z = sv + 2 * H;
    const T* n = sv + 3 * H;
    const T* x = sv + 4 * H;
    T* dh = a.dh + i * H;
    const T* ds = a.d_states != nullptr ? a.d_states + a.src[i] * H : nullptr;
    T* dgi = a.d_gi + i * 3 * H;
    T* dgh = a.d_gh != nullptr ? a.d_gh + i * 3 * H : nullptr;
    const T at = a.att != nullptr ? a.att[i] : T(0);
    T da = T(0);
    for (int64_t j = 0; j < H; ++j) {
      const T d = dh[j] + (ds != nullptr ? ds[j] : T(0));
      T d_n, d_z, direct;
      if (a.mode == kGru || a.mode == kAigru) {
        d_n = d * (T(1) - z[j]);
        d_z = d * (h[j] - n[j]);
        direct = d * z[j];
      } else if (a.mode == kAgru) {
        d_n = d * at;
        d_z = T(0);
        direct = d * (T(1) - at);
        da += d * (n[j] - h[j]);
      } else if (!a.tensorflow) {
        const T u = at * z[j];
        const T d_u = d * (n[j] - h[j]);
        d_n = d * u;
        direct = d * (T(1) - u);
        d_z = d_u * at;
        da += d_u * z[j];
      } else {
        const T u = (T(1) - at) * z[j];
        const T d_u = d * (h[j] - n[j]);
        d_n = d * (T(1) - u);
        direct = d * u;
        d_z = d_u * (T(1) - at);
        da -= d_u * z[j];
      }
      const T d_pre_n = d_n * (T(1) - n[j] * n[j]);
      const T d_pre_z = d_z * z[j] * (T(1) - z[j]);
      dgi[H + j] = d_pre_z;
      dgi[2 * H + j] = d_pre_n;
      if (!a.tensorflow) {
        const T d_pre_r = d_pre_n * x[j] * r[j] * (T(1) - r[j]);
        dgi[j] = d_pre_r;
        dgh[j] = d_pre_r;
        dgh[H + j] = d_pre_z;
        dgh[2 * H + j] = d_pre_n * r[j];
      }
      dh[j] = direct;
    }
    if (a.d_att != nullptr) a.d_att[i] = da;
  }
}

// Tensorflow variant, second pass: the reset gate acted on h before W_hn, so d(r h) feeds
// both r's pre-activation and dh.
template <typename T>
IK_INLINE void backward_reset_rows(const BackwardStep<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t i = begin; i < end; ++i) {
    const T* sv = a.saved + i * 5 * H;
    const T* h = sv;
    const T* r = sv + H;
    const T* drh = a.d_rh + i * H;
    T* dh = a.dh + i * H;
    T* dgi = a.d_gi + i * 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      dgi[j] = drh[j] * h[j] * r[j] * (T(1) - r[j]);
      dh[j] += drh[j] * r[j];
    }
  }
}

// float32 passes compiled for several x86 instruction sets (the loader picks one); double
// and other targets use the plain instantiation.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IK_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "avx", "default")))
#else
#define IK_CLONES
#endif

IK_CLONES void forward_rows_f32(const ForwardStep<float>& a, int64_t begin, int64_t end) {
  forward_rows(a, begin, end);
}
IK_CLONES void forward_reset_rows_f32(const ForwardStep<float>& a, float* rh, int64_t stride,
                                      int64_t begin, int64_t end) {
  forward_reset_rows(a, rh, stride, begin, end);
}
IK_CLONES void backward_rows_f32(const BackwardStep<float>& a, int64_t begin, int64_t end) {
  backward_rows(a, begin, end);
}
IK_CLONES void backward_reset_rows_f32(const BackwardStep<float>& a, int64_t begin, int64_t end) {
  backward_reset_rows(a, begin, end);
}

void run_forward(const ForwardStep<float>& a, int64_t b, int64_t e) { forward_rows_f32(a, b, e); }
void run_forward(const ForwardStep<double>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
void run_reset(const ForwardStep<float>& a, float* rh, int64_t st, int64_t b, int64_t e) {
  forward_reset_rows_f32(a, rh, st, b, e);
}
void run_reset(const ForwardStep<double>& a, double* rh, int64_t st, int64_t b, int64_t e) {
  forward_reset_rows(a, rh, st, b, e);
}
void run_backward(const BackwardStep<float>& a, int64_t b, int64_t e) { backward_rows_f32(a, b, e); }
void run_backward(const BackwardStep<double>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }
void run_backward_reset(const BackwardStep<float>& a, int64_t b, int64_t e) {
  backward_reset_rows_f32(a, b, e);
}
void run_backward_reset(const BackwardStep<double>& a, int64_t b, int64_t e) {
  backward_reset_rows(a, b, e);
}

// Rows per parallel_for task: enough elementwise work to pay for a task.
int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(8, 4096 / std::max<int64_t>(hidden, 1)); }

// ---- shared argument handling ------------------------------------------------------------------

struct Args {
  at::ScalarType cdt;
  int64_t batch, seq_len, input_size, hidden;
  Mode mode;
  bool tensorflow;
  at::Tensor x;                 // (B*T, I) compute dtype, contiguous
  at::Tensor att;               // (B*T,) or undefined
  at::Tensor w_ih, w_hh;        // compute dtype
  at::Tensor b_ih, b_hh;        // compute dtype or undefined
};

Args prepare(const at::Tensor& x, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
             const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
             const std::optional<at::Tensor>& att, const std::string& mode,
             const std::string& variant) {
  Args a;
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be (B, T, I)");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "gru_scan_forward (cpu) takes CPU tensors");
  a.cdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.batch = x.size(0);
  a.seq_len = x.size(1);
  a.input_size = x.size(2);
  TORCH_CHECK_VALUE(weight_hh.dim() == 2 && weight_hh.size(0) == 3 * weight_hh.size(1),
                    "weight_hh must be (3H, H)");
  a.hidden = weight_hh.size(1);
  TORCH_CHECK_VALUE(weight_ih.dim() == 2 && weight_ih.size(0) == 3 * a.hidden &&
                        weight_ih.size(1) == a.input_size,
                    "weight_ih must be (3H, I)");
  a.mode = parse_mode(mode);
  a.tensorflow = parse_tensorflow(variant);
  a.x = x.to(a.cdt).reshape({a.batch * a.seq_len, a.input_size}).contiguous();
  a.w_ih = weight_ih.to(a.cdt).contiguous();
  a.w_hh = weight_hh.to(a.cdt).contiguous();
  for (auto [src, dst] : {std::pair{&bias_ih, &a.b_ih}, std::pair{&bias_hh, &a.b_hh}}) {
    if (src->has_value()) {
      TORCH_CHECK_VALUE((*src)->dim() == 1 && (*src)->size(0) == 3 * a.hidden, "biases must be (3H,)");
      *dst = (*src)->to(a.cdt).contiguous();
    }
  }
  if (a.mode != kGru) {
    TORCH_CHECK_VALUE(att.has_value() && att->dim() == 2 && att->size(0) == a.batch &&
                          att->size(1) == a.seq_len,
                      "att (B, T) is required for mode ", mode);
    a.att = att->to(a.cdt).reshape({a.batch * a.seq_len}).contiguous();
  }
  return a;
}

// The packed inputs of the valid steps: (N, I), scaled by the scores for aigru; and the
// packed scores (N,) when there are any.
std::pair<at::Tensor, at::Tensor> packed_inputs(const Args& a, const Schedule& sc) {
  at::Tensor xp = a.x.index_select(0, sc.src);
  at::Tensor ap;
  if (a.att.defined()) ap = a.att.index_select(0, sc.src);
  if (a.mode == kAigru) xp.mul_(ap.unsqueeze(1));
  return {xp, ap};
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
void forward_scan(const Args& a, const Schedule& sc, const at::Tensor& gi, const at::Tensor& ap,
                  const at::Tensor& h_init, at::Tensor& states, at::Tensor& h_last,
                  at::Tensor& workspace) {
  const int64_t H = a.hidden, B = a.batch;
  const bool keep = workspace.defined() && workspace.numel() > 0;
  const at::Tensor w_rz_t = a.w_hh.narrow(0, 0, 2 * H).t();
  const at::Tensor w_hn_t = a.w_hh.narrow(0, 2 * H, H).t();
  const at::Tensor w_hh_t = a.w_hh.t();
  const at::Tensor b_hn = (!a.tensorflow && a.b_hh.defined()) ? a.b_hh.narrow(0, 2 * H, H).contiguous()
                                                             : at::Tensor();
  at::Tensor gh = at::empty({B, a.tensorflow ? 2 * H : 3 * H}, gi.options());
  at::Tensor gh_n, rh;
  if (a.tensorflow) {
    gh_n = at::empty({B, H}, gi.options());
    if (!keep) rh = at::empty({B, H}, gi.options());
  }
  // h_prev rows of each step: in the workspace when kept, else two alternating buffers.
  at::Tensor ping;
  if (keep) {
    workspace.narrow(0, 0, sc.count[0]).narrow(1, 0, H).copy_(h_init.narrow(0, 0, sc.count[0]));
  } else {
    ping = at::empty({2, B, H}, gi.options());
    ping[0].copy_(h_init);
  }
  T* st = states.numel() > 0 ? states.data_ptr<T>() : nullptr;
  T* ws = keep ? workspace.data_ptr<T>() : nullptr;
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const int64_t grain = grain_rows(H);

  for (int64_t s = 0; s < sc.steps; ++s) {
    const int64_t n = sc.count[s], off = sc.offset[s];
    at::Tensor hp = keep ? workspace.narrow(0, off, n).narrow(1, 0, H) : ping[s % 2].narrow(0, 0, n);
    at::Tensor gh_s = gh.narrow(0, 0, n);
    at::mm_out(gh_s, hp, a.tensorflow ? w_rz_t : w_hh_t);

    ForwardStep<T> f;
    f.hidden = H;
    f.mode = a.mode;
    f.tensorflow = a.tensorflow;
    f.gi = gi.data_ptr<T>() + off * 3 * H;
    f.gh = gh.data_ptr<T>();
    f.gh_n = a.tensorflow ? gh_n.data_ptr<T>() : nullptr;
    f.b_hn = ptr_or_null<T>(b_hn);
    f.att = ap.defined() ? ap.data_ptr<T>() + off : nullptr;
    f.h_prev = hp.data_ptr<T>();
    f.hp_stride = hp.stride(0);
    f.next_count = sc.count[s + 1];
    if (keep) {
      f.h_next = ws + sc.offset[s + 1] * 5 * H;
      f.hn_stride = 5 * H;
      f.saved = ws + off * 5 * H;
    } else {
      f.h_next = ping[(s + 1) % 2].data_ptr<T>();
      f.hn_stride = H;
      f.saved = nullptr;
    }
    f.states = st;
    f.h_last = h_last.data_ptr<T>();
    f.src = src + off;
    f.perm = sc.perm.data();

    if (a.tensorflow) {
      // r * h_prev, then W_hn (r h): into the workspace's X column when kept.
      T* rh_ptr = keep ? ws + off * 5 * H + 4 * H : rh.data_ptr<T>();
      const int64_t rh_stride = keep ? 5 * H : H;
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_reset(f, rh_ptr, rh_stride, b, e); });
      at::Tensor rh_s = keep ? workspace.narrow(0, off, n).narrow(1, 4 * H, H) : rh.narrow(0, 0, n);
      at::Tensor ghn_s = gh_n.narrow(0, 0, n);
      at::mm_out(ghn_s, rh_s, w_hn_t);
    }
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_forward(f, b, e); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_scan_forward(
    const at::Tensor& x, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& att, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    std::string mode, std::string variant, bool return_states, bool keep_for_backward) {
  const Args a = prepare(x, weight_ih, weight_hh, bias_ih, bias_hh, att, mode, variant);
  const int64_t B = a.batch, T = a.seq_len, H = a.hidden;
  const auto opts = x.options().dtype(a.cdt);
  const Schedule sc = make_schedule(B, T, lengths, mask);

  at::Tensor h_init;
  if (h0.has_value()) {
    TORCH_CHECK_VALUE(h0->dim() == 2 && h0->size(0) == B && h0->size(1) == H, "h0 must be (B, H)");
    h_init = h0->to(a.cdt).contiguous();
  } else {
    h_init = at::zeros({B, H}, opts);
  }
  // Rows that never run keep h0; the others are written at their last step.
  at::Tensor h_last = h_init.clone();
  at::Tensor states = return_states
                          ? (sc.packed == B * T ? at::empty({B, T, H}, opts) : at::zeros({B, T, H}, opts))
                          : at::empty({0}, opts);
  at::Tensor workspace = keep_for_backward ? at::empty({B * T, 5 * H}, opts) : at::empty({0}, opts);
  // Rows past the packed ones are never read; zeroed so that the output is deterministic.
  if (keep_for_backward) workspace.narrow(0, sc.packed, B * T - sc.packed).zero_();

  if (sc.packed > 0) {
    auto [xp, ap] = packed_inputs(a, sc);
    // b_hr and b_hz only ever add to gi's r and z parts; in the tensorflow variant b_hn too.
    at::Tensor b_gi = a.b_ih;
    if (a.b_hh.defined()) {
      at::Tensor extra = a.b_hh;
      if (!a.tensorflow) extra = at::cat({a.b_hh.narrow(0, 0, 2 * H), at::zeros({H}, opts)});
      b_gi = b_gi.defined() ? b_gi + extra : extra;
    }
    at::Tensor gi = b_gi.defined() ? at::addmm(b_gi, xp, a.w_ih.t()) : at::mm(xp, a.w_ih.t());
    const at::Tensor h_sorted = h_init.index_select(0, at::tensor(sc.perm, at::kLong));
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_forward", [&] {
      forward_scan<scalar_t>(a, sc, gi, ap, h_sorted, states, h_last, workspace);
    });
  }
  if (x.scalar_type() != a.cdt) {
    states = states.to(x.scalar_type());
    h_last = h_last.to(x.scalar_type());
  }
  return {states, h_last, workspace};
}

template <typename T>
void backward_scan(const Args& a, const Schedule& sc, const at::Tensor& ap, const at::Tensor& workspace,
                   const at::Tensor& d_states, at::Tensor& dh, at::Tensor& d_gi, at::Tensor& d_gh,
                   at::Tensor& d_ap) {
  const int64_t H = a.hidden;
  const at::Tensor w_hn = a.w_hh.narrow(0, 2 * H, H);
  const at::Tensor w_rz = a.w_hh.narrow(0, 0, 2 * H);
  at::Tensor d_rh = a.tensorflow ? at::empty({a.batch, H}, dh.options()) : at::Tensor();
  const T* ws = workspace.data_ptr<T>();
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const int64_t grain = grain_rows(H);
  for (int64_t s = sc.steps - 1; s >= 0; --s) {
    const int64_t n = sc.count[s], off = sc.offset[s];
    BackwardStep<T> g;
    g.hidden = H;
    g.mode = a.mode;
    g.tensorflow = a.tensorflow;
    g.saved = ws + off * 5 * H;
    g.att = ap.defined() ? ap.data_ptr<T>() + off : nullptr;
    g.d_states = d_states.defined() ? d_states.data_ptr<T>() : nullptr;
    g.src = src + off;
    g.dh = dh.data_ptr<T>();
    g.d_gi = d_gi.data_ptr<T>() + off * 3 * H;
    g.d_gh = a.tensorflow ? nullptr : d_gh.data_ptr<T>() + off * 3 * H;
    g.d_att = d_ap.defined() ? d_ap.data_ptr<T>() + off : nullptr;
    g.d_rh = a.tensorflow ? d_rh.data_ptr<T>() : nullptr;
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_backward(g, b, e); });
    at::Tensor dh_s = dh.narrow(0, 0, n);
    if (a.tensorflow) {
      at::Tensor d_rh_s = d_rh.narrow(0, 0, n);
      at::mm_out(d_rh_s, d_gi.narrow(0, off, n).narrow(1, 2 * H, H), w_hn);
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_backward_reset(g, b, e); });
      dh_s.addmm_(d_gi.narrow(0, off, n).narrow(1, 0, 2 * H), w_rz);
    } else {
      dh_s.addmm_(d_gh.narrow(0, off, n), a.w_hh);
    }
  }
}

// Gradients of gru_scan_forward. `needs` = which of (x, att, h0, weight_ih, weight_hh,
// bias_ih, bias_hh) to return; the others come back as empty (0,) tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_scan_backward(const std::optional<at::Tensor>& grad_states,
                  const std::optional<at::Tensor>& grad_h_last, const at::Tensor& x,
                  const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                  const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                  const std::optional<at::Tensor>& att, const std::optional<at::Tensor>& h0,
                  const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
                  const at::Tensor& workspace, std::string mode, std::string variant,
                  std::array<bool, 7> needs) {
  const Args a = prepare(x, weight_ih, weight_hh, bias_ih, bias_hh, att, mode, variant);
  const int64_t B = a.batch, T = a.seq_len, H = a.hidden, I = a.input_size;
  const auto opts = x.options().dtype(a.cdt);
  const Schedule sc = make_schedule(B, T, lengths, mask);
  const int64_t N = sc.packed;
  TORCH_CHECK_VALUE(workspace.dim() == 2 && workspace.size(0) == B * T && workspace.size(1) == 5 * H &&
                        workspace.scalar_type() == a.cdt,
                    "workspace must come from gru_scan_forward with keep_for_backward");

  const at::Tensor perm = at::tensor(sc.perm, at::kLong);
  at::Tensor dh = grad_h_last.has_value() ? grad_h_last->to(a.cdt).index_select(0, perm).contiguous()
                                          : at::zeros({B, H}, opts);
  at::Tensor d_states;
  if (grad_states.has_value() && grad_states->numel() > 0)
    d_states = grad_states->to(a.cdt).reshape({B * T, H}).contiguous();
  at::Tensor d_gi = at::empty({N, 3 * H}, opts);
  at::Tensor d_gh = a.tensorflow ? at::Tensor() : at::empty({N, 3 * H}, opts);
  auto [xp, ap] = packed_inputs(a, sc);
  at::Tensor d_ap = a.mode != kGru ? at::empty({N}, opts) : at::Tensor();
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_backward", [&] {
      backward_scan<scalar_t>(a, sc, ap, workspace, d_states, dh, d_gi, d_gh, d_ap);
    });
  }

  const auto empty = at::empty({0}, x.options());
  const auto param_dtype = weight_ih.scalar_type();
  at::Tensor d_x = empty, d_att = empty, d_h0 = empty, d_w_ih = empty, d_w_hh = empty, d_b_ih = empty,
             d_b_hh = empty;
  const at::Tensor h_prev = workspace.narrow(0, 0, N).narrow(1, 0, H);
  if (needs[0] || (needs[1] && a.mode == kAigru)) {
    at::Tensor d_xp = d_gi.mm(a.w_ih);  // gradient of the (scaled) packed inputs
    if (a.mode == kAigru) {
      if (needs[1]) d_ap = (d_xp * a.x.index_select(0, sc.src)).sum(1);
      d_xp.mul_(ap.unsqueeze(1));
    }
    if (needs[0]) {
      d_x = at::zeros({B * T, I}, opts).index_copy_(0, sc.src, d_xp).view({B, T, I}).to(x.scalar_type());
    }
  }
  if (needs[1] && a.mode != kGru) {
    d_att = at::zeros({B * T}, opts).index_copy_(0, sc.src, d_ap).view({B, T}).to(x.scalar_type());
  } else if (needs[1]) {
    d_att = at::zeros({B, T}, x.options());
  }
  if (needs[2]) d_h0 = at::empty({B, H}, opts).index_copy_(0, perm, dh).to(x.scalar_type());
  if (needs[3]) d_w_ih = d_gi.t().mm(xp).to(param_dtype);
  if (needs[5]) d_b_ih = d_gi.sum(0).to(param_dtype);
  if (needs[4]) {
    if (a.tensorflow) {
      d_w_hh = at::empty({3 * H, H}, opts);
      d_w_hh.narrow(0, 0, 2 * H).copy_(d_gi.narrow(1, 0, 2 * H).t().mm(h_prev));
      d_w_hh.narrow(0, 2 * H, H).copy_(d_gi.narrow(1, 2 * H, H).t().mm(workspace.narrow(0, 0, N).narrow(1, 4 * H, H)));
    } else {
      d_w_hh = d_gh.t().mm(h_prev);
    }
    d_w_hh = d_w_hh.to(param_dtype);
  }
  if (needs[6]) d_b_hh = (a.tensorflow ? d_gi : d_gh).sum(0).to(param_dtype);
  return {d_x, d_att, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh};
}

}  // namespace
}  // namespace gru
}  // namespace interest_kernels

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // The GRU-family scan (SPEC section 2). Returns (states (B, T, H) or (0,) without
  // return_states, h_last (B, H), workspace (B*T, 5H) in the compute dtype with
  // keep_for_backward, else (0,)). lengths (B,) int or mask (B, T) bool, not both.
  m.def(
      "gru_scan_forward(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? att, Tensor? h0, Tensor? lengths, Tensor? mask, str mode, "
      "str variant, bool return_states, bool keep_for_backward) -> (Tensor, Tensor, Tensor)");
  // Gradients for (x, att, h0, weight_ih, weight_hh, bias_ih, bias_hh); those not flagged
  // in `needs` come back as empty (0,) tensors.
  m.def(
      "gru_scan_backward(Tensor? grad_states, Tensor? grad_h_last, Tensor x, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? att, Tensor? h0, "
      "Tensor? lengths, Tensor? mask, Tensor workspace, str mode, str variant, bool[7] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("gru_scan_forward", &interest_kernels::gru::gru_scan_forward);
  m.impl("gru_scan_backward", &interest_kernels::gru::gru_scan_backward);
}
