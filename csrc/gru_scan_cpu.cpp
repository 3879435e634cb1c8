// Fused CPU kernels for the GRU-family scans (SPEC section 2): gru, aigru, agru, augru,
// variants paper and tensorflow, forward and backward.
//
// Layout. Rows are ordered once, here, by their number of valid steps (longest first), and
// the valid steps of each row are numbered 0, 1, ...; with a mask a row's valid steps are
// its true positions (a masked step leaves h unchanged, so skipping it is exact). The
// sorted rows are cut into blocks of kBlockRows; at step s the rows of a block still
// running are a prefix of it. Packed rows (what the backward's workspace holds) are
// numbered block by block, step by step, row by row. Finished rows and padding cost
// nothing and padding is never read.
//
// Forward: GRU rows are independent, so each block runs all its steps before the next
// (threads take the next block as they finish one), its h in a small buffer that stays
// in L1. Per step, the block's input projections x W_ih^T and W_hh h come from a
// register-blocked product (weights transposed and padded once, read from L1; AVX-512,
// AVX2 or portable vectors, chosen at load time), then one fused pass over the running
// rows computes the gates and the update and writes the output, h_last and what the
// backward needs. No library call and no thread synchronisation per step.
//
// Backward: per block, the steps in reverse: the fused gate backward writes the gate
// gradients of the block's packed rows, dh goes back through W_hh and the input gradient
// through W_ih by the same product; then the block's weight and bias gradients are
// partial sums over its packed rows (transposed products, while they are in cache). The
// partials are added in block order, a wave of blocks at a time, so no sum depends on the
// number of threads.
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

#include "cpu_isa.h"
#include "fast_math.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// tanh through e^{-2|x|}: (1 - e) / (1 + e) with the sign of x.
template <typename T>
IK_INLINE T tanh_(T x) {
  const T e = fast_exp(T(-2) * std::abs(x));
  return std::copysign((T(1) - e) / (T(1) + e), x);
}

IK_INLINE double tanh_(double x) { return std::tanh(x); }

// ---- the schedule -------------------------------------------------------------------------

// Sorted rows are scanned in blocks of this many: a block runs all its steps before the next
// (its state stays in L1), blocks are independent tasks.
constexpr int64_t kBlockRows = 16;

struct Schedule {
  int64_t batch = 0, seq_len = 0, packed = 0, blocks = 0;
  std::vector<int64_t> perm;         // sorted position i -> row b
  std::vector<int64_t> block_base;   // blocks + 1: first packed row of each block, then N
  std::vector<int64_t> block_steps;  // steps of each block (those of its first, longest row)
  std::vector<int64_t> step_start;   // where each block's entries of step_offset begin
  std::vector<int64_t> step_offset;  // per block, steps + 1 entries: packed row of step s
                                     // relative to the block's base (rows running: the difference)
  at::Tensor src;                    // (N,) int64: flat b * T + t of each packed row
  std::vector<uint8_t> valid;        // (B*T): position valid; empty when all are

  int64_t first_row(int64_t block) const { return block * kBlockRows; }
  const int64_t* offsets(int64_t block) const { return step_offset.data() + step_start[block]; }
};

// Zero the rows of `flat` (B*T, C), contiguous, at invalid positions.
void zero_invalid_rows(at::Tensor& flat, const Schedule& sc) {
  if (sc.valid.empty() || flat.numel() == 0) return;
  const int64_t row_bytes = flat.size(1) * flat.element_size(), positions = sc.batch * sc.seq_len;
  char* base = static_cast<char*>(flat.data_ptr());
  for (int64_t p = 0; p < positions;) {  // one memset per run of invalid positions
    if (sc.valid[p]) {
      ++p;
      continue;
    }
    int64_t end = p + 1;
    while (end < positions && !sc.valid[end]) ++end;
    std::memset(base + p * row_bytes, 0, (end - p) * row_bytes);
    p = end;
  }
}

// Valid steps per row from lengths (clamped to [0, T]: value checks may have been skipped)
// or from a mask; rows sorted by that number, longest first, ties in row order; packed rows
// numbered block by block, within a block step by step, within a step in sorted order.
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
  sc.blocks = (batch + kBlockRows - 1) / kBlockRows;
  sc.block_base.assign(sc.blocks + 1, 0);
  sc.block_steps.assign(sc.blocks, 0);
  sc.step_start.assign(sc.blocks, 0);
  for (int64_t k = 0; k < sc.blocks; ++k) {
    const int64_t r0 = sc.first_row(k);
    const int64_t steps = valid[sc.perm[r0]];
    sc.block_steps[k] = steps;
    sc.step_start[k] = static_cast<int64_t>(sc.step_offset.size());
    sc.step_offset.push_back(0);
    int64_t running = std::min(kBlockRows, batch - r0);
    for (int64_t s = 0; s < steps; ++s) {
      while (running > 0 && valid[sc.perm[r0 + running - 1]] <= s) --running;
      sc.step_offset.push_back(sc.step_offset.back() + running);
    }
    sc.block_base[k + 1] = sc.block_base[k] + sc.step_offset.back();
  }
  sc.packed = sc.block_base[sc.blocks];
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
  for (int64_t k = 0; k < sc.blocks; ++k) {
    const int64_t r0 = sc.first_row(k);
    const int64_t* off = sc.offsets(k);
    for (int64_t s = 0; s < sc.block_steps[k]; ++s) {
      for (int64_t i = 0; i < off[s + 1] - off[s]; ++i) {
        const int64_t b = sc.perm[r0 + i];
        const int64_t t = positions.empty() ? s : positions[b * seq_len + s];
        src[sc.block_base[k] + off[s] + i] = b * seq_len + t;
      }
    }
  }
  return sc;
}

