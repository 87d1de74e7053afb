// One AltLoRA / AltLoRA+ phase on the CPU for every layer of every group, in one call
// (the `native` backend; loaded by altlora_kernels/native_phase_update.py).
//
// The specification is altlora_kernels/phase_update.py (the torch backend): its docstring holds
// the math in row form, the bookkeeping and the found_inf semantics. This file computes the same
// thing, arranged so that every element of a factor is read and written once. With X the
// updated factor in row form (r × n), P = (Y Yᵀ + λI)⁻¹ and C_Y the cached cross-Gram:
//
//     S = (1/s²)·P,   K = β1·P·C_Y                  r×r per layer, formed in double
//     g̃ = S·∇X,       M ← K·M + (1−β1)·g̃             two r×r-by-r×n products, in fp32
//
// which is the phase's g̃ = (1/s²)·P·∇X, M = β1·(P·C_Y·M) + (1−β1)·g̃. P is formed from the
// damped Cholesky factor (damped_cholesky.h), never from an inverse of the raw Gram.
//
// Three steps per layer:
//   1. damped Cholesky of the other factor's Gram, then S and K;
//   2. the column sweep over X, ∇X, M (V, snapshot), element-wise work in fp32, results written
//      back in the stored dtype, and partial sums of X_new·X_newᵀ and X_new·X_refᵀ taken of the
//      values actually stored (after rounding), X_ref = old X or the snapshot. Two forms:
//      - column form (B stored (k, r), r ∈ {8, 16, 32, 64}): one column of the row form is r
//        contiguous values; each column is updated with r-wide vector work, and G, C grow by
//        outer products (update_columns);
//      - tile form (everything else, e.g. A stored (r, d)): tiles of r rows × a few dozen
//        columns converted to fp32 (fp32 ∇X and M with contiguous rows are read in place),
//        updated with column-wide vector work (update_chunk);
//   3. gram and cross from the partial sums, other_cross ← other_gram, n ← n + 1.
// Work items go to threads by a static longest-first balance of their sizes (layers of mixed
// shapes are common). With many layers an item is a whole layer (1–3 in sequence, one parallel
// region per call); with few layers the steps run as three passes over all layers, step 2 over
// (layer, chunk) items, so that a handful of large layers still uses every thread.
// found_inf != 0 returns before anything is written, so every output keeps its old value.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <ostream>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "damped_cholesky.h"
#include "nonfinite.h"
#include "phase_update.h"
#include "stage_clock.h"
#include "step_plan.h"

namespace altlora_native {
namespace {

// Elements (rank × tile columns) of one fp32 tile array: 4 KiB (more at ranks above 16, see
// kMinTileCols), so that the eight arrays of a tile stay in L1/L2 while the r×r products sweep
// them r times.
constexpr int64_t kTileElements = 1024;
// Columns one register block of the tile products covers (two AVX2 vectors); tile widths are
// multiples of it, and a partial last tile is zero-padded up to it.
constexpr int64_t kLanes = 16;
// Fewest columns of a tile: at large ranks kTileElements / r would leave the Gram's dot products
// one or two vectors long per tile.
constexpr int64_t kMinTileCols = 64;
// Rows one register block covers: kRowBlock × kLanes fp32 accumulators (8 AVX2 registers) hide
// the FMA latency and reuse every loaded vector kRowBlock times.
constexpr int64_t kRowBlock = 4;
// Elements of one layer handled by one work item when layers are split (few, large layers):
// enough to amortize scheduling, small enough that a few large layers spread over every thread.
constexpr int64_t kChunkElements = 16384;
// Least work (elements, or flops for r×r work) that justifies waking one more thread: a parallel
// region costs microseconds when the machine is idle and much more when its cores are shared.
constexpr int64_t kMinWorkPerThread = 16384;
// With at least this many layers per thread, a work item is a whole layer and the call needs one
// parallel region; below it, layers are split into column chunks and the call needs three.
constexpr int64_t kLayersPerThreadUnsplit = 4;


// A matrix in row form: element (i, j) at data[i * row_stride + j * col_stride].
template <typename T>
struct RowForm {
  T* data;
  int64_t row_stride;
  int64_t col_stride;
};

// Layer `layer` of a stacked (L, d0, d1) buffer, or a 2-D tensor, seen in row form.
template <typename T>
RowForm<T> row_form(const at::Tensor& t, int64_t layer, bool transposed) {
  const int64_t base = t.dim() == 3 ? layer * t.stride(0) : 0;
  const int64_t s0 = t.stride(t.dim() - 2);
  const int64_t s1 = t.stride(t.dim() - 1);
  T* data = static_cast<T*>(t.data_ptr()) + base;
  return transposed ? RowForm<T>{data, s1, s0} : RowForm<T>{data, s0, s1};
}

template <typename T>
T& element(const at::Tensor& vec, int64_t i) {
  return static_cast<T*>(vec.data_ptr())[i * vec.stride(0)];
}


// ------------------------------------------------------------------ input checks

// An argument's name for messages: groups[group].name[index], group and index −1 when absent.
// The message is only assembled on failure: these checks run for every tensor of every call.
struct ArgName {
  int64_t group;
  const char* name;
  int64_t index;
};

std::ostream& operator<<(std::ostream& out, const ArgName& a) {
  if (a.group >= 0) out << "groups[" << a.group << "].";
  out << a.name;
  if (a.index >= 0) out << "[" << a.index << "]";
  return out;
}

void check_tensor(const at::Tensor& t, const ArgName& where, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), where, " is missing");
  TORCH_CHECK_VALUE(t.device().is_cpu(), where, " is on ", t.device(), "; backend='native' runs on the CPU only");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, where, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, where, " must have shape ", shape, ", got ", t.sizes());
}

