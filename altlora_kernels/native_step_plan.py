"""The LoRA side of a whole optimizer step in one native call (``csrc/step_plan.cpp``), for the usual case.

A :class:`NativeStepPlan` is built once from the groups a step runs (the same
:class:`~altlora_kernels.FactorGroup` inputs as ``native_phase_update.phase_update``, with the
factors as the user holds them, whose ``.grad``, version and storage a step reads). Each
:meth:`NativeStepPlan.step` then checks that nothing moved or was written outside the optimizer,
reads the gradients, runs the read-only NaN/Inf check over them (and over extra gradients), and
runs the phases, or returns a status that says why it did not and that nothing was written
(:data:`FALL_BACK`): the caller then runs its general step, which handles those cases. The math
is that of ``native_phase_update``; only the Python around it is gone (see ``csrc/step_plan.cpp``).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .cholesky import ABSOLUTE_FLOOR, ESCALATION, PIVOT_FLOOR
from .native_phase_update import load_extension
from .phase_types import FactorGroup, PhaseHyperParams

__all__ = ["STEPPED", "SKIPPED", "CHANGED", "IRREGULAR", "NONFINITE", "FALL_BACK", "PlanGroup", "NativeStepPlan"]

# StepPlan::step's statuses (csrc/step_plan.cpp).
STEPPED = 0  # every phase ran
SKIPPED = 1  # a NaN/Inf was found and skip_nonfinite: nothing written
CHANGED = 2  # a factor has a new storage or was written outside the optimizer: nothing written
IRREGULAR = 3  # a phase's gradient is missing, or a gradient is not dense/contiguous/CPU/of the factor's dtype and shape
NONFINITE = 4  # a NaN/Inf was found and not skip_nonfinite: nothing written
#: The statuses after which the caller must run its general step (nothing was written).
FALL_BACK = frozenset((CHANGED, IRREGULAR, NONFINITE))

_FACTOR_INDEX = {"A": 0, "B": 1}

#: One group of one unit: per factor ("A", "B"), the positions of its layers' factors in the
#: plan's tracked list and its phase inputs (``grads`` is not read: the plan reads the gradients).
PlanGroup = Tuple[dict, dict]


class NativeStepPlan:
    """The tensors of every step, checked once, and the one call that runs a step over them.

    ``tracked``: every LoRA factor (the leaf tensors whose ``.grad`` holds the gradient);
    ``identity``: their storage addresses (``data_ptr()``) and ``seen``: their versions
    (``_version``), both as of the optimizer's last write; ``units``: per unit (a LoRA param group
    with its own hyper-parameters), its groups as ``(positions, inputs)`` dicts keyed by factor,
    ``positions[f]`` the tracked index of each layer's factor and ``inputs[f]`` its
    :class:`FactorGroup` (no snapshot). Raises :class:`NativeUnavailable` when the library is not
    built (this never builds) and ``ValueError`` for inconsistent inputs.
    """

    def __init__(self, tracked: Sequence[torch.Tensor], identity: Sequence[int], seen: Sequence[int],
                 units: Sequence[Sequence[PlanGroup]], adaptive: bool):
        extension = load_extension(build=False)
        self._plan = extension.StepPlan(list(tracked), list(identity), list(seen), bool(adaptive), PIVOT_FLOOR,
                                        list(ESCALATION), ABSOLUTE_FLOOR)
        self.units = len(units)
        self.adaptive = bool(adaptive)
        for unit, groups in enumerate(units):
            for factor, index in _FACTOR_INDEX.items():
                positions = [list(pos[factor]) for pos, _ in groups]
                inputs: List[FactorGroup] = [inp[factor] for _, inp in groups]
                if any(g.snapshot is not None for g in inputs):
                    raise ValueError("NativeStepPlan: groups with a snapshot (runs of phases) are not planned")
                self._plan.add_phase(
                    unit=unit, factor=index, tracked_index=positions, params=[list(g.params) for g in inputs],
                    transposed=[bool(g.transposed) for g in inputs], momentum=[g.momentum for g in inputs],
                    variance=[g.variance for g in inputs], step=[g.step for g in inputs],
                    gram=[g.gram for g in inputs], cross=[g.cross for g in inputs],
                    other_gram=[g.other_gram for g in inputs], other_cross=[g.other_cross for g in inputs],
                    inv_scale_sq=[g.inv_scale_sq for g in inputs],
                )

    def step(self, phases: Sequence[str], hparams: Sequence[PhaseHyperParams], skip_nonfinite: bool,
             extra: Sequence[torch.Tensor] = ()) -> int:
        """Run ``phases`` (factor names, in order) with ``hparams[unit]`` for each unit; ``extra``
        gradients join the NaN/Inf check. Returns a status (module constants)."""
        if len(hparams) != self.units:
            raise ValueError(f"NativeStepPlan.step: {len(hparams)} hyper-parameter sets for {self.units} units")
        if any(hp.adaptive != self.adaptive for hp in hparams):
            raise ValueError(f"NativeStepPlan.step: the plan was built for adaptive={self.adaptive}")
        return self._plan.step(
            [_FACTOR_INDEX[f] for f in phases],
            [(hp.lr, hp.beta1, hp.weight_decay, hp.damping, hp.beta2, hp.eps) for hp in hparams],
            bool(skip_nonfinite),
            list(extra),
        )

    @property
    def seen(self) -> List[int]:
        """The version of every tracked factor after the plan's last write (as given, if none)."""
        return self._plan.seen()

    @seen.setter
    def seen(self, versions: Sequence[int]) -> None:
        self._plan.set_seen(list(versions))

    @property
    def found(self) -> torch.Tensor:
        """0-dim float32 CPU tensor: 1.0 if the last step's check found a NaN/Inf, else 0.0 (one
        tensor, rewritten by every step that gets to the check)."""
        return self._plan.found