// Runs fn(block, t) for blocks [begin, end) on the intra-op threads, t < get_num_threads()
// naming the thread's scratch. Threads take the next block as they finish one (longest
// first): a thread the OS holds back costs at most one block's wait.
template <typename F>
void for_each_block(int64_t begin, int64_t end, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), end - begin));
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = next.fetch_add(1); k < end; k = next.fetch_add(1)) fn(k, t);
  });
}

// Scratch memory the calling thread keeps between calls: a fresh allocation of this size
// is page-faulted in anew on every call (about 1.5 us a page on the 2-core VM).
template <typename T>
T* kept_scratch(int64_t elements) {
  thread_local std::vector<T> memory;
  if (static_cast<int64_t>(memory.size()) < elements) memory.resize(elements);
  return memory.data();
}

IK_INLINE void prefetch_range(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
#endif
}

// ---- register-blocked matrix products ---------------------------------------------------------
//
// C = A B or C += A B for a block's rows: A and C given as row pointers (n of them; A's
// elements k * ka apart, ka = 1 or a transposed operand's row stride), B
// row-major (K, cols) with row stride ldb, `cols` a multiple of the vector width (B and the
// C rows are padded to it; the pad columns of B are zero). Tiles of MR rows x NV vectors stay
// in registers through the K loop; B's tile is reused by all row tiles while in L1. The
// vectors are GCC/Clang vector extensions; instantiated per instruction set below.

#if defined(__GNUC__)
// The vector types only cross calls inside functions compiled for their instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T, int BYTES>
struct Lanes {
#if defined(__GNUC__)
  typedef T V __attribute__((vector_size(BYTES)));
  static constexpr int64_t L = BYTES / sizeof(T);
#else
  using V = T;
  static constexpr int64_t L = 1;
#endif
  static IK_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static IK_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
};

