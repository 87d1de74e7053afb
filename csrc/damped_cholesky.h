// Damped Cholesky of one small r×r Gram matrix, in double precision, and the inverse it implies.
//
// The rule is the one of altlora_kernels/cholesky.py (its docstring is the specification): the
// shifted Gram G + λI is accepted when it factorizes with every pivot positive and
// L_jj² ≥ pivot_floor · μ, μ = max(tr(G)/r, 0); otherwise λ climbs the ladder
//
//     rung 0: λ,   rung j: λ + escalation[j-1] · μ,   last: λ + escalation.back() · max(μ, absolute_floor)
//
// and the first rung that passes is used; the last one is always used. The constants come from
// Python (PIVOT_FLOOR, ESCALATION, ABSOLUTE_FLOOR) so that there is one source of truth.
//
// Double precision costs nothing at these sizes (O(r³) per layer, r ≈ 8) and makes the inverse
// exact to fp32 precision for every Gram the pivot criterion accepts (condition ≤ ~1e6).
// Plain C++ without torch types: the per-matrix rule, whatever batches the layers.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace altlora_native {

struct DampingPolicy {
  double pivot_floor;               // smallest accepted pivot², relative to μ
  std::vector<double> escalation;   // relative rungs above the requested damping
  double absolute_floor;            // μ used by the last rung when the Gram is (numerically) zero
};

// Lower Cholesky factor of (gram + shift·I) into `lower` (row-major r×r, zeros above the
// diagonal), from gram's lower triangle. Returns true when every pivot is positive (NaN counts
// as a failure) and stores the smallest pivot² in *min_pivot_sq. A failed factorization still
// fills `lower` (with NaN/Inf where it broke), like LAPACK's garbage on failure: only the last
// rung of the ladder is ever used that way.
inline bool shifted_cholesky(const double* gram, int64_t r, double shift, double* lower, double* min_pivot_sq) {
  bool positive = true;
  double smallest = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t i = 0; i < j; ++i) lower[i * r + j] = 0.0;
    for (int64_t i = j; i < r; ++i) {
      double s = gram[i * r + j] + (i == j ? shift : 0.0);
      for (int64_t k = 0; k < j; ++k) s -= lower[i * r + k] * lower[j * r + k];
      if (i == j) {
        positive = positive && s > 0.0;
        smallest = std::min(smallest, s);
        lower[j * r + j] = std::sqrt(s);
      } else {
        lower[i * r + j] = s / lower[j * r + j];
      }
    }
  }
  *min_pivot_sq = smallest;
  return positive;
}

// Factor gram + λ_eff·I into `lower` with λ_eff chosen by the ladder; returns the rung index.
inline int64_t damped_cholesky(const double* gram, int64_t r, double damping, const DampingPolicy& policy,
                               double* lower) {
  double trace = 0.0;
  for (int64_t i = 0; i < r; ++i) trace += gram[i * r + i];
  const double mean_eig = std::max(trace / static_cast<double>(r), 0.0);
  const int64_t last = static_cast<int64_t>(policy.escalation.size());
  for (int64_t rung = 0; rung <= last; ++rung) {
    double shift = damping;
    if (rung > 0) {
      const double scale = rung == last ? std::max(mean_eig, policy.absolute_floor) : mean_eig;
      shift += policy.escalation[rung - 1] * scale;
    }
    double min_pivot_sq = 0.0;
    const bool factorized = shifted_cholesky(gram, r, shift, lower, &min_pivot_sq);
    if ((factorized && min_pivot_sq >= policy.pivot_floor * mean_eig) || rung == last) return rung;
  }
  return last;  // not reached
}

// P = (L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹ for a lower factor L; `work` holds r² doubles (L⁻¹).
inline void inverse_from_cholesky(const double* lower, int64_t r, double* work, double* inverse) {
  double* inv_lower = work;  // lower triangular
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t i = 0; i < j; ++i) inv_lower[i * r + j] = 0.0;
    inv_lower[j * r + j] = 1.0 / lower[j * r + j];
    for (int64_t i = j + 1; i < r; ++i) {
      double s = 0.0;
      for (int64_t k = j; k < i; ++k) s += lower[i * r + k] * inv_lower[k * r + j];
      inv_lower[i * r + j] = -s / lower[i * r + i];
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (int64_t k = i; k < r; ++k) s += inv_lower[k * r + i] * inv_lower[k * r + j];
      inverse[i * r + j] = s;
      inverse[j * r + i] = s;
    }
  }
}

}  // namespace altlora_native
