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
// Forward: the valid inputs (N, I) are projected to (N, 3H) by GEMMs over groups of
// consecutive steps (one GEMM when N is small; otherwise groups of about 1 MB of output,
// which stay in cache until read); then per step one GEMM h_prev (n, H) x W_hh^T and one
// fused pass over the n running rows (gates, update, writes of the output, of h_last and
// of what the backward needs). The backward walks the steps in reverse with one GEMM per
// step for dh, writes the gate gradients of a group of steps, and folds each group into
// the weight, bias and input gradients with GEMMs while it is in cache.
//
// Saved for the backward (the "workspace"): five (B*T, H) tensors in the compute dtype,
// per packed row h_prev, r, z, n and X = W_hn h_prev + b_hn (paper) or r * h_prev
// (tensorflow). Only their first N rows are written (the rest are never touched, so never
// paged in) and read. Five tensors rather than one (B*T, 5H): below glibc's 32 MB mmap
// ceiling each is served again from the heap on the next call instead of being mapped and
// page-faulted afresh (measured on a 2-core VM: 53 ms to fill a fresh 37 MB buffer, 1.4 ms
// for five 7.4 MB ones).
//
// float32 and float64 are computed in their own dtype; float16/bfloat16 inputs (and
// float32 weights) are computed in float32. Inputs to the float32 gate passes go through
// exp/tanh approximations accurate to a few ulp that the compiler vectorises, compiled
// for several instruction sets and chosen at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "fast_math.h"

#include <algorithm>
#include <array>
#include <bit>
#include <climits>
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

template <typename T>
IK_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

// tanh through e^{-2|x|}: (1 - e) / (1 + e) with the sign of x.
template <typename T>
IK_INLINE T tanh_(T x) {
  const T e = fast_exp(T(-2) * std::abs(x));
  return std::copysign((T(1) - e) / (T(1) + e), x);
}

IK_INLINE double tanh_(double x) { return std::tanh(x); }

// ---- the schedule -------------------------------------------------------------------------

struct Schedule {
  int64_t batch = 0, seq_len = 0, steps = 0, packed = 0;
  std::vector<int64_t> perm;    // sorted position i -> row b
  std::vector<int64_t> count;   // rows running at step s (steps + 1 entries, last 0)
  std::vector<int64_t> offset;  // first packed row of step s (steps + 1 entries)
  at::Tensor src;               // (N,) int64: flat b * T + t of each packed row
  std::vector<uint8_t> valid;   // (B*T): position valid; empty when all are
};

// Zero the rows of `flat` (B*T, C), contiguous, at invalid positions.
void zero_invalid_rows(at::Tensor& flat, const Schedule& sc) {
  if (sc.valid.empty() || flat.numel() == 0) return;
  const int64_t row_bytes = flat.size(1) * flat.element_size();
  char* base = static_cast<char*>(flat.data_ptr());
  for (int64_t p = 0; p < sc.batch * sc.seq_len; ++p)
    if (!sc.valid[p]) std::memset(base + p * row_bytes, 0, row_bytes);
}

// Consecutive steps grouped so that each group's packed rows number at most `rows` (a
// group holds at least one step): returns the first step of each group, then `steps`.
std::vector<int64_t> step_groups(const Schedule& sc, int64_t rows) {
  std::vector<int64_t> starts;
  int64_t s = 0;
  while (s < sc.steps) {
    starts.push_back(s);
    int64_t last = s + 1;
    while (last < sc.steps && sc.offset[last + 1] - sc.offset[s] <= rows) ++last;
    s = last;
  }
  starts.push_back(sc.steps);
  return starts;
}

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
  if (sc.packed < batch * seq_len) {
    sc.valid.assign(batch * seq_len, 0);
    if (mask_c.defined()) {
      std::memcpy(sc.valid.data(), mask_c.data_ptr<bool>(), batch * seq_len);
    } else {
      for (int64_t b = 0; b < batch; ++b) std::fill_n(sc.valid.begin() + b * seq_len, valid[b], 1);
    }
  }
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

// Rows of the five saved quantities (see the top of the file), each with stride H.
template <typename T>
struct Saved {
  T *h = nullptr, *r = nullptr, *z = nullptr, *n = nullptr, *x = nullptr;
  Saved at_row(int64_t row, int64_t hidden) const {
    const int64_t o = row * hidden;
    return {h + o, r + o, z + o, n + o, x + o};
  }
};
//
// Each pass is a loop over rows of loops over the H units. The row functions are
// specialised at compile time on mode, variant and what is written, so the unit loops
// hold no branches and vectorise (`omp simd`; the clones below pick the instruction set).

