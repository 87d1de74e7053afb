// Where the time of a phase goes, for bench/profile_native_step.py: compiled in only with
// -DALTLORA_PROFILE (that script builds its own copy of the library); in the library the
// clock is an empty struct whose laps the compiler removes.
//
// A StageClock lives on one thread; lap(stage) adds the time since the previous lap (or since
// construction) to that stage's total, summed over threads with relaxed atomics. Totals are
// thread-seconds: with two threads busy they add up to twice the wall time.

#pragma once

#include <array>
#include <cstdint>

#ifdef ALTLORA_PROFILE
#include <atomic>
#include <chrono>
#endif

namespace altlora_native {

enum class Stage : int {
  Prepare,        // damped Cholesky of the other factor's Gram, P, S = P/s², K = β1·P·C
  Load,           // tile form: X, ∇X, M (V) converted into fp32 tiles
  ScaledGrad,     // tile form: g̃ = S·∇X
  Carry,          // tile form: K·M + (1−β1)·g̃
  Update,         // tile form: (V,) the new X, rounded, and every write-back
  Gram,           // both forms: partial sums of X_new·X_newᵀ and X_new·X_refᵀ
  ColumnUpdate,   // column form: load, g̃, carry, update and write-back of each column, fused
  Finish,         // Gram/cross-Gram from the partial sums, counters
  Survey,         // step plan: storage and version of every factor, gradients read and checked, versions recorded
  Nonfinite,      // the read-only NaN/Inf check over the gradients
  Count
};

constexpr std::array<const char*, static_cast<int>(Stage::Count)> kStageNames = {
    "prepare", "load", "scaled_grad", "carry", "update", "gram", "column_update", "finish", "survey", "nonfinite"};

#ifdef ALTLORA_PROFILE
inline std::array<std::atomic<int64_t>, static_cast<int>(Stage::Count)>& stage_totals() {
  static std::array<std::atomic<int64_t>, static_cast<int>(Stage::Count)> totals{};
  return totals;
}

struct StageClock {
  using clock = std::chrono::steady_clock;
  clock::time_point last = clock::now();
  void lap(Stage stage) {
    const clock::time_point now = clock::now();
    stage_totals()[static_cast<int>(stage)].fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count(), std::memory_order_relaxed);
    last = now;
  }
};
#else
struct StageClock {
  void lap(Stage) {}
};
#endif

}  // namespace altlora_native