template <typename S, typename T, int MR, int NV, bool ACC>
IK_INLINE void matmul_tile(const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb, T* const* c, int64_t col) {
  using V = typename S::V;
  constexpr int64_t L = S::L;
  V acc[MR][NV];
  const T* ar[MR];
  for (int r = 0; r < MR; ++r) {
    ar[r] = a[r];
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? S::load(c[r] + col + v * L) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b + k * ldb + col;
    for (int v = 0; v < NV; ++v) {
      const V w = S::load(bk + v * L);
      for (int r = 0; r < MR; ++r) acc[r][v] += w * ar[r][k * ka];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) S::store(c[r] + col + v * L, acc[r][v]);
}

// Row tiles of MR, then one of the remaining 1..MR-1 rows.
template <typename S, typename T, int MR, int NV, bool ACC>
IK_INLINE void matmul_rows(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb, T* const* c,
                           int64_t col) {
  int64_t i = 0;
  for (; i + MR <= n; i += MR) matmul_tile<S, T, MR, NV, ACC>(a + i, ka, K, b, ldb, c + i, col);
  if constexpr (MR > 1) {
    if (n - i > 0) matmul_rows<S, T, MR - 1, NV, ACC>(n - i, a + i, ka, K, b, ldb, c + i, col);
  }
}

template <typename S, typename T, int MR, int NV, bool ACC>
IK_INLINE void matmul_width(int64_t nv, int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb,
                            T* const* c, int64_t col) {
  if constexpr (NV > 1) {
    if (nv < NV) return matmul_width<S, T, MR, NV - 1, ACC>(nv, n, a, ka, K, b, ldb, c, col);
  }
  matmul_rows<S, T, MR, NV, ACC>(n, a, ka, K, b, ldb, c, col);
}

template <typename S, typename T, int MR, int NV, bool ACC>
IK_INLINE void matmul(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb, int64_t cols,
                      T* const* c) {
  const int64_t vectors = cols / S::L;
  const int64_t tiles = (vectors + NV - 1) / NV;
  for (int64_t t = 0, v0 = 0; t < tiles; ++t) {
    const int64_t width = (vectors - v0 + tiles - t - 1) / (tiles - t);  // tiles of like widths
    matmul_width<S, T, MR, NV, ACC>(width, n, a, ka, K, b, ldb, c, v0 * S::L);
    v0 += width;
  }
}

template <typename T>
using MatmulFn = void (*)(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb, int64_t cols,
                          T* const* c);

// Portable: 16-byte vectors, 3 x 4 tiles (12 accumulators fit 16 registers).
template <typename T, bool ACC>
void matmul_portable(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b, int64_t ldb, int64_t cols,
                     T* const* c) {
  matmul<Lanes<T, 16>, T, 3, 4, ACC>(n, a, ka, K, b, ldb, cols, c);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define IK_MATMUL_DISPATCH 1
// AVX-512: 4 x 6 tiles of 64-byte vectors (24 of the 32 registers).
template <typename T, bool ACC>
__attribute__((target("avx512f"))) void matmul_avx512(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b,
                                                      int64_t ldb, int64_t cols, T* const* c) {
  matmul<Lanes<T, 64>, T, 4, 6, ACC>(n, a, ka, K, b, ldb, cols, c);
}
// AVX2 + FMA: 3 x 4 tiles of 32-byte vectors.
template <typename T, bool ACC>
__attribute__((target("avx2,fma"))) void matmul_avx2(int64_t n, const T* const* a, int64_t ka, int64_t K, const T* b,
                                                     int64_t ldb, int64_t cols, T* const* c) {
  matmul<Lanes<T, 32>, T, 3, 4, ACC>(n, a, ka, K, b, ldb, cols, c);
}
#endif

// The product for this CPU: C = A B, or C += A B with `accumulate`, on the widest kernels
// simd_isa() allows; the environment variable INTEREST_KERNELS_GRU_MATMUL = avx2 or portable
// caps it further per call (tests run every path).
template <typename T>
MatmulFn<T> pick_matmul(bool accumulate) {
  const char* cap = std::getenv("INTEREST_KERNELS_GRU_MATMUL");
  const std::string limit = cap != nullptr ? cap : "";
#ifdef IK_MATMUL_DISPATCH
  const Isa isa = simd_isa();
  if (isa == Isa::kAvx512 && limit != "avx2" && limit != "portable")
    return accumulate ? matmul_avx512<T, true> : matmul_avx512<T, false>;
  if (isa != Isa::kDefault && limit != "portable")
    return accumulate ? matmul_avx2<T, true> : matmul_avx2<T, false>;
#endif
  return accumulate ? matmul_portable<T, true> : matmul_portable<T, false>;
}

template <typename T>
struct Matmul {
  MatmulFn<T> set = pick_matmul<T>(false);
  MatmulFn<T> add = pick_matmul<T>(true);
};

// Units are processed in blocks of W = one 64-byte line (16 float32, 8 float64): the
// compiler turns a block into straight vector code. Rows of the scan's buffers are padded
// to whole blocks (a multiple of every vector width above too).
template <typename T>
constexpr int64_t kUnitBlock = 64 / sizeof(T);

template <typename T>
int64_t padded(int64_t n) {
  return (n + kUnitBlock<T> - 1) / kUnitBlock<T> * kUnitBlock<T>;
}

// w (rows, K), any strides (a transpose too), zero-padded to a contiguous (rows, cols).
at::Tensor packed_rows(const at::Tensor& w, int64_t cols) {
  at::Tensor out = at::zeros({w.size(0), cols}, w.options());
  out.narrow(1, 0, w.size(1)).copy_(w);
  return out;
}

// ---- per-step gate passes over the running rows of a block ---------------------------------
//
// Each pass is a loop over rows of loops over the H units. The row functions are
// specialised at compile time on mode, variant and what is written, so the unit loops
// hold no branches and vectorise (`omp simd`; the clones below pick the instruction set).

template <typename T>
struct Saved {
  T *h = nullptr, *r = nullptr, *z = nullptr, *n = nullptr, *x = nullptr;
  Saved at_row(int64_t row, int64_t hidden) const {
    const int64_t o = row * hidden;
    return {h + o, r + o, z + o, n + o, x + o};
  }
};
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
    const T r = fast_sigmoid(gi[j] + b[j] + gh[j]);
    const T z = fast_sigmoid(gi[gs + j] + b[gs + j] + gh[gs + j]);
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

// One step of a block's forward: rows 0..n of its buffers.
template <typename T>
struct ForwardGates {
  int64_t hidden, n, n_next;  // rows running at this step, and at the next
  int mode;
  bool tensorflow, keep;
  const T* gi;          // x W_ih^T rows (scaled by the scores for aigru)
  const T* gh;          // W_hh h rows: r, z, n (paper); r, z (tensorflow)
  const T* ghn;         // tensorflow: W_hn (r h) rows
  int64_t stride;       // of the gi, gh and ghn rows
  const T* b_gi;        // (3H) padded: b_ih, plus b_hr and b_hz (tensorflow: all of b_hh)
  const T* b_hn;        // (H) padded: paper's b_hn (zeros without bias_hh)
  const T* h;           // h before the step, rows of stride h_stride
  T* h_next;            // h after it
  T* rh;                // tensorflow: r h rows
  int64_t h_stride;
  const T* att;         // (B*T,) scores, indexed by src; or null
  const int64_t* src;   // this step's flat b * T + t
  Saved<T> saved;       // this step's first saved rows (stride H), when kept
  T* states;            // (B*T, H) or null
  T* h_last;            // (B, H): rows i >= n_next end here, as row perm[i]
  const int64_t* perm;
};

// The last, partial block of units (H % W) reads whole blocks from the padded buffers and
// lands its saved quantities on the stack, copied out from there.
template <typename T, int MODE, bool TF, bool KEEP>
IK_INLINE void forward_row(const ForwardGates<T>& g, int64_t i) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t H = g.hidden;
  const T* gi = g.gi + i * g.stride;
  const T* gh = g.gh + i * g.stride;
  const T* ghn = TF ? g.ghn + i * g.stride : g.b_hn;
  const T* h = g.h + i * g.h_stride;
  T* out = g.h_next + i * g.h_stride;
  const T at = (MODE == kAgru || MODE == kAugru) ? g.att[g.src[i]] : T(0);
  const Saved<T> sv = KEEP ? g.saved.at_row(i, H) : Saved<T>{};
  const int64_t full = H - H % W;
  for (int64_t j = 0; j < full; j += W) {
    const ForwardUnits<T> u{gi + j, g.b_gi + j, gh + j, ghn + j, g.b_hn + j, h + j, H};
    const SavedUnits<T> o = KEEP ? SavedUnits<T>{out + j, sv.h + j, sv.r + j, sv.z + j, sv.n + j, sv.x + j}
                                 : SavedUnits<T>{out + j, nullptr, nullptr, nullptr, nullptr, nullptr};
    forward_units<T, MODE, TF, KEEP>(u, at, o);
  }
  if (const int64_t rest = H - full; rest > 0) {
    alignas(64) T res[5 * W];
    const ForwardUnits<T> u{gi + full, g.b_gi + full, gh + full, ghn + full, g.b_hn + full, h + full, H};
    forward_units<T, MODE, TF, KEEP>(u, at, SavedUnits<T>{out + full, res, res + W, res + 2 * W, res + 3 * W, res + 4 * W});
    if constexpr (KEEP) {
      T* dst[5] = {sv.h, sv.r, sv.z, sv.n, sv.x};
      for (int k = 0; k < 5; ++k) std::memcpy(dst[k] + full, res + k * W, rest * sizeof(T));
    }
  }
  if (g.states != nullptr) std::memcpy(g.states + g.src[i] * H, out, H * sizeof(T));
  if (i >= g.n_next) std::memcpy(g.h_last + g.perm[i] * H, out, H * sizeof(T));
}

template <typename T, bool TF, bool KEEP>
IK_INLINE void forward_rows(const ForwardGates<T>& g) {
  switch (g.mode) {
    case kAgru:
      for (int64_t i = 0; i < g.n; ++i) forward_row<T, kAgru, TF, KEEP>(g, i);
      break;
    case kAugru:
      for (int64_t i = 0; i < g.n; ++i) forward_row<T, kAugru, TF, KEEP>(g, i);
      break;
    default:  // gru, aigru (its projections were scaled by the scores)
      for (int64_t i = 0; i < g.n; ++i) forward_row<T, kGru, TF, KEEP>(g, i);
  }
}

template <typename T>
IK_INLINE void forward_gates(const ForwardGates<T>& g) {
  if (g.tensorflow) {
    g.keep ? forward_rows<T, true, true>(g) : forward_rows<T, true, false>(g);
  } else {
    g.keep ? forward_rows<T, false, true>(g) : forward_rows<T, false, false>(g);
  }
}

// Tensorflow variant, first half: r * h (into `rh`).
template <typename T>
IK_INLINE void forward_reset(const ForwardGates<T>& g) {
  const int64_t H = g.hidden;
  for (int64_t i = 0; i < g.n; ++i) {
    const T* __restrict gi = g.gi + i * g.stride;
    const T* __restrict gh = g.gh + i * g.stride;
    const T* __restrict b = g.b_gi;
    const T* __restrict h = g.h + i * g.h_stride;
    T* __restrict out = g.rh + i * g.h_stride;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) out[j] = fast_sigmoid(gi[j] + b[j] + gh[j]) * h[j];
  }
}