bool is_parameter_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// ------------------------------------------------------------------ step 1: S and K per layer

void prepare_layer(Group& g, int64_t l, const HyperParams& hp, const DampingPolicy& policy, std::vector<double>& work) {
  const int64_t r = g.rank;
  work.resize(6 * r * r);
  double* gram = work.data();
  double* cross = gram + r * r;
  double* lower = cross + r * r;
  double* inv_lower = lower + r * r;
  double* inverse = inv_lower + r * r;
  const auto G = row_form<const float>(g.other_gram, l, false);
  const auto C = row_form<const float>(g.other_cross, l, false);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      gram[i * r + j] = G.data[i * G.row_stride + j * G.col_stride];
      cross[i * r + j] = C.data[i * C.row_stride + j * C.col_stride];
    }
  }
  damped_cholesky(gram, r, hp.damping, policy, lower);
  inverse_from_cholesky(lower, r, inv_lower, inverse);

  const double inv_scale_sq = element<float>(g.inv_scale_sq, l);
  float* S = g.coefficient_matrices(l);
  float* K = S + r * r;
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double carried = 0.0;
      for (int64_t k = 0; k < r; ++k) carried += inverse[i * r + k] * cross[k * r + j];
      S[i * r + j] = static_cast<float>(inv_scale_sq * inverse[i * r + j]);
      K[i * r + j] = static_cast<float>(hp.beta1 * carried);
    }
  }
}

// ------------------------------------------------------------------ step 2: the column sweep

// Row-major r × width tiles with leading dimension `ld`, all fp32.
// Also the per-lane double sums of the Gram and cross-Gram of the chunk in progress (zero
// between chunks).
struct Tile {
  Tile(int64_t elements, int64_t max_rank)
      : storage(8 * elements), gram_lanes(max_rank * max_rank * kLanes, 0.0), cross_lanes(gram_lanes.size(), 0.0) {
    float* p = storage.data();
    for (float** a : {&x_old, &grad, &m_old, &m_new, &scaled_grad, &variance, &x_new, &reference}) {
      *a = p;
      p += elements;
    }
  }
  std::vector<float> storage;
  float *x_old, *grad, *m_old, *m_new, *scaled_grad, *variance, *x_new, *reference;
  std::vector<double> gram_lanes, cross_lanes;
};

template <typename src_t>
void load_tile(RowForm<const src_t> m, int64_t r, int64_t j0, int64_t width, float* dst, int64_t ld) {
  if (m.col_stride == 1) {
    for (int64_t i = 0; i < r; ++i) {
      const src_t* src = m.data + i * m.row_stride + j0;
      float* out = dst + i * ld;
#pragma omp simd
      for (int64_t t = 0; t < width; ++t) out[t] = static_cast<float>(src[t]);
    }
  } else {
    // Columns contiguous (B stored (k, r)): walk memory in order, transpose into the tile.
    for (int64_t t = 0; t < width; ++t) {
      const src_t* src = m.data + (j0 + t) * m.col_stride;
      for (int64_t i = 0; i < r; ++i) dst[i * ld + t] = static_cast<float>(src[i * m.row_stride]);
    }
  }
}

// Values in `src` are exactly representable in dst_t (already rounded), so the cast is exact.
template <typename dst_t>
void store_tile(const float* src, int64_t ld, int64_t r, int64_t j0, int64_t width, RowForm<dst_t> m) {
  if (m.col_stride == 1) {
    for (int64_t i = 0; i < r; ++i) {
      dst_t* out = m.data + i * m.row_stride + j0;
      const float* in = src + i * ld;
#pragma omp simd
      for (int64_t t = 0; t < width; ++t) out[t] = static_cast<dst_t>(in[t]);
    }
  } else {
    for (int64_t t = 0; t < width; ++t) {
      dst_t* out = m.data + (j0 + t) * m.col_stride;
      for (int64_t i = 0; i < r; ++i) out[i * m.row_stride] = static_cast<dst_t>(src[i * ld + t]);
    }
  }
}

// out[i, :] = Σ_k A[i, k]·in[k, :] for r×r A, over `padded` (a multiple of kLanes) columns; rows
// of `in` are `ld_in` apart (a tile's ld, or the row stride of a matrix read in place), rows of
// `out` `ld`. Blocks of kRowBlock output rows × kLanes columns stay in registers while k runs.
inline void small_matmul(const float* A, const float* in, int64_t ld_in, float* out, int64_t r, int64_t padded,
                         int64_t ld) {
  for (int64_t i0 = 0; i0 < r; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, r - i0);
    const float* a_row[kRowBlock];
    for (int64_t ii = 0; ii < kRowBlock; ++ii) a_row[ii] = A + std::min(i0 + ii, r - 1) * r;  // spare rows: discarded
    for (int64_t t0 = 0; t0 < padded; t0 += kLanes) {
      float acc[kRowBlock][kLanes] = {};
      for (int64_t k = 0; k < r; ++k) {
        const float* x = in + k * ld_in + t0;
        for (int64_t ii = 0; ii < kRowBlock; ++ii) {
          const float a = a_row[ii][k];
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[ii][l] += a * x[l];
        }
      }
      for (int64_t ii = 0; ii < rows; ++ii) {
        float* o = out + (i0 + ii) * ld + t0;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) o[l] = acc[ii][l];
      }
    }
  }
}