template <typename T>
struct ForwardStep {
  int64_t hidden;
  int mode;
  bool tensorflow;
  const T* gi;       // this step's input projections (n, 3H), without bias
  const T* b_gi;     // (3H,) bias added to gi (b_ih, plus b_hr, b_hz; tensorflow: all of b_hh)
  const T* gh;       // (n, 3H) paper; (n, 2H) r, z for tensorflow
  const T* gh_n;     // tensorflow: W_hn (r h) rows (n, H)
  const T* b_hn;     // paper: (H,) (zeros without bias_hh)
  const T* att;      // this step's packed attention scores, or null
  const T* h_prev;   // stride hp_stride
  int64_t hp_stride;
  T* h_next;         // next step's h_prev rows (i < next_count), stride hn_stride
  int64_t hn_stride;
  int64_t next_count;
  Saved<T> saved;    // this step's saved rows, when kept
  bool keep;
  T* states;         // (B*T, H) or null
  T* h_last;         // (B, H)
  const int64_t* src;   // this step's packed flat indices
  const int64_t* perm;
};

// Tensorflow variant, first half: r * h (into `rh`, stride rh_stride).
template <typename T>
IK_INLINE void forward_reset_block(const ForwardStep<T>& a, T* rh, int64_t rh_stride, int64_t begin,
                                   int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict gi = a.gi + i * 3 * H;
    const T* __restrict gh = a.gh + i * 2 * H;
    const T* __restrict b = a.b_gi;
    const T* __restrict h = a.h_prev + i * a.hp_stride;
    T* __restrict out = rh + i * rh_stride;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) out[j] = sigmoid(gi[j] + b[j] + gh[j]) * h[j];
  }
}

// Units are processed in blocks of a fixed width W (one 512-bit vector of floats): the
// compiler turns a block into straight vector code. The last, partial block of a row
// (H % W units) goes through zero-padded copies on the stack instead of a scalar
// epilogue, which at H = 36 cost as much as the two full blocks.
template <typename T>
constexpr int64_t kUnitBlock = 64 / sizeof(T);

// Inputs of one block of units: the three gates' parts are `gs` elements apart.
template <typename T>
struct ForwardUnits {
  const T *gi, *b, *gh, *ghn, *bhn, *h;
  int64_t gs;
};

template <typename T>
struct SavedUnits {
  T *out, *h, *r, *z, *n, *x;
};

template <typename T, int MODE, bool TF, bool KEEP>
IK_INLINE void forward_units(const ForwardUnits<T>& u, T at, const SavedUnits<T>& o) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t gs = u.gs;
  const T* __restrict gi = u.gi;
  const T* __restrict b = u.b;
  const T* __restrict gh = u.gh;
  const T* __restrict ghn = u.ghn;
  const T* __restrict bhn = u.bhn;
  const T* __restrict h = u.h;
  T* __restrict out = o.out;
  T* __restrict sv_h = o.h;
  T* __restrict sv_r = o.r;
  T* __restrict sv_z = o.z;
  T* __restrict sv_n = o.n;
  T* __restrict sv_x = o.x;
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) {
    const T r = sigmoid(gi[j] + b[j] + gh[j]);
    const T z = sigmoid(gi[gs + j] + b[gs + j] + gh[gs + j]);
    // paper: x = W_hn h + b_hn, n = tanh(gi_n + r x); tensorflow: x = r h, n = tanh(gi_n + W_hn x)
    const T x = TF ? r * h[j] : gh[2 * gs + j] + bhn[j];
    const T n = tanh_(TF ? gi[2 * gs + j] + b[2 * gs + j] + ghn[j] : gi[2 * gs + j] + b[2 * gs + j] + r * x);
    T hn;
    if constexpr (MODE == kGru) {
      hn = n + z * (h[j] - n);
    } else if constexpr (MODE == kAgru) {
      hn = h[j] + at * (n - h[j]);
    } else if constexpr (!TF) {
      hn = h[j] + at * z * (n - h[j]);
    } else {
      hn = n + (T(1) - at) * z * (h[j] - n);
    }
    out[j] = hn;
    if constexpr (KEEP) {
      sv_h[j] = h[j];
      sv_r[j] = r;
      sv_z[j] = z;
      sv_n[j] = n;
      sv_x[j] = x;
    }
  }
}