// One block of units of the backward (see forward_units): saved rows in, the incoming dh
// (plus d_states when DS) in, gate gradients and the `direct` part of dh out.
template <typename T>
struct BackwardUnits {
  const T *h, *r, *z, *n, *x, *ds;
  T *dh, *dgi, *dhn;  // dgi: three gates `gs` apart; dhn (paper): r * d_pre_n
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
  T* __restrict dhn = u.dhn;
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
      dhn[j] = d_pre_n * r;
    }
    dh[j] = direct;
  }
  return da;
}

// One step of a block's backward: rows 0..n.
template <typename T>
struct BackwardGates {
  int64_t hidden, n;
  int mode;
  bool tensorflow;
  Saved<T> saved;       // this step's first saved rows (stride H)
  const T* att;         // (B*T,) scores, indexed by src; or null
  const T* d_states;    // (B*T, H) or null
  const int64_t* src;
  T* dh;                // rows of stride dh_stride: in, the gradient at h after the step; out, its direct part
  const T* d_rh;        // tensorflow: d(r h) rows, stride dh_stride
  int64_t dh_stride;
  T* d_gi;              // rows (3H): gradients of the gates' pre-activations
  T* d_hn;              // paper: rows (H) r d_pre_n, the gradient of W_hn h + b_hn
  T* d_att;             // this step's packed entries, or null
};

template <typename T, int MODE, bool TF, bool DS>
IK_INLINE void backward_row(const BackwardGates<T>& g, int64_t i) {
  constexpr int64_t W = kUnitBlock<T>;
  const int64_t H = g.hidden;
  const Saved<T> sv = g.saved.at_row(i, H);
  T* dh = g.dh + i * g.dh_stride;
  const T* ds = DS ? g.d_states + g.src[i] * H : nullptr;
  T* dgi = g.d_gi + i * 3 * H;
  T* dhn = TF ? nullptr : g.d_hn + i * H;
  const T at = (MODE == kAgru || MODE == kAugru) ? g.att[g.src[i]] : T(0);
  T da = T(0);
  const int64_t full = H - H % W;
  for (int64_t j = 0; j < full; j += W) {
    const BackwardUnits<T> u{sv.h + j, sv.r + j, sv.z + j, sv.n + j, sv.x + j, DS ? ds + j : nullptr,
                             dh + j, dgi + j, TF ? nullptr : dhn + j, H};
    da += backward_units<T, MODE, TF, DS>(u, at);
  }
  if (const int64_t rest = H - full; rest > 0) {
    // Zero padding keeps the padded lanes' contribution to da at exactly 0.
    alignas(64) T in[7 * W] = {};  // h, r, z, n, x, ds, dh
    alignas(64) T res[4 * W];      // dgi (3 gates), dhn
    const T* src[7] = {sv.h, sv.r, sv.z, sv.n, sv.x, ds, dh};
    for (int k = 0; k < 7; ++k)
      if (src[k] != nullptr) std::memcpy(in + k * W, src[k] + full, rest * sizeof(T));
    const BackwardUnits<T> u{in, in + W, in + 2 * W, in + 3 * W, in + 4 * W, in + 5 * W,
                             in + 6 * W, res, res + 3 * W, W};
    da += backward_units<T, MODE, TF, DS>(u, at);
    std::memcpy(dh + full, in + 6 * W, rest * sizeof(T));
    for (int k = 0; k < 3; ++k)
      if (k > 0 || !TF) std::memcpy(dgi + k * H + full, res + k * W, rest * sizeof(T));
    if (!TF) std::memcpy(dhn + full, res + 3 * W, rest * sizeof(T));
  }
  if (g.d_att != nullptr) g.d_att[i] = da;
}