// lanes[(i*r + j)*kLanes + l] += Σ_t a[i, t0 + l]·b[j, t0 + l] over the column blocks t0 of
// `padded` columns (zero beyond the tile's width), for every j, or j ≤ i only when `lower`. Each
// a-row meets a block of kRowBlock b-rows at a time; the fp32 sums of one tile go to per-lane
// double accumulators, reduced across lanes once per chunk (reduce_lanes): a horizontal sum per
// (i, j) and tile costs more than the products themselves when a tile row is one or two vectors
// long (large ranks); these sums are about a third of an A phase (bench/profile_native_step.py).
inline void accumulate_row_products(const float* a, const float* b, int64_t r, int64_t padded, int64_t ld, bool lower,
                                    double* lanes) {
  for (int64_t i = 0; i < r; ++i) {
    const float* ai = a + i * ld;
    const int64_t j_end = lower ? i + 1 : r;
    for (int64_t j0 = 0; j0 < j_end; j0 += kRowBlock) {
      const float* b_row[kRowBlock];
      for (int64_t jj = 0; jj < kRowBlock; ++jj) b_row[jj] = b + std::min(j0 + jj, r - 1) * ld;
      float acc[kRowBlock][kLanes] = {};
      for (int64_t t0 = 0; t0 < padded; t0 += kLanes) {
        for (int64_t jj = 0; jj < kRowBlock; ++jj) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[jj][l] += ai[t0 + l] * b_row[jj][t0 + l];
        }
      }
      for (int64_t jj = 0; jj < kRowBlock && j0 + jj < j_end; ++jj) {
        double* lane = lanes + (i * r + j0 + jj) * kLanes;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) lane[l] += acc[jj][l];
      }
    }
  }
}

// sums[e] += Σ_l lanes[e*kLanes + l] for the r² entries, and the lanes back to zero.
inline void reduce_lanes(double* lanes, int64_t r, double* sums) {
  for (int64_t e = 0; e < r * r; ++e) {
    double total = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[e * kLanes + l];
    sums[e] += total;
  }
  std::fill(lanes, lanes + r * r * kLanes, 0.0);
}

// Zero columns [width, padded) of an r-row tile: the row products run over whole blocks.
inline void zero_tail(float* tile, int64_t r, int64_t width, int64_t padded, int64_t ld) {
  if (width == padded) return;
  for (int64_t i = 0; i < r; ++i) std::fill(tile + i * ld + width, tile + i * ld + padded, 0.0f);
}

// The fp32 scalars of layer l's element-wise update, shared by both forms of the sweep.
struct UpdateScalars {
  float lr, wd, one_minus_beta1, beta2, one_minus_beta2, eps;
  float inv_bias1 = 1.0f, inv_bias2 = 1.0f;  // AltLoRA+ bias corrections 1/(1−βⁿ), n the new count
};

UpdateScalars update_scalars(const Group& g, int64_t l, const HyperParams& hp) {
  UpdateScalars u{static_cast<float>(hp.lr),         static_cast<float>(hp.weight_decay),
                  static_cast<float>(1.0 - hp.beta1), static_cast<float>(hp.beta2),
                  static_cast<float>(1.0 - hp.beta2), static_cast<float>(hp.eps)};
  if (hp.adaptive) {
    const double n = static_cast<double>(element<float>(g.step, l)) + 1.0;
    u.inv_bias1 = static_cast<float>(1.0 / (1.0 - std::pow(hp.beta1, n)));
    u.inv_bias2 = static_cast<float>(1.0 / (1.0 - std::pow(hp.beta2, n)));
  }
  return u;
}