template <typename T, int MODE, bool TF, bool KEEP>
IK_INLINE void forward_row(const ForwardStep<T>& a, int64_t i) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t H = a.hidden;
  const T* gi = a.gi + i * 3 * H;
  const T* gh = a.gh + i * (TF ? 2 * H : 3 * H);
  const T* ghn = TF ? a.gh_n + i * H : a.b_hn;
  const T* h = a.h_prev + i * a.hp_stride;
  const T at = (MODE == kAgru || MODE == kAugru) ? a.att[i] : T(0);
  T* out = i < a.next_count ? a.h_next + i * a.hn_stride : a.h_last + a.perm[i] * H;
  const Saved<T> sv = KEEP ? a.saved.at_row(i, H) : Saved<T>{};
  // tensorflow's gh holds r, z only: its n part is never read (x = r h there).
  const int64_t full = H - H % W;
  for (int64_t j = 0; j < full; j += W) {
    const ForwardUnits<T> u{gi + j, a.b_gi + j, gh + j, ghn + j, a.b_hn + j, h + j, H};
    const SavedUnits<T> o = KEEP ? SavedUnits<T>{out + j, sv.h + j, sv.r + j, sv.z + j, sv.n + j, sv.x + j}
                                 : SavedUnits<T>{out + j, nullptr, nullptr, nullptr, nullptr, nullptr};
    forward_units<T, MODE, TF, KEEP>(u, at, o);
  }
  if (const int64_t rest = H - full; rest > 0) {
    alignas(64) T in[3 * W * 3 + 3 * W] = {};  // gi, b, gh (3 gates each), then ghn, bhn, h
    alignas(64) T res[6 * W];
    T* l_gi = in;
    T* l_b = in + 3 * W;
    T* l_gh = in + 6 * W;
    T* l_ghn = in + 9 * W;
    T* l_bhn = in + 10 * W;
    T* l_h = in + 11 * W;
    for (int g = 0; g < 3; ++g) {
      std::memcpy(l_gi + g * W, gi + g * H + full, rest * sizeof(T));
      std::memcpy(l_b + g * W, a.b_gi + g * H + full, rest * sizeof(T));
      if (g < 2 || !TF) std::memcpy(l_gh + g * W, gh + g * H + full, rest * sizeof(T));
    }
    if (TF) std::memcpy(l_ghn, ghn + full, rest * sizeof(T));
    std::memcpy(l_bhn, a.b_hn + full, rest * sizeof(T));
    std::memcpy(l_h, h + full, rest * sizeof(T));
    const ForwardUnits<T> u{l_gi, l_b, l_gh, l_ghn, l_bhn, l_h, W};
    const SavedUnits<T> o{res, res + W, res + 2 * W, res + 3 * W, res + 4 * W, res + 5 * W};
    forward_units<T, MODE, TF, KEEP>(u, at, o);
    std::memcpy(out + full, res, rest * sizeof(T));
    if constexpr (KEEP) {
      T* dst[5] = {sv.h, sv.r, sv.z, sv.n, sv.x};
      for (int k = 0; k < 5; ++k) std::memcpy(dst[k] + full, res + (k + 1) * W, rest * sizeof(T));
    }
  }
  if (a.states != nullptr) std::memcpy(a.states + a.src[i] * H, out, H * sizeof(T));
}

template <typename T, bool TF, bool KEEP>
IK_INLINE void forward_block_for(const ForwardStep<T>& a, int64_t begin, int64_t end) {
  switch (a.mode) {
    case kAgru:
      for (int64_t i = begin; i < end; ++i) forward_row<T, kAgru, TF, KEEP>(a, i);
      break;
    case kAugru:
      for (int64_t i = begin; i < end; ++i) forward_row<T, kAugru, TF, KEEP>(a, i);
      break;
    default:  // gru, aigru (its inputs were scaled before the projection)
      for (int64_t i = begin; i < end; ++i) forward_row<T, kGru, TF, KEEP>(a, i);
  }
}

template <typename T>
IK_INLINE void forward_block(const ForwardStep<T>& a, int64_t begin, int64_t end) {
  const bool keep = a.keep;
  if (a.tensorflow) {
    keep ? forward_block_for<T, true, true>(a, begin, end) : forward_block_for<T, true, false>(a, begin, end);
  } else {
    keep ? forward_block_for<T, false, true>(a, begin, end) : forward_block_for<T, false, false>(a, begin, end);
  }
}

template <typename T>
struct BackwardStep {
  int64_t hidden;
  int mode;
  bool tensorflow;
  Saved<T> saved;     // this step's saved rows
  const T* att;       // packed scores of this step, or null
  const T* d_states;  // (B*T, H) or null
  const int64_t* src;
  T* dh;              // (n, H): in: gradient reaching h after this step; out: `direct` part
  T* d_gi;            // this step's packed rows of (N, 3H)
  T* d_gh;            // paper: this step's packed rows of (N, 3H) ([r, z, r * d_pre_n])
  T* d_att;           // packed, or null
  const T* d_rh;      // tensorflow second pass: d(r h) rows (n, H)
};

// One block of units of the backward (see forward_units): saved rows in, the incoming dh
// (plus d_states when DS) in, gate gradients and the `direct` part of dh out.
template <typename T>
struct BackwardUnits {
  const T *h, *r, *z, *n, *x, *ds;
  T *dh, *dgi, *dgh;  // dgi, dgh: three gates `gs` apart
  int64_t gs;
};

template <typename T, int MODE, bool TF, bool DS>
IK_INLINE T backward_units(const BackwardUnits<T>& u, T at) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t gs = u.gs;
  const T* __restrict sv_h = u.h;
  const T* __restrict sv_r = u.r;
  const T* __restrict sv_z = u.z;
  const T* __restrict sv_n = u.n;
  const T* __restrict sv_x = u.x;
  const T* __restrict ds = u.ds;
  T* __restrict dh = u.dh;
  T* __restrict dgi = u.dgi;
  T* __restrict dgh = u.dgh;
  T da = T(0);
