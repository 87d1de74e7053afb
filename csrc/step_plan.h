// The step plan (step_plan.cpp): the LoRA side of a whole optimizer step in one call.

#pragma once

#include <torch/csrc/utils/pybind.h>

namespace altlora_native {

// Adds the StepPlan class to the extension module.
void bind_step_plan(pybind11::module_& m);

}  // namespace altlora_native