template <typename scalar_t>
void update_chunk(Group& g, int64_t l, int64_t chunk, const HyperParams& hp, Tile& tile) {
  const int64_t r = g.rank, ld = g.tile_cols;
  const bool tr = g.transposed;
  const float* S = g.coefficient_matrices(l);
  const float* K = S + r * r;
  const auto X = row_form<scalar_t>((*g.params)[l], 0, tr);
  const RowForm<const scalar_t> X_read{X.data, X.row_stride, X.col_stride};
  const auto dX = row_form<const scalar_t>((*g.grads)[l], 0, tr);
  const auto M = row_form<float>(g.momentum, l, tr);
  const bool adaptive = hp.adaptive;
  const bool has_snapshot = g.snapshot.defined();

  const UpdateScalars u = update_scalars(g, l, hp);
  const float lr = u.lr, wd = u.wd, one_minus_beta1 = u.one_minus_beta1, eps = u.eps;
  const float beta2 = u.beta2, one_minus_beta2 = u.one_minus_beta2, inv_bias1 = u.inv_bias1, inv_bias2 = u.inv_bias2;

  double* gram_sum = g.zeroed_partial_sums(l, chunk);
  double* cross_sum = gram_sum + r * r;

  const int64_t c0 = chunk * g.chunk_cols, c1 = std::min(g.cols, c0 + g.chunk_cols);
  for (int64_t j0 = c0; j0 < c1; j0 += ld) {
    const int64_t w = std::min(ld, c1 - j0);
    const int64_t padded = (w + kLanes - 1) / kLanes * kLanes;  // ≤ ld; columns beyond w are scratch
    StageClock clock;
    load_tile(X_read, r, j0, w, tile.x_old, ld);
    // ∇X and M feed only the two products: fp32 rows with contiguous columns are read in place
    // (a full tile: the products read `padded` columns), anything else through a tile. X is
    // always copied: the Gram sums read its old values after the new ones are stored.
    const bool full = w == padded;
    const float* grad_rows = tile.grad;
    int64_t grad_ld = ld;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (full && dX.col_stride == 1) {
        grad_rows = dX.data + j0;
        grad_ld = dX.row_stride;
      }
    }
    if (grad_rows == tile.grad) load_tile(dX, r, j0, w, tile.grad, ld);
    const float* m_rows = tile.m_old;
    int64_t m_ld = ld;
    if (full && M.col_stride == 1) {
      m_rows = M.data + j0;
      m_ld = M.row_stride;
    } else {
      load_tile(RowForm<const float>{M.data, M.row_stride, M.col_stride}, r, j0, w, tile.m_old, ld);
    }
    clock.lap(Stage::Load);

    small_matmul(S, grad_rows, grad_ld, tile.scaled_grad, r, padded, ld);  // g̃ = S·∇X
    clock.lap(Stage::ScaledGrad);
    small_matmul(K, m_rows, m_ld, tile.m_new, r, padded, ld);              // K·M
    for (int64_t i = 0; i < r * ld; i += ld) {
      float* m = tile.m_new + i;
      const float* sg = tile.scaled_grad + i;
#pragma omp simd
      for (int64_t t = 0; t < w; ++t) m[t] += one_minus_beta1 * sg[t];
    }
    clock.lap(Stage::Carry);

    if (adaptive) {
      const auto V = row_form<float>(g.variance, l, tr);
      load_tile(RowForm<const float>{V.data, V.row_stride, V.col_stride}, r, j0, w, tile.variance, ld);
      for (int64_t i = 0; i < r * ld; i += ld) {
        const float *x = tile.x_old + i, *m = tile.m_new + i, *sg = tile.scaled_grad + i;
        float *v = tile.variance + i, *xn = tile.x_new + i;
#pragma omp simd
        for (int64_t t = 0; t < w; ++t) {
          v[t] = v[t] * beta2 + one_minus_beta2 * sg[t] * sg[t];
          const float direction = (m[t] * inv_bias1) / (std::sqrt(v[t] * inv_bias2) + eps);
          const float updated = x[t] - lr * (direction + wd * x[t]);
          xn[t] = static_cast<float>(static_cast<scalar_t>(updated));  // the value stored
        }
      }
      store_tile(tile.variance, ld, r, j0, w, V);
    } else {
      for (int64_t i = 0; i < r * ld; i += ld) {
        const float *x = tile.x_old + i, *m = tile.m_new + i;
        float* xn = tile.x_new + i;
#pragma omp simd
        for (int64_t t = 0; t < w; ++t) {
          const float updated = x[t] - lr * (m[t] + wd * x[t]);
          xn[t] = static_cast<float>(static_cast<scalar_t>(updated));
        }
      }
    }
    store_tile(tile.m_new, ld, r, j0, w, M);
    store_tile(tile.x_new, ld, r, j0, w, X);

    const float* ref = tile.x_old;
    if (has_snapshot) {
      load_tile(row_form<const scalar_t>(g.snapshot, l, tr), r, j0, w, tile.reference, ld);
      ref = tile.reference;
    }
    clock.lap(Stage::Update);
    // Per lane, fp32 sums over one tile (tile_cols / kLanes terms), then double across tiles.
    zero_tail(tile.x_new, r, w, padded, ld);
    zero_tail(has_snapshot ? tile.reference : tile.x_old, r, w, padded, ld);
    accumulate_row_products(tile.x_new, tile.x_new, r, padded, ld, /*lower=*/true, tile.gram_lanes.data());
    accumulate_row_products(tile.x_new, ref, r, padded, ld, /*lower=*/false, tile.cross_lanes.data());
    clock.lap(Stage::Gram);
  }
  StageClock clock;
  reduce_lanes(tile.gram_lanes.data(), r, gram_sum);
  reduce_lanes(tile.cross_lanes.data(), r, cross_sum);
  clock.lap(Stage::Gram);
}

// ------------------------------------------------------------------ step 2, column form

// Columns of the row form held contiguously (B stored (k, r): one column = one row of B): the
// sweep works on one column of R values at a time, with no transpose. With c a column,
//     g̃_c = S·∇x_c,  m_c ← K·m_c + (1−β1)·g̃_c,  x_c ← x_c − lr·(direction + wd·x_c),
//     G += x_c x_cᵀ,  C += x_c ref_cᵀ,
// each an R×R-by-R product vectorized over R (a compile-time rank: fixed trip counts the
// compiler unrolls into registers). G and C are summed in fp32 over kFlushColumns columns, then
// in double, like the tile sums of the row sweep. Why a second form: the tile form has to
// transpose such a layout element by element (bench/native_step.py times both on the same values:
// about 3× apart on one core, csrc/README.md).
constexpr int64_t kFlushColumns = 128;
// Columns updated before their outer products are summed (see update_columns).
constexpr int64_t kColumnBlock = 16;