#pragma omp simd reduction(+ : da)
  for (int64_t j = 0; j < W; ++j) {
    const T h = sv_h[j], r = sv_r[j], z = sv_z[j], n = sv_n[j], x = sv_x[j];
    const T d = DS ? dh[j] + ds[j] : dh[j];
    T d_n, d_z, direct;
    if constexpr (MODE == kGru) {
      d_n = d * (T(1) - z);
      d_z = d * (h - n);
      direct = d * z;
    } else if constexpr (MODE == kAgru) {
      d_n = d * at;
      d_z = T(0);
      direct = d * (T(1) - at);
      da += d * (n - h);
    } else if constexpr (!TF) {
      const T u = at * z;
      const T d_u = d * (n - h);
      d_n = d * u;
      direct = d * (T(1) - u);
      d_z = d_u * at;
      da += d_u * z;
    } else {
      const T u = (T(1) - at) * z;
      const T d_u = d * (h - n);
      d_n = d * (T(1) - u);
      direct = d * u;
      d_z = d_u * (T(1) - at);
      da -= d_u * z;
    }
    const T d_pre_n = d_n * (T(1) - n * n);
    const T d_pre_z = d_z * z * (T(1) - z);
    dgi[gs + j] = d_pre_z;
    dgi[2 * gs + j] = d_pre_n;
    if constexpr (!TF) {
      const T d_pre_r = d_pre_n * x * r * (T(1) - r);
      dgi[j] = d_pre_r;
      dgh[j] = d_pre_r;
      dgh[gs + j] = d_pre_z;
      dgh[2 * gs + j] = d_pre_n * r;
    }
    dh[j] = direct;
  }
  return da;
}

template <typename T, int MODE, bool TF, bool DS>
IK_INLINE void backward_row(const BackwardStep<T>& a, int64_t i) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t H = a.hidden;
  const Saved<T> sv = a.saved.at_row(i, H);
  T* dh = a.dh + i * H;
  const T* ds = DS ? a.d_states + a.src[i] * H : nullptr;
  T* dgi = a.d_gi + i * 3 * H;
  T* dgh = TF ? nullptr : a.d_gh + i * 3 * H;
  const T at = (MODE == kAgru || MODE == kAugru) ? a.att[i] : T(0);
  T da = T(0);
  const int64_t full = H - H % W;
  for (int64_t j = 0; j < full; j += W) {
    const BackwardUnits<T> u{sv.h + j, sv.r + j, sv.z + j, sv.n + j, sv.x + j, DS ? ds + j : nullptr,
                             dh + j, dgi + j, TF ? nullptr : dgh + j, H};
    da += backward_units<T, MODE, TF, DS>(u, at);
  }
  if (const int64_t rest = H - full; rest > 0) {
    // Zero padding keeps the padded lanes' contribution to da at exactly 0.
    alignas(64) T in[7 * W] = {};  // h, r, z, n, x, ds, dh
    alignas(64) T res[6 * W];      // dgi (3 gates), dgh (3 gates)
    const T* src[7] = {sv.h, sv.r, sv.z, sv.n, sv.x, ds, dh};
    for (int k = 0; k < 7; ++k)
      if (src[k] != nullptr) std::memcpy(in + k * W, src[k] + full, rest * sizeof(T));
    const BackwardUnits<T> u{in, in + W, in + 2 * W, in + 3 * W, in + 4 * W, in + 5 * W,
                             in + 6 * W, res, res + 3 * W, W};
    da += backward_units<T, MODE, TF, DS>(u, at);
    std::memcpy(dh + full, in + 6 * W, rest * sizeof(T));
    for (int g = 0; g < 3; ++g) {
      if (g > 0 || !TF) std::memcpy(dgi + g * H + full, res + g * W, rest * sizeof(T));
      if (!TF) std::memcpy(dgh + g * H + full, res + (3 + g) * W, rest * sizeof(T));
    }
  }
  if (a.d_att != nullptr) a.d_att[i] = da;
}

template <typename T, bool TF, bool DS>
IK_INLINE void backward_block_for(const BackwardStep<T>& a, int64_t begin, int64_t end) {
  switch (a.mode) {
    case kAgru:
      for (int64_t i = begin; i < end; ++i) backward_row<T, kAgru, TF, DS>(a, i);
      break;
    case kAugru:
      for (int64_t i = begin; i < end; ++i) backward_row<T, kAugru, TF, DS>(a, i);
      break;
    default:
      for (int64_t i = begin; i < end; ++i) backward_row<T, kGru, TF, DS>(a, i);
  }
}