template <typename T, bool TF, bool DS>
IK_INLINE void backward_rows(const BackwardGates<T>& g) {
  switch (g.mode) {
    case kAgru:
      for (int64_t i = 0; i < g.n; ++i) backward_row<T, kAgru, TF, DS>(g, i);
      break;
    case kAugru:
      for (int64_t i = 0; i < g.n; ++i) backward_row<T, kAugru, TF, DS>(g, i);
      break;
    default:
      for (int64_t i = 0; i < g.n; ++i) backward_row<T, kGru, TF, DS>(g, i);
  }
}

template <typename T>
IK_INLINE void backward_gates(const BackwardGates<T>& g) {
  const bool ds = g.d_states != nullptr;
  if (g.tensorflow) {
    ds ? backward_rows<T, true, true>(g) : backward_rows<T, true, false>(g);
  } else {
    ds ? backward_rows<T, false, true>(g) : backward_rows<T, false, false>(g);
  }
}

// Tensorflow variant, second pass: the reset gate acted on h before W_hn, so d(r h) feeds
// both r's pre-activation and dh.
template <typename T>
IK_INLINE void backward_reset(const BackwardGates<T>& g) {
  const int64_t H = g.hidden;
  for (int64_t i = 0; i < g.n; ++i) {
    const T* __restrict h = g.saved.h + i * H;
    const T* __restrict r = g.saved.r + i * H;
    const T* __restrict drh = g.d_rh + i * g.dh_stride;
    T* __restrict dh = g.dh + i * g.dh_stride;
    T* __restrict dgi = g.d_gi + i * 3 * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      dgi[j] = drh[j] * h[j] * r[j] * (T(1) - r[j]);
      dh[j] += drh[j] * r[j];
    }
  }
}

// float32 passes compiled for several x86 instruction sets (IK_CLONES, fast_math.h); double
// and other targets use the plain instantiation.

IK_CLONES void forward_gates_f32(const ForwardGates<float>& g) { forward_gates(g); }
IK_CLONES void forward_reset_f32(const ForwardGates<float>& g) { forward_reset(g); }
IK_CLONES void backward_gates_f32(const BackwardGates<float>& g) { backward_gates(g); }
IK_CLONES void backward_reset_f32(const BackwardGates<float>& g) { backward_reset(g); }

void run_gates(const ForwardGates<float>& g) { forward_gates_f32(g); }
void run_gates(const ForwardGates<double>& g) { forward_gates(g); }
void run_reset(const ForwardGates<float>& g) { forward_reset_f32(g); }
void run_reset(const ForwardGates<double>& g) { forward_reset(g); }
void run_gates(const BackwardGates<float>& g) { backward_gates_f32(g); }
void run_gates(const BackwardGates<double>& g) { backward_gates(g); }
void run_reset(const BackwardGates<float>& g) { backward_reset_f32(g); }
void run_reset(const BackwardGates<double>& g) { backward_reset(g); }

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

