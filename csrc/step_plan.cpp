// The step plan: the LoRA side of one optimizer step in one call, for the usual case.
//
// Built by altlora_kernels/native_step_plan.py (driven by python/altlora/step_plan.py) once the
// optimizer's groups and state exist, it keeps every tensor a step touches: the LoRA factors as
// the user holds them (the "tracked" leaves, whose .grad, version and storage a step reads), the
// 2-D views the phases write, and the state buffers, already checked and laid out in groups
// (phase_update.h). A step then is:
//
//   1. every tracked factor still has the storage and the version seen after our last write
//      (nothing moved, cast or wrote it outside the optimizer);
//   2. every factor of a phase has a gradient, and every gradient (both factors, and the extra
//      ones the caller passes: the AdamW groups') is a dense contiguous CPU tensor, of the
//      factor's dtype and shape for LoRA factors;
//   3. the read-only NaN/Inf check over all those gradients (nonfinite.h);
//   4. the phases, in order, per unit (a LoRA param group with its own hyper-parameters);
//   5. the versions seen after this write.
//
// Whenever 1 or 2 fails, or 3 finds a NaN/Inf and the caller raises on those, it returns a status
// that says so before anything is written, and the caller runs its general step, which handles
// every such case (rebuilding groups, refreshing Grams, zero gradients for missing ones, errors).
// What it saves is the general step's Python side: reading the metadata of every factor and
// gradient several times per step and converting every tensor at the call into C++.

#include "step_plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "damped_cholesky.h"
#include "nonfinite.h"
#include "phase_update.h"
#include "stage_clock.h"