template <typename scalar_t, int64_t R>
void update_columns(Group& g, int64_t l, int64_t chunk, const HyperParams& hp) {
  const float* S = g.coefficient_matrices(l);
  const float* Kc = S + R * R;
  // Transposed copies: St[k*R + i] = S[i, k], so that Σ_k S[i, k]·v[k] is a sum of scaled rows.
  alignas(64) float St[R * R], Kt[R * R];
  for (int64_t i = 0; i < R; ++i)
    for (int64_t k = 0; k < R; ++k) {
      St[k * R + i] = S[i * R + k];
      Kt[k * R + i] = Kc[i * R + k];
    }
  const at::Tensor& param = (*g.params)[l];
  const at::Tensor& grad = (*g.grads)[l];
  scalar_t* X = static_cast<scalar_t*>(param.data_ptr());
  const scalar_t* dX = static_cast<const scalar_t*>(grad.data_ptr());
  const int64_t x_stride = param.stride(0), g_stride = grad.stride(0);
  float* M = g.momentum.data_ptr<float>() + l * g.momentum.stride(0);
  const int64_t m_stride = g.momentum.stride(1);
  float* V = hp.adaptive ? g.variance.data_ptr<float>() + l * g.variance.stride(0) : nullptr;
  const int64_t v_stride = hp.adaptive ? g.variance.stride(1) : 0;
  const bool has_snapshot = g.snapshot.defined();
  const scalar_t* snap = has_snapshot ? static_cast<const scalar_t*>(g.snapshot.data_ptr()) + l * g.snapshot.stride(0) : nullptr;
  const int64_t s_stride = has_snapshot ? g.snapshot.stride(1) : 0;

  const UpdateScalars u = update_scalars(g, l, hp);
  const float lr = u.lr, wd = u.wd, one_minus_beta1 = u.one_minus_beta1, eps = u.eps;
  const float beta2 = u.beta2, one_minus_beta2 = u.one_minus_beta2, inv_bias1 = u.inv_bias1, inv_bias2 = u.inv_bias2;

  double* gram_sum = g.zeroed_partial_sums(l, chunk);
  double* cross_sum = gram_sum + R * R;
  alignas(64) float gram_acc[R * R], cross_acc[R * R];

  const int64_t c0 = chunk * g.chunk_cols, c1 = std::min(g.cols, c0 + g.chunk_cols);
  // Columns go in blocks: pass 1 updates each column and keeps its new value (and reference) in
  // a small buffer; pass 2 sums their outer products, broadcasting entries of values stored a
  // whole block earlier (a broadcast of a value just stored would stall on store forwarding).
  alignas(64) float new_values[kColumnBlock * R], references[kColumnBlock * R], converted[R];
  for (int64_t b0 = c0; b0 < c1; b0 += kFlushColumns) {
    const int64_t b1 = std::min(c1, b0 + kFlushColumns);
    std::fill(gram_acc, gram_acc + R * R, 0.0f);
    std::fill(cross_acc, cross_acc + R * R, 0.0f);
    for (int64_t k0 = b0; k0 < b1; k0 += kColumnBlock) {
      const int64_t k1 = std::min(b1, k0 + kColumnBlock);
      StageClock clock;
      for (int64_t c = k0; c < k1; ++c) {
        float* xn = new_values + (c - k0) * R;
        float* x = references + (c - k0) * R;
        alignas(64) float sg[R], m[R];
        scalar_t* xc = X + c * x_stride;
        const scalar_t* gc = dX + c * g_stride;
        float* mc = M + c * m_stride;
        const float* dx;
        if constexpr (std::is_same_v<scalar_t, float>) {
          dx = gc;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) converted[i] = static_cast<float>(gc[i]);
          dx = converted;
        }
#pragma omp simd
        for (int64_t i = 0; i < R; ++i) {
          x[i] = static_cast<float>(xc[i]);
          sg[i] = 0.0f;
          m[i] = 0.0f;
        }
        for (int64_t k = 0; k < R; ++k) {
          const float gk = dx[k], mk = mc[k];
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) {
            sg[i] += gk * St[k * R + i];
            m[i] += mk * Kt[k * R + i];
          }
        }
        if (hp.adaptive) {
          float* vc = V + c * v_stride;
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) {
            m[i] += one_minus_beta1 * sg[i];
            vc[i] = vc[i] * beta2 + one_minus_beta2 * sg[i] * sg[i];
            const float direction = (m[i] * inv_bias1) / (std::sqrt(vc[i] * inv_bias2) + eps);
            xn[i] = static_cast<float>(static_cast<scalar_t>(x[i] - lr * (direction + wd * x[i])));
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) {
            m[i] += one_minus_beta1 * sg[i];
            xn[i] = static_cast<float>(static_cast<scalar_t>(x[i] - lr * (m[i] + wd * x[i])));
          }
        }
#pragma omp simd
        for (int64_t i = 0; i < R; ++i) {
          mc[i] = m[i];
          xc[i] = static_cast<scalar_t>(xn[i]);
        }
        if (has_snapshot) {
          const scalar_t* sc = snap + c * s_stride;
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) x[i] = static_cast<float>(sc[i]);
        }
      }
      clock.lap(Stage::ColumnUpdate);
      for (int64_t c = 0; c < k1 - k0; ++c) {
        const float* xn = new_values + c * R;
        const float* ref = references + c * R;
        for (int64_t k = 0; k < R; ++k) {
          const float xk = xn[k];
#pragma omp simd
          for (int64_t i = 0; i < R; ++i) {
            gram_acc[k * R + i] += xk * xn[i];
            cross_acc[k * R + i] += xk * ref[i];
          }
        }
      }
      clock.lap(Stage::Gram);
    }
    for (int64_t e = 0; e < R * R; ++e) {
      gram_sum[e] += gram_acc[e];
      cross_sum[e] += cross_acc[e];
    }
  }
}

// The column sweep applies when the group's rank is one it is instantiated for and every
// column-form tensor of layer l keeps its columns contiguous (the usual case for B).
bool use_columns(const Group& g, int64_t l) {
  if (!g.transposed || !(g.rank == 8 || g.rank == 16 || g.rank == 32 || g.rank == 64)) return false;
  const at::Tensor& p = (*g.params)[l];
  const at::Tensor& d = (*g.grads)[l];
  return p.stride(1) == 1 && d.stride(1) == 1 && g.momentum.stride(2) == 1 &&
         (!g.variance.defined() || g.variance.stride(2) == 1) && (!g.snapshot.defined() || g.snapshot.stride(2) == 1);
}

template <typename scalar_t>
bool update_columns_dispatch(Group& g, int64_t l, int64_t chunk, const HyperParams& hp) {
  if (!use_columns(g, l)) return false;
  switch (g.rank) {
    case 8: update_columns<scalar_t, 8>(g, l, chunk, hp); return true;
    case 16: update_columns<scalar_t, 16>(g, l, chunk, hp); return true;
    case 32: update_columns<scalar_t, 32>(g, l, chunk, hp); return true;
    case 64: update_columns<scalar_t, 64>(g, l, chunk, hp); return true;
    default: return false;
  }
}

