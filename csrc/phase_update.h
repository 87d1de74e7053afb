// What phase_update.cpp offers the other translation units of the library (step_plan.cpp): the
// hyper-parameters of a phase, one group of same-shaped layers with its work layout, and the two
// calls that check such groups once and run a phase over them. The math and the arrangement of
// the work are described at the top of phase_update.cpp.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "damped_cholesky.h"

namespace altlora_native {

struct HyperParams {
  double lr;
  double beta1;
  double weight_decay;
  double damping;
  bool adaptive;
  double beta2;
  double eps;
};

// One FactorGroup of altlora_kernels/phase_types.py, with its work layout and scratch. `params`
// and `grads` point at vectors the caller owns and keeps in place while the group is used.
struct Group {
  const std::vector<at::Tensor>* params;
  const std::vector<at::Tensor>* grads;
  bool transposed;
  at::Tensor momentum, variance, step, gram, cross, other_gram, other_cross, inv_scale_sq, snapshot;
  at::ScalarType dtype;
  int64_t layers, rank, cols;
  int64_t tile_cols, chunk_cols, chunks;
  std::vector<float> coefficients;  // per layer: S then K, r² each (step 1 → step 2)
  std::vector<double> partials;     // per (layer, chunk): gram then cross sums, r² each (step 2 → step 3)

  float* coefficient_matrices(int64_t l) { return coefficients.data() + l * 2 * rank * rank; }
  double* partial_sums(int64_t l, int64_t chunk) { return partials.data() + (l * chunks + chunk) * 2 * rank * rank; }
  double* zeroed_partial_sums(int64_t l, int64_t chunk) {
    double* sums = partial_sums(l, chunk);
    std::fill(sums, sums + 2 * rank * rank, 0.0);
    return sums;
  }
};

// Groups over the given per-group lists, every tensor checked (ValueError naming the argument on
// a wrong device, dtype or shape). The groups point into `params` and `grads`.
std::vector<Group> make_groups(
    const std::vector<std::vector<at::Tensor>>& params, const std::vector<std::vector<at::Tensor>>& grads,
    const std::vector<bool>& transposed, const std::vector<at::Tensor>& momentum,
    const std::vector<std::optional<at::Tensor>>& variance, const std::vector<at::Tensor>& step,
    const std::vector<at::Tensor>& gram, const std::vector<at::Tensor>& cross, const std::vector<at::Tensor>& other_gram,
    const std::vector<at::Tensor>& other_cross, const std::vector<at::Tensor>& inv_scale_sq,
    const std::vector<std::optional<at::Tensor>>& snapshot, bool adaptive);

// One phase over every layer of `groups` (checked by make_groups; the grads they point at have
// the params' shapes and dtype), then the version bumps of everything it wrote.
void run_groups(std::vector<Group>& groups, const HyperParams& hp, const DampingPolicy& policy);

}  // namespace altlora_native