namespace altlora_native {
namespace {

// What StepPlan::step returns (altlora_kernels/native_step_plan.py names them).
enum StepStatus : int64_t {
  kStepped = 0,    // every phase ran
  kSkipped = 1,    // a NaN/Inf was found and the caller skips such steps: nothing written
  kChanged = 2,    // a factor has a new storage or was written outside the optimizer
  kIrregular = 3,  // a gradient is missing where a phase needs it, or is not dense, contiguous, on the CPU, or of the factor's dtype and shape
  kNonfinite = 4,  // a NaN/Inf was found and the caller raises on those: nothing written
};

int64_t version_of(const at::Tensor& t) {
  return static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

int64_t address_of(const at::Tensor& t) {
  return reinterpret_cast<int64_t>(t.const_data_ptr());
}

// The groups one phase of one factor runs over, for one unit (LoRA param group).
struct PhaseSet {
  int64_t unit;
  int64_t factor;  // 0: A, 1: B
  std::vector<std::vector<at::Tensor>> params, grads;
  std::vector<std::vector<int64_t>> tracked_index;  // per (group, layer): the index of its leaf in tracked
  std::vector<Group> groups;                        // point into params and grads
};

class StepPlan {
 public:
  StepPlan(std::vector<at::Tensor> tracked, std::vector<int64_t> identity, std::vector<int64_t> seen, bool adaptive,
           double pivot_floor, std::vector<double> escalation, double absolute_floor)
      : tracked_(std::move(tracked)),
        identity_(std::move(identity)),
        seen_(std::move(seen)),
        adaptive_(adaptive),
        policy_{pivot_floor, std::move(escalation), absolute_floor},
        found_(at::zeros({}, at::TensorOptions().dtype(at::kFloat))) {
    TORCH_CHECK_VALUE(identity_.size() == tracked_.size() && seen_.size() == tracked_.size(),
                      "StepPlan: tracked, identity and seen must have one entry per factor");
  }

  // The groups of a phase of `factor` (0: A, 1: B) in `unit`: the lists of phase_update, with
  // the tracked index of every layer in place of its gradient. Checked here, once.
  void add_phase(int64_t unit, int64_t factor, const std::vector<std::vector<int64_t>>& tracked_index,
                 const std::vector<std::vector<at::Tensor>>& params, const std::vector<bool>& transposed,
                 const std::vector<at::Tensor>& momentum, const std::vector<std::optional<at::Tensor>>& variance,
                 const std::vector<at::Tensor>& step, const std::vector<at::Tensor>& gram,
                 const std::vector<at::Tensor>& cross, const std::vector<at::Tensor>& other_gram,
                 const std::vector<at::Tensor>& other_cross, const std::vector<at::Tensor>& inv_scale_sq) {
    TORCH_CHECK_VALUE(factor == 0 || factor == 1, "StepPlan.add_phase: factor must be 0 (A) or 1 (B), got ", factor);
    TORCH_CHECK_VALUE(unit >= 0, "StepPlan.add_phase: unit must be >= 0, got ", unit);
    TORCH_CHECK_VALUE(tracked_index.size() == params.size(), "StepPlan.add_phase: tracked_index has ",
                      tracked_index.size(), " groups, params ", params.size());
    auto set = std::make_unique<PhaseSet>();
    set->unit = unit;
    set->factor = factor;
    set->params = params;
    set->grads = params;  // stand-ins of the gradients' shapes and dtype for the checks
    set->tracked_index = tracked_index;
    for (size_t gi = 0; gi < params.size(); ++gi) {
      TORCH_CHECK_VALUE(tracked_index[gi].size() == params[gi].size(), "StepPlan.add_phase: tracked_index[", gi,
                        "] has ", tracked_index[gi].size(), " entries, params[", gi, "] ", params[gi].size());
      for (size_t l = 0; l < params[gi].size(); ++l) {
        const int64_t t = tracked_index[gi][l];
        TORCH_CHECK_VALUE(t >= 0 && t < static_cast<int64_t>(tracked_.size()), "StepPlan.add_phase: tracked index ",
                          t, " out of range");
        // The phase writes the view; the gradient and the version belong to the leaf it views.
        TORCH_CHECK_VALUE(tracked_[t].sizes() == params[gi][l].sizes() &&
                              tracked_[t].scalar_type() == params[gi][l].scalar_type(),
                          "StepPlan.add_phase: params[", gi, "][", l, "] and its tracked factor differ in shape or dtype");
      }
    }
    const std::vector<std::optional<at::Tensor>> no_snapshot(params.size());
    set->groups = make_groups(set->params, set->grads, transposed, momentum, variance, step, gram, cross, other_gram,
                              other_cross, inv_scale_sq, no_snapshot, adaptive_);
    release_grads(*set);
    sets_.push_back(std::move(set));
  }

  // One step: `phases` the factors in order (0: A, 1: B), `hparams` per unit (lr, beta1,
  // weight_decay, damping, beta2, eps), `extra` more gradients for the NaN/Inf check. Returns a
  // StepStatus; anything but kStepped and kSkipped means nothing was written.
  int64_t step(const std::vector<int64_t>& phases,
               const std::vector<std::tuple<double, double, double, double, double, double>>& hparams,
               bool skip_nonfinite, const std::vector<at::Tensor>& extra) {
    for (const std::unique_ptr<PhaseSet>& set : sets_) {
      TORCH_CHECK_VALUE(set->unit < static_cast<int64_t>(hparams.size()), "StepPlan.step: no hyper-parameters for unit ",
                        set->unit);
    }
    StageClock survey;
    // 1. storage and version of every factor
    for (size_t i = 0; i < tracked_.size(); ++i) {
      if (address_of(tracked_[i]) != identity_[i] || version_of(tracked_[i]) != seen_[i]) return kChanged;
    }
    // 2. gradients
    bool active[2] = {false, false};
    for (int64_t f : phases) {
      TORCH_CHECK_VALUE(f == 0 || f == 1, "StepPlan.step: a phase must be 0 (A) or 1 (B), got ", f);
      active[f] = true;
    }
    checked_.clear();
    bool regular = true;
    for (const std::unique_ptr<PhaseSet>& set : sets_) {
      for (size_t gi = 0; gi < set->grads.size() && regular; ++gi) {
        for (size_t l = 0; l < set->grads[gi].size(); ++l) {
          const at::Tensor& leaf = tracked_[set->tracked_index[gi][l]];
          const at::Tensor& grad = leaf.grad();
          if (!grad.defined()) {
            if (active[set->factor]) regular = false;
            continue;
          }
          if (!nonfinite_checkable(grad) || grad.scalar_type() != leaf.scalar_type() || grad.sizes() != leaf.sizes()) {
            regular = false;
            break;
          }
          if (active[set->factor]) set->grads[gi][l] = grad;
          checked_.push_back(&grad);
        }
      }
      if (!regular) break;
    }
    for (const at::Tensor& t : extra) {
      if (!regular || !nonfinite_checkable(t)) {
        regular = false;
        break;
      }
      checked_.push_back(&t);
    }
    if (!regular) {
      release_all_grads();
      return kIrregular;
    }
    survey.lap(Stage::Survey);
    // 3. the NaN/Inf check (its own stage, per thread)
    const bool nonfinite = any_nonfinite(checked_);
    checked_.clear();
    *found_.data_ptr<float>() = nonfinite ? 1.0f : 0.0f;
    found_.unsafeGetTensorImpl()->bump_version();
    if (nonfinite) {
      release_all_grads();
      return skip_nonfinite ? kSkipped : kNonfinite;
    }
    // 4. the phases
    for (int64_t f : phases) {
      for (const std::unique_ptr<PhaseSet>& set : sets_) {
        if (set->factor != f) continue;
        const auto& h = hparams[set->unit];
        const HyperParams hp{std::get<0>(h), std::get<1>(h), std::get<2>(h), std::get<3>(h),
                             adaptive_,      std::get<4>(h), std::get<5>(h)};
        run_groups(set->groups, hp, policy_);
      }
    }
    StageClock tail;
    release_all_grads();
    // 5. what the next step compares with
    for (size_t i = 0; i < tracked_.size(); ++i) seen_[i] = version_of(tracked_[i]);
    tail.lap(Stage::Survey);
    return kStepped;
  }

  const std::vector<int64_t>& seen() const { return seen_; }

  void set_seen(const std::vector<int64_t>& seen) {
    TORCH_CHECK_VALUE(seen.size() == tracked_.size(), "StepPlan.set_seen: ", seen.size(), " versions for ",
                      tracked_.size(), " factors");
    seen_ = seen;
  }

  const at::Tensor& found() const { return found_; }

 private:
  // The plan must not keep gradients alive between steps (zero_grad(set_to_none=True) frees them).
  static void release_grads(PhaseSet& set) {
    for (std::vector<at::Tensor>& grads : set.grads) {
      for (at::Tensor& g : grads) g = at::Tensor();
    }
  }

  void release_all_grads() {
    for (const std::unique_ptr<PhaseSet>& set : sets_) release_grads(*set);
  }

  std::vector<at::Tensor> tracked_;
  std::vector<int64_t> identity_;
  std::vector<int64_t> seen_;
  bool adaptive_;
  DampingPolicy policy_;
  at::Tensor found_;
  std::vector<std::unique_ptr<PhaseSet>> sets_;  // unique_ptr: the groups point into each set
  std::vector<const at::Tensor*> checked_;       // gradients of this step's NaN/Inf check
};

}  // namespace

void bind_step_plan(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<StepPlan>(m, "StepPlan", "The LoRA side of an optimizer step in one call (csrc/step_plan.cpp)")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, bool, double,
                    std::vector<double>, double>(),
           py::arg("tracked"), py::arg("identity"), py::arg("seen"), py::arg("adaptive"), py::arg("pivot_floor"),
           py::arg("escalation"), py::arg("absolute_floor"))
      .def("add_phase", &StepPlan::add_phase, py::arg("unit"), py::arg("factor"), py::arg("tracked_index"),
           py::arg("params"), py::arg("transposed"), py::arg("momentum"), py::arg("variance"), py::arg("step"),
           py::arg("gram"), py::arg("cross"), py::arg("other_gram"), py::arg("other_cross"), py::arg("inv_scale_sq"))
      .def("step", &StepPlan::step, py::arg("phases"), py::arg("hparams"), py::arg("skip_nonfinite"), py::arg("extra"),
           py::call_guard<py::gil_scoped_release>())
      .def("seen", &StepPlan::seen)
      .def("set_seen", &StepPlan::set_seen, py::arg("seen"))
      .def_property_readonly("found", &StepPlan::found);
}

}  // namespace altlora_native