void update_chunk_dispatch(Group& g, int64_t l, int64_t chunk, const HyperParams& hp, Tile& tile) {
  switch (g.dtype) {
    case at::kFloat:
      if (update_columns_dispatch<float>(g, l, chunk, hp)) return;
      return update_chunk<float>(g, l, chunk, hp, tile);
    case at::kBFloat16:
      if (update_columns_dispatch<c10::BFloat16>(g, l, chunk, hp)) return;
      return update_chunk<c10::BFloat16>(g, l, chunk, hp, tile);
    case at::kHalf:
      if (update_columns_dispatch<c10::Half>(g, l, chunk, hp)) return;
      return update_chunk<c10::Half>(g, l, chunk, hp, tile);
    default:
      TORCH_CHECK(false, "unreachable: parameter dtype ", g.dtype);
  }
}

// ------------------------------------------------------------------ step 3: r×r bookkeeping

void finish_layer(Group& g, int64_t l, std::vector<double>& work) {
  const int64_t r = g.rank;
  work.assign(2 * r * r, 0.0);
  for (int64_t c = 0; c < g.chunks; ++c) {
    const double* p = g.partial_sums(l, c);
    for (int64_t e = 0; e < 2 * r * r; ++e) work[e] += p[e];
  }
  const double* gram_sum = work.data();
  const double* cross_sum = gram_sum + r * r;
  const auto G = row_form<float>(g.gram, l, false);
  const auto C = row_form<float>(g.cross, l, false);
  const auto OG = row_form<const float>(g.other_gram, l, false);
  const auto OC = row_form<float>(g.other_cross, l, false);
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      G.data[i * G.row_stride + j * G.col_stride] = static_cast<float>(gram_sum[std::max(i, j) * r + std::min(i, j)]);
      C.data[i * C.row_stride + j * C.col_stride] = static_cast<float>(cross_sum[i * r + j]);
      // Y's momentum is aligned to Y's current value from now on.
      OC.data[i * OC.row_stride + j * OC.col_stride] = OG.data[i * OG.row_stride + j * OG.col_stride];
    }
  }
  element<float>(g.step, l) += 1.0f;
}

// ------------------------------------------------------------------ scheduling

struct WorkItem {
  Group* group;
  int64_t layer;
  int64_t chunk;  // -1: the whole layer
  int64_t cost;   // elements (or flops) it touches: what the balance equalizes
};

// Per-thread scratch, allocated on first use by the thread's items.
struct Scratch {
  std::vector<double> work;
  std::unique_ptr<Tile> tile_;
  Tile& tile(int64_t elements, int64_t max_rank) {
    if (!tile_) tile_ = std::make_unique<Tile>(elements, max_rank);
    return *tile_;
  }
};

// Run fn(item, scratch) for every item: items are dealt to bins, largest first, each to the bin
// with the least work so far; one thread per bin, as many bins as threads the total work merits.
template <typename F>
void run_balanced(const std::vector<WorkItem>& items, const F& fn) {
  int64_t total = 0;
  for (const WorkItem& item : items) total += item.cost;
  const int64_t n_bins = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                                                   static_cast<int64_t>(items.size()),
                                                                   total / kMinWorkPerThread}));
  std::vector<const WorkItem*> order(items.size());
  for (size_t i = 0; i < items.size(); ++i) order[i] = &items[i];
  std::stable_sort(order.begin(), order.end(), [](const WorkItem* a, const WorkItem* b) { return a->cost > b->cost; });
  std::vector<std::vector<const WorkItem*>> bins(n_bins);
  std::vector<int64_t> load(n_bins, 0);
  for (const WorkItem* item : order) {
    const int64_t b = std::min_element(load.begin(), load.end()) - load.begin();
    bins[b].push_back(item);
    load[b] += item->cost;
  }
  at::parallel_for(0, n_bins, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t b = begin; b < end; ++b) {
      for (const WorkItem* item : bins[b]) fn(*item, scratch);
    }
  });
}