template <typename T>
IK_INLINE void backward_block(const BackwardStep<T>& a, int64_t begin, int64_t end) {
  const bool ds = a.d_states != nullptr;
  if (a.tensorflow) {
    ds ? backward_block_for<T, true, true>(a, begin, end) : backward_block_for<T, true, false>(a, begin, end);
  } else {
    ds ? backward_block_for<T, false, true>(a, begin, end) : backward_block_for<T, false, false>(a, begin, end);
  }
}

// Tensorflow variant, second pass: the reset gate acted on h before W_hn, so d(r h) feeds
// both r's pre-activation and dh.
template <typename T>
IK_INLINE void backward_reset_block(const BackwardStep<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.hidden;
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict h = a.saved.h + i * H;
    const T* __restrict r = a.saved.r + i * H;
    const T* __restrict drh = a.d_rh + i * H;
    T* __restrict dh = a.dh + i * H;
    T* __restrict dgi = a.d_gi + i * 3 * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      dgi[j] = drh[j] * h[j] * r[j] * (T(1) - r[j]);
      dh[j] += drh[j] * r[j];
    }
  }
}

// float32 passes compiled for several x86 instruction sets (IK_CLONES, fast_math.h); double
// and other targets use the plain instantiation.

IK_CLONES void forward_block_f32(const ForwardStep<float>& a, int64_t begin, int64_t end) {
  forward_block(a, begin, end);
}
IK_CLONES void forward_reset_block_f32(const ForwardStep<float>& a, float* rh, int64_t stride,
                                       int64_t begin, int64_t end) {
  forward_reset_block(a, rh, stride, begin, end);
}
IK_CLONES void backward_block_f32(const BackwardStep<float>& a, int64_t begin, int64_t end) {
  backward_block(a, begin, end);
}
IK_CLONES void backward_reset_block_f32(const BackwardStep<float>& a, int64_t begin, int64_t end) {
  backward_reset_block(a, begin, end);
}