// The forward, block by block: per step, the block's input projections and W_hh h by the
// register-blocked products into small row buffers, then the gate pass. Weights are
// transposed and zero-padded once: (I, 3H) and (H, 3H) (tensorflow: (H, 2H) and (H, H)).
template <typename T>
void forward_scan(const Args& a, const Schedule& sc, const at::Tensor& b_gi, const at::Tensor& b_hn,
                  const at::Tensor& h_sorted, at::Tensor& states, at::Tensor& h_last,
                  std::vector<at::Tensor>& workspace) {
  const int64_t H = a.hidden, I = a.input_size, R = kBlockRows;
  const bool tf = a.tensorflow, keep = !workspace.empty();
  const int64_t hp = padded<T>(H), cols = padded<T>(3 * H), rz_cols = padded<T>(2 * H);
  const int64_t stride = cols + kUnitBlock<T>;  // room for the partial unit block's reads
  const at::Tensor w_ih_t = packed_rows(a.w_ih.t(), cols);
  const at::Tensor w_hh_t = tf ? packed_rows(a.w_hh.narrow(0, 0, 2 * H).t(), rz_cols)
                               : packed_rows(a.w_hh.t(), cols);
  const at::Tensor w_hn_t = tf ? packed_rows(a.w_hh.narrow(0, 2 * H, H).t(), hp) : w_hh_t;
  const T* w_ih_p = w_ih_t.data_ptr<T>();
  const T* w_hh_p = w_hh_t.data_ptr<T>();
  const T* w_hn_p = w_hn_t.data_ptr<T>();
  const Matmul<T> mm;
  const T* x = a.x.data_ptr<T>();
  const T* att = a.att.defined() ? a.att.data_ptr<T>() : nullptr;
  Saved<T> ws;
  if (keep) {
    ws = {workspace[0].data_ptr<T>(), workspace[1].data_ptr<T>(), workspace[2].data_ptr<T>(),
          workspace[3].data_ptr<T>(), workspace[4].data_ptr<T>()};
  }
  T* st = states.numel() > 0 ? states.data_ptr<T>() : nullptr;
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const T* h_init = h_sorted.data_ptr<T>();
  T* h_out = h_last.data_ptr<T>();

  const int64_t per_thread = R * (3 * hp + 3 * stride);
  T* scratch = kept_scratch<T>(std::max<int64_t>(1, at::get_num_threads()) * per_thread);
  for_each_block(0, sc.blocks, [&](int64_t k, int64_t thread) {
    T* h_cur = scratch + thread * per_thread;
    T* h_new = h_cur + R * hp;
    T* rh = h_new + R * hp;
    T* gi = rh + R * hp;
    T* gh = gi + R * stride;
    T* ghn = gh + R * stride;
    const T* a_x[R];
    const T* a_h[R];
    const T* a_rh[R];
    T* c_gi[R];
    T* c_gh[R];
    T* c_ghn[R];
    for (int64_t i = 0; i < R; ++i) {
      a_rh[i] = rh + i * hp;
      c_gi[i] = gi + i * stride;
      c_gh[i] = gh + i * stride;
      c_ghn[i] = ghn + i * stride;
    }
    const int64_t r0 = sc.first_row(k);
    for (int64_t i = 0; i < std::min(R, a.batch - r0); ++i)
      std::memcpy(h_cur + i * hp, h_init + (r0 + i) * H, H * sizeof(T));
    const int64_t* off = sc.offsets(k);
    const int64_t steps = sc.block_steps[k];
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t n = off[s + 1] - off[s], p0 = sc.block_base[k] + off[s];
      for (int64_t i = 0; i < n; ++i) {
        a_x[i] = x + src[p0 + i] * I;
        a_h[i] = h_cur + i * hp;
      }
      // The next step's input rows (one per row, T apart) are not in cache yet.
      for (int64_t i = 0; s + 1 < steps && i < off[s + 2] - off[s + 1]; ++i)
        prefetch_range(x + src[p0 + n + i] * I, I * sizeof(T));
      mm.set(n, a_x, 1, I, w_ih_p, cols, cols, c_gi);
      if (a.mode == kAigru) {
        for (int64_t i = 0; i < n; ++i) {
          const T score = att[src[p0 + i]];
          for (int64_t j = 0; j < 3 * H; ++j) c_gi[i][j] *= score;
        }
      }
      ForwardGates<T> g;
      g.hidden = H;
      g.n = n;
      g.n_next = s + 1 < steps ? off[s + 2] - off[s + 1] : 0;
      g.mode = a.mode;
      g.tensorflow = tf;
      g.keep = keep;
      g.gi = gi;
      g.gh = gh;
      g.ghn = ghn;
      g.stride = stride;
      g.b_gi = b_gi.data_ptr<T>();
      g.b_hn = b_hn.data_ptr<T>();
      g.h = h_cur;
      g.h_next = h_new;
      g.rh = rh;
      g.h_stride = hp;
      g.att = att;
      g.src = src + p0;
      g.saved = keep ? ws.at_row(p0, H) : Saved<T>{};
      g.states = st;
      g.h_last = h_out;
      g.perm = sc.perm.data() + r0;
      if (tf) {
        mm.set(n, a_h, 1, H, w_hh_p, rz_cols, rz_cols, c_gh);
        run_reset(g);
        mm.set(n, a_rh, 1, H, w_hn_p, hp, hp, c_ghn);
      } else {
        mm.set(n, a_h, 1, H, w_hh_p, cols, cols, c_gh);
      }
      run_gates(g);
      std::swap(h_cur, h_new);
    }
  });
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
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_forward", [&] {
      // b_hr and b_hz only ever add to gi's r and z parts; in the tensorflow variant b_hn
      // too. Both padded for the gate passes' whole-block reads.
      at::Tensor b_gi = at::zeros({padded<scalar_t>(3 * H) + kUnitBlock<scalar_t>}, opts);
      at::Tensor b_hn = at::zeros({padded<scalar_t>(H)}, opts);
      if (a.b_ih.defined()) b_gi.narrow(0, 0, 3 * H).copy_(a.b_ih);
      if (a.b_hh.defined()) {
        if (a.tensorflow) {
          b_gi.narrow(0, 0, 3 * H) += a.b_hh;
        } else {
          b_gi.narrow(0, 0, 2 * H) += a.b_hh.narrow(0, 0, 2 * H);
          b_hn.narrow(0, 0, H).copy_(a.b_hh.narrow(0, 2 * H, H));
        }
      }
      const at::Tensor h_sorted = h_init.index_select(0, at::tensor(sc.perm, at::kLong));
      forward_scan<scalar_t>(a, sc, b_gi, b_hn, h_sorted, states, h_last, workspace);
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

// Gradients the backward scan writes (compute dtype); undefined when not wanted.
struct Grads {
  at::Tensor x;        // (B*T, I)
  at::Tensor att;      // packed (N,)
  at::Tensor w_ih, w_hh, b_ih, b_hh;
};

// Blocks are folded into the weight and bias gradients a wave of kWaveBlocks at a time:
// each block's partial sums come from transposed products over its packed rows (while its
// gate gradients are in cache), then the wave's partials are added in block order. Waves
// are fixed by the schedule, so no sum depends on the number of threads.
constexpr int64_t kWaveBlocks = 8;