void bump_version(const at::Tensor& t) {
  // Like an in-place torch op: autograd sees that the tensor changed.
  if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

// ------------------------------------------------------------------ entry points

std::vector<Group> make_groups(
    const std::vector<std::vector<at::Tensor>>& params, const std::vector<std::vector<at::Tensor>>& grads,
    const std::vector<bool>& transposed, const std::vector<at::Tensor>& momentum,
    const std::vector<std::optional<at::Tensor>>& variance, const std::vector<at::Tensor>& step,
    const std::vector<at::Tensor>& gram, const std::vector<at::Tensor>& cross, const std::vector<at::Tensor>& other_gram,
    const std::vector<at::Tensor>& other_cross, const std::vector<at::Tensor>& inv_scale_sq,
    const std::vector<std::optional<at::Tensor>>& snapshot, bool adaptive) {
  const size_t n = params.size();
  for (auto [size, name] : {std::pair<size_t, const char*>{grads.size(), "grads"}, {transposed.size(), "transposed"},
                            {momentum.size(), "momentum"}, {variance.size(), "variance"}, {step.size(), "step"},
                            {gram.size(), "gram"}, {cross.size(), "cross"}, {other_gram.size(), "other_gram"},
                            {other_cross.size(), "other_cross"}, {inv_scale_sq.size(), "inv_scale_sq"},
                            {snapshot.size(), "snapshot"}}) {
    TORCH_CHECK_VALUE(size == n, name, " has ", size, " entries, params has ", n, " (one per group)");
  }
  std::vector<Group> groups(n);
  for (size_t gi = 0; gi < n; ++gi) {
    Group& g = groups[gi];
    const int64_t group = static_cast<int64_t>(gi);
    g.params = &params[gi];
    g.grads = &grads[gi];
    g.transposed = transposed[gi];
    const int64_t L = static_cast<int64_t>(params[gi].size());
    TORCH_CHECK_VALUE(L > 0, ArgName{group, "params", -1}, " is empty");
    TORCH_CHECK_VALUE(static_cast<int64_t>(grads[gi].size()) == L, ArgName{group, "grads", -1}, " has ", grads[gi].size(),
                      " tensors, params has ", L);
    const at::Tensor& first = params[gi][0];
    TORCH_CHECK_VALUE(first.dim() == 2, ArgName{group, "params", 0}, " must be 2-D, got ", first.dim(), "-D");
    g.dtype = first.scalar_type();
    TORCH_CHECK_VALUE(is_parameter_dtype(g.dtype), ArgName{group, "params", -1}, " have dtype ", g.dtype,
                      "; backend='native' supports float32, bfloat16 and float16");
    const std::vector<int64_t> shape = first.sizes().vec();
    for (int64_t l = 0; l < L; ++l) {
      check_tensor(params[gi][l], {group, "params", l}, shape, g.dtype);
      check_tensor(grads[gi][l], {group, "grads", l}, shape, g.dtype);
    }
    g.layers = L;
    g.rank = g.transposed ? shape[1] : shape[0];
    g.cols = g.transposed ? shape[0] : shape[1];
    const int64_t r = g.rank;
    const std::vector<int64_t> stacked{L, shape[0], shape[1]}, square{L, r, r}, per_layer{L};
    g.momentum = momentum[gi];
    check_tensor(g.momentum, {group, "momentum", -1}, stacked, at::kFloat);
    if (adaptive) {
      TORCH_CHECK_VALUE(variance[gi].has_value() && variance[gi]->defined(), ArgName{group, "variance", -1},
                        " is required when adaptive=True (AltLoRA+)");
      g.variance = *variance[gi];
      check_tensor(g.variance, {group, "variance", -1}, stacked, at::kFloat);
    }
    g.step = step[gi];
    check_tensor(g.step, {group, "step", -1}, per_layer, at::kFloat);
    g.gram = gram[gi];
    g.cross = cross[gi];
    g.other_gram = other_gram[gi];
    g.other_cross = other_cross[gi];
    check_tensor(g.gram, {group, "gram", -1}, square, at::kFloat);
    check_tensor(g.cross, {group, "cross", -1}, square, at::kFloat);
    check_tensor(g.other_gram, {group, "other_gram", -1}, square, at::kFloat);
    check_tensor(g.other_cross, {group, "other_cross", -1}, square, at::kFloat);
    g.inv_scale_sq = inv_scale_sq[gi];
    check_tensor(g.inv_scale_sq, {group, "inv_scale_sq", -1}, per_layer, at::kFloat);
    if (snapshot[gi].has_value() && snapshot[gi]->defined()) {
      g.snapshot = *snapshot[gi];
      check_tensor(g.snapshot, {group, "snapshot", -1}, stacked, g.dtype);
    }

    g.tile_cols = std::max(kMinTileCols, kTileElements / r / kLanes * kLanes);
    const int64_t chunk_tiles = std::max<int64_t>(1, kChunkElements / (r * g.tile_cols));
    g.chunk_cols = chunk_tiles * g.tile_cols;
    g.chunks = (g.cols + g.chunk_cols - 1) / g.chunk_cols;
    g.coefficients.resize(L * 2 * r * r);
    g.partials.resize(L * g.chunks * 2 * r * r);
  }
  return groups;
}

void phase_update(
    const std::vector<std::vector<at::Tensor>>& params, const std::vector<std::vector<at::Tensor>>& grads,
    const std::vector<bool>& transposed, const std::vector<at::Tensor>& momentum,
    const std::vector<std::optional<at::Tensor>>& variance, const std::vector<at::Tensor>& step,
    const std::vector<at::Tensor>& gram, const std::vector<at::Tensor>& cross, const std::vector<at::Tensor>& other_gram,
    const std::vector<at::Tensor>& other_cross, const std::vector<at::Tensor>& inv_scale_sq,
    const std::vector<std::optional<at::Tensor>>& snapshot, double lr, double beta1, double weight_decay,
    double damping, bool adaptive, double beta2, double eps, const std::optional<at::Tensor>& found_inf,
    double pivot_floor, const std::vector<double>& escalation, double absolute_floor) {
  const HyperParams hp{lr, beta1, weight_decay, damping, adaptive, beta2, eps};
  const DampingPolicy policy{pivot_floor, escalation, absolute_floor};
  std::vector<Group> groups = make_groups(params, grads, transposed, momentum, variance, step, gram, cross,
                                          other_gram, other_cross, inv_scale_sq, snapshot, adaptive);
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->device().is_cpu(),
                      "found_inf must be a one-element CPU tensor, got shape ", found_inf->sizes(), " on ",
                      found_inf->device());
    if (found_inf->item<double>() != 0.0) return;  // skipped phase: nothing changes
  }
  run_groups(groups, hp, policy);
}