void run_forward(const ForwardStep<float>& a, int64_t b, int64_t e) { forward_block_f32(a, b, e); }
void run_forward(const ForwardStep<double>& a, int64_t b, int64_t e) { forward_block(a, b, e); }
void run_reset(const ForwardStep<float>& a, float* rh, int64_t st, int64_t b, int64_t e) {
  forward_reset_block_f32(a, rh, st, b, e);
}
void run_reset(const ForwardStep<double>& a, double* rh, int64_t st, int64_t b, int64_t e) {
  forward_reset_block(a, rh, st, b, e);
}
void run_backward(const BackwardStep<float>& a, int64_t b, int64_t e) { backward_block_f32(a, b, e); }
void run_backward(const BackwardStep<double>& a, int64_t b, int64_t e) { backward_block(a, b, e); }
void run_backward_reset(const BackwardStep<float>& a, int64_t b, int64_t e) {
  backward_reset_block_f32(a, b, e);
}
void run_backward_reset(const BackwardStep<double>& a, int64_t b, int64_t e) {
  backward_reset_block(a, b, e);
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

// Packed rows of input projections computed per GEMM: a chunk of consecutive steps whose
// (rows, 3H) block stays in cache until the steps read it (measured 1.6x faster than one
// (N, I) x (I, 3H) GEMM at B 512, T 100, H 36 on one core: the single GEMM's 22 MB output
// goes to memory and back).
constexpr int64_t kProjectionChunkBytes = 1 << 20;

template <typename T>
void forward_scan(const Args& a, const Schedule& sc, const at::Tensor& xp, const at::Tensor& ap,
                  const at::Tensor& b_gi, const at::Tensor& b_hn, const at::Tensor& h_init,
                  at::Tensor& states, at::Tensor& h_last, std::vector<at::Tensor>& workspace) {
  const int64_t H = a.hidden, B = a.batch;
  const auto opts = xp.options();
  const bool keep = !workspace.empty();
  const at::Tensor w_ih_t = a.w_ih.t();
  const at::Tensor w_rz_t = a.w_hh.narrow(0, 0, 2 * H).t();
  const at::Tensor w_hn_t = a.w_hh.narrow(0, 2 * H, H).t();
  const at::Tensor w_hh_t = a.w_hh.t();
  const int64_t chunk_rows = std::max<int64_t>(sc.count[0], kProjectionChunkBytes / (3 * H * sizeof(T)));
  at::Tensor gi = at::empty({std::min(chunk_rows, sc.packed), 3 * H}, opts);
  at::Tensor gh = at::empty({B, a.tensorflow ? 2 * H : 3 * H}, opts);
  at::Tensor gh_n, rh;
  if (a.tensorflow) {
    gh_n = at::empty({B, H}, opts);
    if (!keep) rh = at::empty({B, H}, opts);
  }
  // h_prev rows of each step: in the workspace when kept, else two alternating buffers.
  at::Tensor ping;
  if (keep) {
    workspace[0].narrow(0, 0, sc.count[0]).copy_(h_init.narrow(0, 0, sc.count[0]));
  } else {
    ping = at::empty({2, B, H}, opts);
    ping[0].copy_(h_init);
  }
  T* st = states.numel() > 0 ? states.data_ptr<T>() : nullptr;
  Saved<T> ws;
  if (keep) {
    ws = {workspace[0].data_ptr<T>(), workspace[1].data_ptr<T>(), workspace[2].data_ptr<T>(),
          workspace[3].data_ptr<T>(), workspace[4].data_ptr<T>()};
  }
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const int64_t grain = grain_rows(H);

  const std::vector<int64_t> groups = step_groups(sc, chunk_rows);
  int64_t group = 0, chunk_begin = 0;  // packed rows from chunk_begin have projections in `gi`
  for (int64_t s = 0; s < sc.steps; ++s) {
    const int64_t n = sc.count[s], off = sc.offset[s];
    if (s == groups[group]) {
      chunk_begin = off;
      const int64_t rows = sc.offset[groups[++group]] - off;
      at::Tensor gi_chunk = gi.narrow(0, 0, rows);
      at::mm_out(gi_chunk, xp.narrow(0, off, rows), w_ih_t);
    }
    at::Tensor hp = keep ? workspace[0].narrow(0, off, n) : ping[s % 2].narrow(0, 0, n);
    at::Tensor gh_s = gh.narrow(0, 0, n);
    at::mm_out(gh_s, hp, a.tensorflow ? w_rz_t : w_hh_t);

    ForwardStep<T> f;
    f.hidden = H;
    f.mode = a.mode;
    f.tensorflow = a.tensorflow;
    f.gi = gi.data_ptr<T>() + (off - chunk_begin) * 3 * H;
    f.b_gi = b_gi.data_ptr<T>();
    f.gh = gh.data_ptr<T>();
    f.gh_n = a.tensorflow ? gh_n.data_ptr<T>() : nullptr;
    f.b_hn = b_hn.data_ptr<T>();
    f.att = ap.defined() ? ap.data_ptr<T>() + off : nullptr;
    f.h_prev = hp.data_ptr<T>();
    f.hp_stride = hp.stride(0);
    f.next_count = sc.count[s + 1];
    f.keep = keep;
    if (keep) {
      f.h_next = ws.h + sc.offset[s + 1] * H;
      f.saved = ws.at_row(off, H);
    } else {
      f.h_next = ping[(s + 1) % 2].data_ptr<T>();
    }
    f.hn_stride = H;
    f.states = st;
    f.h_last = h_last.data_ptr<T>();
    f.src = src + off;
    f.perm = sc.perm.data();

    if (a.tensorflow) {
      // r * h_prev, then W_hn (r h): into the workspace's X column when kept.
      T* rh_ptr = keep ? ws.x + off * H : rh.data_ptr<T>();
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_reset(f, rh_ptr, H, b, e); });
      at::Tensor rh_s = keep ? workspace[4].narrow(0, off, n) : rh.narrow(0, 0, n);
      at::Tensor ghn_s = gh_n.narrow(0, 0, n);
      at::mm_out(ghn_s, rh_s, w_hn_t);
    }
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_forward(f, b, e); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_scan_forward(
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
  at::Tensor states = at::empty(return_states ? at::IntArrayRef{B * T, H} : at::IntArrayRef{0}, opts);
  if (return_states) zero_invalid_rows(states, sc);
  std::vector<at::Tensor> workspace;
  for (int k = 0; keep_for_backward && k < 5; ++k) workspace.push_back(at::empty({B * T, H}, opts));

  if (sc.packed > 0) {
    auto [xp, ap] = packed_inputs(a, sc);
    // b_hr and b_hz only ever add to gi's r and z parts; in the tensorflow variant b_hn too.
    at::Tensor b_gi = a.b_ih.defined() ? a.b_ih.clone() : at::zeros({3 * H}, opts);
    at::Tensor b_hn = at::zeros({H}, opts);
    if (a.b_hh.defined()) {
      if (a.tensorflow) {
        b_gi += a.b_hh;
      } else {
        b_gi.narrow(0, 0, 2 * H) += a.b_hh.narrow(0, 0, 2 * H);
        b_hn.copy_(a.b_hh.narrow(0, 2 * H, H));
      }
    }
    const at::Tensor h_sorted = h_init.index_select(0, at::tensor(sc.perm, at::kLong));
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_forward", [&] {
      forward_scan<scalar_t>(a, sc, xp, ap, b_gi, b_hn, h_sorted, states, h_last, workspace);
    });
  }
  if (return_states) states = states.view({B, T, H});
  if (x.scalar_type() != a.cdt) {
    states = states.to(x.scalar_type());
    h_last = h_last.to(x.scalar_type());
  }
  for (int k = 0; !keep_for_backward && k < 5; ++k) workspace.push_back(at::empty({0}, opts));
  return {states, h_last, workspace[0], workspace[1], workspace[2], workspace[3], workspace[4]};
}