// The reverse scan, block by block: per step (last first) the gate pass, then dh through
// W_hh and the input gradient through W_ih by the register-blocked product.
template <typename T>
void backward_scan(const Args& a, const Schedule& sc, at::TensorList workspace,
                   const at::Tensor& d_states, at::Tensor& dh, Grads& g) {
  const int64_t H = a.hidden, I = a.input_size, R = kBlockRows;
  const bool tf = a.tensorflow, aigru = a.mode == kAigru;
  const int64_t hp = padded<T>(H), ip = padded<T>(I), cols = padded<T>(3 * H), rz_cols = padded<T>(2 * H);
  const int64_t hh_cols = rz_cols + hp;  // W_rz^T, then W_hn^T
  const at::Tensor w_hh_rows = packed_rows(a.w_hh, hp);
  const at::Tensor w_ih_rows = packed_rows(a.w_ih, ip);
  const T* w_hh_p = w_hh_rows.data_ptr<T>();
  const T* w_ih_p = w_ih_rows.data_ptr<T>();
  const Matmul<T> mm;
  const bool want_dx = g.x.defined() || (aigru && g.att.defined());
  // Partial sums of one block: W_ih^T (I, cols), W_hh^T (H, hh_cols), b_ih (cols), b_hn (hp).
  const int64_t part_ih = 0, part_hh = I * cols, part_bih = part_hh + H * hh_cols, part_bhh = part_bih + cols;
  const int64_t part = part_bhh + hp;
  std::vector<T> total(part, T(0));
  // Per thread: the gate gradients of a block's packed rows (d_gi (3H), d_hn (H), each with
  // one more row plus a block of units for whole-vector reads past the last), its packed
  // inputs (scaled for aigru), dh, d(r h), dx rows; then the wave's partial sums.
  int64_t block_max = 0;
  for (int64_t k = 0; k < sc.blocks; ++k) block_max = std::max(block_max, sc.block_base[k + 1] - sc.block_base[k]);
  const int64_t gi_rows = (block_max + 1) * 3 * H + kUnitBlock<T>, hn_rows = (block_max + 1) * H + kUnitBlock<T>;
  const int64_t per_thread = gi_rows + hn_rows + block_max * I + 2 * R * hp + R * ip;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  T* scratch = kept_scratch<T>(threads * per_thread + kWaveBlocks * part);
  T* partials = scratch + threads * per_thread;
  const int64_t wide = std::max({R, I, H, int64_t(1)});
  std::vector<const T*> operand(threads * wide);
  std::vector<T*> result(threads * wide);
  const T one = T(1);

  const Saved<T> ws{workspace[0].data_ptr<T>(), workspace[1].data_ptr<T>(), workspace[2].data_ptr<T>(),
                    workspace[3].data_ptr<T>(), workspace[4].data_ptr<T>()};
  const int64_t* src = sc.src.data_ptr<int64_t>();
  const T* x = a.x.data_ptr<T>();
  const T* att = a.att.defined() ? a.att.data_ptr<T>() : nullptr;
  const T* ds = d_states.defined() ? d_states.data_ptr<T>() : nullptr;
  T* d_att = g.att.defined() ? g.att.data_ptr<T>() : nullptr;
  T* d_x = g.x.defined() ? g.x.data_ptr<T>() : nullptr;
  T* dh_rows = dh.data_ptr<T>();

  auto block = [&](int64_t k, int64_t thread, T* sums) {
    T* d_gi = scratch + thread * per_thread;
    T* d_hn = d_gi + gi_rows;
    T* x_b = d_hn + hn_rows;
    T* dh_b = x_b + block_max * I;
    T* d_rh = dh_b + R * hp;
    T* dx = d_rh + R * hp;
    const T** a_ptr = operand.data() + thread * wide;
    T** c_ptr = result.data() + thread * wide;
    const int64_t r0 = sc.first_row(k), block_rows = std::min(R, a.batch - r0), base = sc.block_base[k];
    const int64_t block_row_count = sc.block_base[k + 1] - base;
    for (int64_t i = 0; i < block_rows; ++i) std::memcpy(dh_b + i * hp, dh_rows + (r0 + i) * H, H * sizeof(T));
    const int64_t* off = sc.offsets(k);
    for (int64_t s = sc.block_steps[k] - 1; s >= 0; --s) {
      const int64_t n = off[s + 1] - off[s], p0 = base + off[s];
      BackwardGates<T> bg;
      bg.hidden = H;
      bg.n = n;
      bg.mode = a.mode;
      bg.tensorflow = tf;
      bg.saved = ws.at_row(p0, H);
      bg.att = att;
      bg.d_states = ds;
      bg.src = src + p0;
      bg.dh = dh_b;
      bg.d_rh = d_rh;
      bg.dh_stride = hp;
      bg.d_gi = d_gi + off[s] * 3 * H;
      bg.d_hn = d_hn + off[s] * H;
      bg.d_att = d_att != nullptr ? d_att + p0 : nullptr;
      if (s > 0) {  // the next step's saved rows (the walk runs against memory order), d_states rows
        const int64_t prev = base + off[s - 1], rows_prev = off[s] - off[s - 1];
        for (T* saved : {ws.h, ws.r, ws.z, ws.n, ws.x}) prefetch_range(saved + prev * H, rows_prev * H * sizeof(T));
        for (int64_t i = 0; ds != nullptr && i < rows_prev; ++i) prefetch_range(ds + src[prev + i] * H, H * sizeof(T));
      }
      run_gates(bg);
      if (tf) {
        for (int64_t i = 0; i < n; ++i) {
          a_ptr[i] = bg.d_gi + i * 3 * H + 2 * H;
          c_ptr[i] = d_rh + i * hp;
        }
        mm.set(n, a_ptr, 1, H, w_hh_p + 2 * H * hp, hp, hp, c_ptr);
        run_reset(bg);
      }
      for (int64_t i = 0; i < n; ++i) {
        a_ptr[i] = bg.d_gi + i * 3 * H;
        c_ptr[i] = dh_b + i * hp;
      }
      mm.add(n, a_ptr, 1, 2 * H, w_hh_p, hp, hp, c_ptr);  // through W_hr, W_hz
      if (!tf) {  // through W_hn
        for (int64_t i = 0; i < n; ++i) a_ptr[i] = bg.d_hn + i * H;
        mm.add(n, a_ptr, 1, H, w_hh_p + 2 * H * hp, hp, hp, c_ptr);
      }
      if (want_dx) {
        for (int64_t i = 0; i < n; ++i) {
          a_ptr[i] = bg.d_gi + i * 3 * H;
          c_ptr[i] = dx + i * ip;
        }
        mm.set(n, a_ptr, 1, 3 * H, w_ih_p, ip, ip, c_ptr);
        for (int64_t i = 0; i < n; ++i) {
          T* row = dx + i * ip;
          const int64_t flat = src[p0 + i];
          if (aigru) {  // the scaled input's gradient gives the score's, then the input's
            const T score = att[flat];
            T dot = T(0);
            for (int64_t j = 0; j < I; ++j) dot += row[j] * x[flat * I + j];
            if (d_att != nullptr) d_att[p0 + i] = dot;
            for (int64_t j = 0; j < I; ++j) row[j] *= score;
          }
          if (d_x != nullptr) std::memcpy(d_x + flat * I, row, I * sizeof(T));
        }
      }
    }
    for (int64_t i = 0; i < block_rows; ++i) std::memcpy(dh_rows + (r0 + i) * H, dh_b + i * hp, H * sizeof(T));
    // The block's partial sums over its packed rows: W^T partials = (inputs)^T (gate
    // gradients), the inputs' rows `width` long (so ka = width walks a column of them).
    auto transposed = [&](const T* rows_base, int64_t width, const T* grads, int64_t grad_stride,
                          int64_t grad_cols, T* out, int64_t out_stride) {
      for (int64_t r = 0; r < width; ++r) {
        a_ptr[r] = rows_base + r;
        c_ptr[r] = out + r * out_stride;
      }
      mm.set(width, a_ptr, width, block_row_count, grads, grad_stride, grad_cols, c_ptr);
    };
    if (g.w_ih.defined()) {
      for (int64_t q = 0; q < block_row_count; ++q) {
        const int64_t flat = src[base + q];
        const T scale = aigru ? att[flat] : T(1);
        for (int64_t j = 0; j < I; ++j) x_b[q * I + j] = x[flat * I + j] * scale;
      }
      transposed(x_b, I, d_gi, 3 * H, cols, sums + part_ih, cols);
    }
    if (g.w_hh.defined()) {
      transposed(ws.h + base * H, H, d_gi, 3 * H, rz_cols, sums + part_hh, hh_cols);
      if (tf) {
        transposed(ws.x + base * H, H, d_gi + 2 * H, 3 * H, hp, sums + part_hh + rz_cols, hh_cols);
      } else {
        transposed(ws.h + base * H, H, d_hn, H, hp, sums + part_hh + rz_cols, hh_cols);
      }
    }
    auto column_sums = [&](const T* grads, int64_t grad_stride, int64_t grad_cols, T* out) {
      a_ptr[0] = &one;
      c_ptr[0] = out;
      mm.set(1, a_ptr, 0, block_row_count, grads, grad_stride, grad_cols, c_ptr);
    };
    if (g.b_ih.defined() || g.b_hh.defined()) column_sums(d_gi, 3 * H, cols, sums + part_bih);
    if (!tf && g.b_hh.defined()) column_sums(d_hn, H, hp, sums + part_bhh);
  };

  for (int64_t w0 = 0; w0 < sc.blocks; w0 += kWaveBlocks) {
    const int64_t w1 = std::min(sc.blocks, w0 + kWaveBlocks);
    for_each_block(w0, w1, [&](int64_t k, int64_t thread) { block(k, thread, partials + (k - w0) * part); });
    for (int64_t k = w0; k < w1; ++k) {
      const T* p = partials + (k - w0) * part;
      for (int64_t j = 0; j < part; ++j) total[j] += p[j];
    }
  }
  const auto as_tensor = [&](int64_t offset, int64_t rows, int64_t stride) {
    return at::from_blob(total.data() + offset, {rows, stride}, dh.options());
  };
  if (g.w_ih.defined()) g.w_ih.copy_(as_tensor(part_ih, I, cols).narrow(1, 0, 3 * H).t());
  if (g.w_hh.defined()) {
    const at::Tensor hh = as_tensor(part_hh, H, hh_cols);
    g.w_hh.narrow(0, 0, 2 * H).copy_(hh.narrow(1, 0, 2 * H).t());
    g.w_hh.narrow(0, 2 * H, H).copy_(hh.narrow(1, rz_cols, H).t());
  }
  // b_hr, b_hz add where b_ir, b_iz do (and all of b_hh in the tensorflow variant).
  const at::Tensor b_sums = as_tensor(part_bih, 1, cols).narrow(1, 0, 3 * H).squeeze(0);
  if (g.b_ih.defined()) g.b_ih.copy_(b_sums);
  if (g.b_hh.defined()) {
    g.b_hh.copy_(b_sums);
    if (!tf) g.b_hh.narrow(0, 2 * H, H).copy_(as_tensor(part_bhh, 1, hp).narrow(1, 0, H).squeeze(0));
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

  TORCH_CHECK_VALUE(!grad_h_last.has_value() || grad_h_last->sizes() == at::IntArrayRef({B, H}),
                    "grad_h_last must have shape (B, H) = (", B, ", ", H, "), got ",
                    grad_h_last.has_value() ? grad_h_last->sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(!grad_states.has_value() || grad_states->numel() == 0 ||
                        grad_states->sizes() == at::IntArrayRef({B, T, H}),
                    "grad_states must have shape (B, T, H) = (", B, ", ", T, ", ", H, ") or be empty, got ",
                    grad_states.has_value() ? grad_states->sizes() : at::IntArrayRef{});

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
    AT_DISPATCH_FLOATING_TYPES(a.cdt, "gru_scan_backward", [&] {
      backward_scan<scalar_t>(a, sc, workspace, d_states, dh, g);
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
