// Is any element of a list of CPU tensors a NaN or an Inf? One read of each element, no writes.
//
// The check is arithmetic, so it vectorizes without a branch: x·0 is 0 for every finite x and NaN
// for ±Inf and NaN, and a sum that meets one NaN stays NaN. (The file is compiled without
// -ffast-math, so the compiler may not fold x·0 to 0.) bf16 and fp16 values widen to fp32
// exactly. Work is split into pieces of kNonfinitePiece elements over at::parallel_for, so a few
// large gradients use every thread as well as many small ones.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "stage_clock.h"

namespace altlora_native {

constexpr int64_t kNonfinitePiece = 1 << 15;

template <typename T, typename Acc>
Acc nan_sum_of_zeros(const T* data, int64_t n) {
  Acc acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<Acc>(data[i]) * Acc(0);
  return acc;
}

inline bool piece_is_nonfinite(const at::Tensor& t, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  switch (t.scalar_type()) {
    case at::kFloat:
      return nan_sum_of_zeros<float, float>(t.const_data_ptr<float>() + begin, n) != 0.0f;
    case at::kDouble:
      return nan_sum_of_zeros<double, double>(t.const_data_ptr<double>() + begin, n) != 0.0;
    case at::kBFloat16:
      return nan_sum_of_zeros<c10::BFloat16, float>(t.const_data_ptr<c10::BFloat16>() + begin, n) != 0.0f;
    case at::kHalf:
      return nan_sum_of_zeros<c10::Half, float>(t.const_data_ptr<c10::Half>() + begin, n) != 0.0f;
    default:
      TORCH_CHECK_VALUE(false, "nonfinite check: unsupported dtype ", t.scalar_type());
  }
  return false;  // not reached
}

inline bool is_checked_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Whether the check below can read `t`: a dense contiguous CPU tensor with storage, of a float
// dtype above. (Layout and storage first: is_contiguous() throws for sparse tensors, and a tensor
// subclass without storage, a DTensor wrapper, has no data to read here.)
inline bool nonfinite_checkable(const at::Tensor& t) {
  return t.layout() == at::kStrided && t.has_storage() && t.device().is_cpu() && t.is_contiguous() &&
         is_checked_dtype(t.scalar_type());
}

// Whether any element of `tensors` (each nonfinite_checkable) is a NaN or an Inf.
inline bool any_nonfinite(const std::vector<const at::Tensor*>& tensors) {
  struct Piece {
    const at::Tensor* tensor;
    int64_t begin, end;
  };
  std::vector<Piece> pieces;
  for (const at::Tensor* t : tensors) {
    for (int64_t b = 0; b < t->numel(); b += kNonfinitePiece) pieces.push_back({t, b, std::min(t->numel(), b + kNonfinitePiece)});
  }
  std::atomic<bool> found{false};
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    StageClock clock;
    for (int64_t p = begin; p < end && !found.load(std::memory_order_relaxed); ++p) {
      if (piece_is_nonfinite(*pieces[p].tensor, pieces[p].begin, pieces[p].end)) found.store(true, std::memory_order_relaxed);
    }
    clock.lap(Stage::Nonfinite);
  });
  return found.load();
}

// found_inf (a one-element float32 CPU tensor) ← 1 if any element of `tensors` is not finite, else
// 0, and true; or false, with found_inf untouched, when a tensor is not nonfinite_checkable (the
// caller then uses torch's check). Deciding here costs nothing; in Python it would be three
// attribute reads per tensor, more than the check itself for small gradients.
inline bool nonfinite_flag(const std::vector<at::Tensor>& tensors, at::Tensor& found_inf) {
  TORCH_CHECK_VALUE(found_inf.numel() == 1 && found_inf.device().is_cpu() && found_inf.scalar_type() == at::kFloat,
                    "found_inf must be a one-element float32 CPU tensor");
  std::vector<const at::Tensor*> checked;
  checked.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    if (!nonfinite_checkable(t)) return false;
    checked.push_back(&t);
  }
  *found_inf.data_ptr<float>() = any_nonfinite(checked) ? 1.0f : 0.0f;
  found_inf.unsafeGetTensorImpl()->bump_version();
  return true;
}

}  // namespace altlora_native