// Gradients accumulated by the backward scan (compute dtype); undefined when not wanted.
struct Grads {
  at::Tensor x;        // (B*T, I)
  at::Tensor att;      // packed (N,)
  at::Tensor w_ih, w_hh, b_ih, b_hh;
};

// The reverse scan, a group of steps at a time: the group's gate gradients stay in cache
// while they are folded into the weight, bias and input gradients with GEMMs.
template <typename T>
void backward_scan(const Args& a, const Schedule& sc, const at::Tensor& xp, const at::Tensor& ap,
                   at::TensorList workspace, const at::Tensor& d_states, at::Tensor& dh, Grads& g) {
  const int64_t H = a.hidden;
  const auto opts = xp.options();
  const at::Tensor w_hn = a.w_hh.narrow(0, 2 * H, H);
  const at::Tensor w_rz = a.w_hh.narrow(0, 0, 2 * H);
  const int64_t chunk_rows = std::max<int64_t>(sc.count[0], kProjectionChunkBytes / (3 * H * sizeof(T)));
  const std::vector<int64_t> groups = step_groups(sc, chunk_rows);
  const int64_t buffer_rows = std::min(chunk_rows, sc.packed);
  at::Tensor d_gi = at::empty({buffer_rows, 3 * H}, opts);
  at::Tensor d_gh = a.tensorflow ? at::Tensor() : at::empty({buffer_rows, 3 * H}, opts);
  at::Tensor d_xp = g.x.defined() || (a.mode == kAigru && g.att.defined())
                        ? at::empty({buffer_rows, a.input_size}, opts)
                        : at::Tensor();
  at::Tensor d_rh = a.tensorflow ? at::empty({a.batch, H}, opts) : at::Tensor();
  const Saved<T> ws{workspace[0].data_ptr<T>(), workspace[1].data_ptr<T>(), workspace[2].data_ptr<T>(),
                    workspace[3].data_ptr<T>(), workspace[4].data_ptr<T>()};
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const int64_t grain = grain_rows(H);

  for (int64_t group = static_cast<int64_t>(groups.size()) - 2; group >= 0; --group) {
    const int64_t first = sc.offset[groups[group]];
    const int64_t rows = sc.offset[groups[group + 1]] - first;
    for (int64_t s = groups[group + 1] - 1; s >= groups[group]; --s) {
      const int64_t n = sc.count[s], off = sc.offset[s];
      BackwardStep<T> st;
      st.hidden = H;
      st.mode = a.mode;
      st.tensorflow = a.tensorflow;
      st.saved = ws.at_row(off, H);
      st.att = ap.defined() ? ap.data_ptr<T>() + off : nullptr;
      st.d_states = d_states.defined() ? d_states.data_ptr<T>() : nullptr;
      st.src = src + off;
      st.dh = dh.data_ptr<T>();
      st.d_gi = d_gi.data_ptr<T>() + (off - first) * 3 * H;
      st.d_gh = a.tensorflow ? nullptr : d_gh.data_ptr<T>() + (off - first) * 3 * H;
      st.d_att = g.att.defined() ? g.att.data_ptr<T>() + off : nullptr;
      st.d_rh = a.tensorflow ? d_rh.data_ptr<T>() : nullptr;
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_backward(st, b, e); });
      at::Tensor dh_s = dh.narrow(0, 0, n);
      at::Tensor d_gi_s = d_gi.narrow(0, off - first, n);
      if (a.tensorflow) {
        at::Tensor d_rh_s = d_rh.narrow(0, 0, n);
        at::mm_out(d_rh_s, d_gi_s.narrow(1, 2 * H, H), w_hn);
        at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { run_backward_reset(st, b, e); });
        dh_s.addmm_(d_gi_s.narrow(1, 0, 2 * H), w_rz);
      } else {
        dh_s.addmm_(d_gh.narrow(0, off - first, n), a.w_hh);
      }
    }
    // This group's gate gradients are final: fold them in.
    const at::Tensor dgi = d_gi.narrow(0, 0, rows);
    const at::Tensor h_prev = workspace[0].narrow(0, first, rows);
    if (g.w_ih.defined()) g.w_ih.addmm_(dgi.t(), xp.narrow(0, first, rows));
    if (g.b_ih.defined()) g.b_ih += dgi.sum(0);
    if (a.tensorflow) {
      if (g.w_hh.defined()) {
        g.w_hh.narrow(0, 0, 2 * H).addmm_(dgi.narrow(1, 0, 2 * H).t(), h_prev);
        g.w_hh.narrow(0, 2 * H, H).addmm_(dgi.narrow(1, 2 * H, H).t(), workspace[4].narrow(0, first, rows));
      }
      if (g.b_hh.defined()) g.b_hh += dgi.sum(0);
    } else {
      const at::Tensor dgh = d_gh.narrow(0, 0, rows);
      if (g.w_hh.defined()) g.w_hh.addmm_(dgh.t(), h_prev);
      if (g.b_hh.defined()) g.b_hh += dgh.sum(0);
    }
    if (d_xp.defined()) {
      at::Tensor dxp = d_xp.narrow(0, 0, rows);
      at::mm_out(dxp, dgi, a.w_ih);  // gradient of the (scaled, for aigru) packed inputs
      const at::Tensor idx = sc.src.narrow(0, first, rows);
      if (a.mode == kAigru) {
        if (g.att.defined()) g.att.narrow(0, first, rows).copy_((dxp * a.x.index_select(0, idx)).sum(1));
        dxp.mul_(ap.narrow(0, first, rows).unsqueeze(1));
      }
      if (g.x.defined()) g.x.index_copy_(0, idx, dxp);
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
                  at::TensorList workspace, std::string mode, std::string variant,
                  std::array<bool, 7> needs) {
  const Args a = prepare(x, weight_ih, weight_hh, bias_ih, bias_hh, att, mode, variant);
  const int64_t B = a.batch, T = a.seq_len, H = a.hidden, I = a.input_size;
  const auto opts = x.options().dtype(a.cdt);
  const Schedule sc = make_schedule(B, T, lengths, mask);
  TORCH_CHECK_VALUE(workspace.size() == 5, "workspace must hold the 5 saved tensors");
  for (const at::Tensor& w : workspace) {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == B * T && w.size(1) == H && w.is_contiguous() &&
                          w.scalar_type() == a.cdt,
                      "workspace must come from gru_scan_forward with keep_for_backward");
  }

  const at::Tensor perm = at::tensor(sc.perm, at::kLong);
  at::Tensor dh = grad_h_last.has_value() ? grad_h_last->to(a.cdt).index_select(0, perm).contiguous()
                                          : at::zeros({B, H}, opts);
  at::Tensor d_states;
  if (grad_states.has_value() && grad_states->numel() > 0)
    d_states = grad_states->to(a.cdt).reshape({B * T, H}).contiguous();
  Grads g;
  if (needs[0]) g.x = at::empty({B * T, I}, opts);
  if (needs[1] && a.mode != kGru) g.att = at::zeros({sc.packed}, opts);
  if (needs[3]) g.w_ih = at::zeros({3 * H, I}, opts);
  if (needs[4]) g.w_hh = at::zeros({3 * H, H}, opts);
  if (needs[5]) g.b_ih = at::zeros({3 * H}, opts);
  if (needs[6]) g.b_hh = at::zeros({3 * H}, opts);
  if (sc.packed > 0) {
    auto [xp, ap] = packed_inputs(a, sc);
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_backward", [&] {
      backward_scan<scalar_t>(a, sc, xp, ap, workspace, d_states, dh, g);
    });
  }

  const auto empty = at::empty({0}, x.options());
  const auto out_dtype = x.scalar_type(), param_dtype = weight_ih.scalar_type();
  at::Tensor d_x = empty, d_att = empty, d_h0 = empty;
  if (needs[0]) {
    if (sc.packed == 0) g.x.zero_();
    zero_invalid_rows(g.x, sc);
    d_x = g.x.view({B, T, I}).to(out_dtype);
  }
  if (needs[1]) {
    d_att = at::zeros({B * T}, opts);
    if (g.att.defined()) d_att.index_copy_(0, sc.src, g.att);
    d_att = d_att.view({B, T}).to(out_dtype);
  }
  if (needs[2]) d_h0 = at::empty({B, H}, opts).index_copy_(0, perm, dh).to(out_dtype);
  auto param = [&](const at::Tensor& t) { return t.defined() ? t.to(param_dtype) : empty; };
  return {d_x, d_att, d_h0, param(g.w_ih), param(g.w_hh), param(g.b_ih), param(g.b_hh)};
}

}  // namespace
}  // namespace gru
}  // namespace interest_kernels

TORCH_LIBRARY_FRAGMENT(interest_kernels, m) {
  // The GRU-family scan (SPEC section 2). Returns states (B, T, H) (or (0,) without
  // return_states), h_last (B, H), and the five workspace tensors (B*T, H) in the compute
  // dtype with keep_for_backward (else (0,) each). lengths (B,) int or mask (B, T) bool,
  // not both.
  m.def(
      "gru_scan_forward(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? att, Tensor? h0, Tensor? lengths, Tensor? mask, str mode, "
      "str variant, bool return_states, bool keep_for_backward) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients for (x, att, h0, weight_ih, weight_hh, bias_ih, bias_hh); those not flagged
  // in `needs` come back as empty (0,) tensors.
  m.def(
      "gru_scan_backward(Tensor? grad_states, Tensor? grad_h_last, Tensor x, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? att, Tensor? h0, "
      "Tensor? lengths, Tensor? mask, Tensor[] workspace, str mode, str variant, bool[7] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(interest_kernels, CPU, m) {
  m.impl("gru_scan_forward", &interest_kernels::gru::gru_scan_forward);
  m.impl("gru_scan_backward", &interest_kernels::gru::gru_scan_backward);
}