void run_groups(std::vector<Group>& groups, const HyperParams& hp, const DampingPolicy& policy) {
  std::vector<WorkItem> layers, chunks;
  int64_t tile_elements = 0, max_rank = 0;
  for (Group& g : groups) {
    tile_elements = std::max(tile_elements, g.rank * g.tile_cols);
    max_rank = std::max(max_rank, g.rank);
    for (int64_t l = 0; l < g.layers; ++l) {
      layers.push_back({&g, l, -1, g.rank * g.cols});
      const int64_t chunk_cost = g.rank * g.chunk_cols;
      for (int64_t c = 0; c < g.chunks; ++c) chunks.push_back({&g, l, c, chunk_cost});
    }
  }
  const int64_t n_layers = static_cast<int64_t>(layers.size());
  const bool whole_layers =
      chunks.size() == layers.size() || n_layers >= kLayersPerThreadUnsplit * at::get_num_threads();

  if (whole_layers) {
    run_balanced(layers, [&](const WorkItem& item, Scratch& scratch) {
      Group& g = *item.group;
      StageClock clock;
      prepare_layer(g, item.layer, hp, policy, scratch.work);
      clock.lap(Stage::Prepare);
      for (int64_t c = 0; c < g.chunks; ++c) update_chunk_dispatch(g, item.layer, c, hp, scratch.tile(tile_elements, max_rank));
      StageClock finish;
      finish_layer(g, item.layer, scratch.work);
      finish.lap(Stage::Finish);
    });
  } else {
    std::vector<WorkItem> small_work = layers;
    for (WorkItem& item : small_work) item.cost = item.group->rank * item.group->rank * item.group->rank;
    run_balanced(small_work, [&](const WorkItem& item, Scratch& scratch) {
      StageClock clock;
      prepare_layer(*item.group, item.layer, hp, policy, scratch.work);
      clock.lap(Stage::Prepare);
    });
    run_balanced(chunks, [&](const WorkItem& item, Scratch& scratch) {
      update_chunk_dispatch(*item.group, item.layer, item.chunk, hp, scratch.tile(tile_elements, max_rank));
    });
    run_balanced(small_work, [&](const WorkItem& item, Scratch& scratch) {
      StageClock clock;
      finish_layer(*item.group, item.layer, scratch.work);
      clock.lap(Stage::Finish);
    });
  }

  for (const Group& g : groups) {
    for (const at::Tensor& p : *g.params) bump_version(p);
    for (const at::Tensor& t : {g.momentum, g.variance, g.step, g.gram, g.cross, g.other_cross}) bump_version(t);
  }
}

// The ladder alone, for tests: lower factors (float32) and the chosen rung of each (L, r, r) Gram.
std::pair<at::Tensor, at::Tensor> damped_cholesky_batch(const at::Tensor& gram, double damping, double pivot_floor,
                                                        const std::vector<double>& escalation,
                                                        double absolute_floor) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2), "gram must be (L, r, r), got ", gram.sizes());
  check_tensor(gram, {-1, "gram", -1}, gram.sizes(), at::kFloat);
  const DampingPolicy policy{pivot_floor, escalation, absolute_floor};
  const int64_t L = gram.size(0), r = gram.size(1);
  at::Tensor factor = at::empty({L, r, r}, gram.options());
  at::Tensor rung = at::empty({L}, gram.options().dtype(at::kLong));
  at::parallel_for(0, L, std::max<int64_t>(1, kMinWorkPerThread / (r * r * r)), [&](int64_t begin, int64_t end) {
    std::vector<double> g(r * r), lower(r * r);
    for (int64_t l = begin; l < end; ++l) {
      const auto G = row_form<const float>(gram, l, false);
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) g[i * r + j] = G.data[i * G.row_stride + j * G.col_stride];
      rung.data_ptr<int64_t>()[l] = damped_cholesky(g.data(), r, damping, policy, lower.data());
      float* out = factor.data_ptr<float>() + l * r * r;
      for (int64_t e = 0; e < r * r; ++e) out[e] = static_cast<float>(lower[e]);
    }
  });
  return {factor, rung};
}

}  // namespace altlora_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "altlora native backend: the AltLoRA/AltLoRA+ phase update on CPU (see csrc/README.md)";
  m.def("phase_update", &altlora_native::phase_update,
        "One phase for every group (lists per group; semantics of altlora_kernels/phase_update.py)",
        py::arg("params"), py::arg("grads"), py::arg("transposed"), py::arg("momentum"), py::arg("variance"),
        py::arg("step"), py::arg("gram"), py::arg("cross"), py::arg("other_gram"), py::arg("other_cross"),
        py::arg("inv_scale_sq"), py::arg("snapshot"), py::arg("lr"), py::arg("beta1"), py::arg("weight_decay"),
        py::arg("damping"), py::arg("adaptive"), py::arg("beta2"), py::arg("eps"), py::arg("found_inf"),
        py::arg("pivot_floor"), py::arg("escalation"), py::arg("absolute_floor"),
        py::call_guard<py::gil_scoped_release>());
  m.def("nonfinite_flag", &altlora_native::nonfinite_flag,
        "found_inf <- 1 if any element of the tensors is NaN or Inf, else 0, and True; False (nothing done) unless all are contiguous CPU float tensors. Reads only.",
        py::arg("tensors"), py::arg("found_inf"), py::call_guard<py::gil_scoped_release>());
  m.def("stage_seconds", []() {
        // Thread-seconds per stage since the last call, then reset (stage_clock.h); empty unless
        // the library was built with -DALTLORA_PROFILE.
        py::dict out;
#ifdef ALTLORA_PROFILE
        for (size_t i = 0; i < altlora_native::kStageNames.size(); ++i)
          out[altlora_native::kStageNames[i]] = altlora_native::stage_totals()[i].exchange(0) * 1e-9;
#endif
        return out;
      }, "thread-seconds per stage since the last call (profiling builds only; see csrc/stage_clock.h)");
  m.def("damped_cholesky", &altlora_native::damped_cholesky_batch,
        "(lower factors, rungs) of a batch of Grams under the damping ladder", py::arg("gram"), py::arg("damping"),
        py::arg("pivot_floor"), py::arg("escalation"), py::arg("absolute_floor"),
        py::call_guard<py::gil_scoped_release>());
  altlora_native::bind_step_plan(m);
}
