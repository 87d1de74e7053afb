"""The step's fast path: the LoRA side of a step as one native call, where nothing unusual happens.

The general step (``base.py``) reads every factor's storage, version and gradient several times
in Python, converts every tensor into C++ at each call, and handles every case: factors cast,
moved or written outside the optimizer, missing or sparse gradients, non-finite ones, sharded
factors, snapshots. On the CPU with small adapters that Python costs as much as the phase itself
(``bench/results/profile-native-step-cpu-20261203.md``: 180–320 µs of a 350–1000 µs step).

A :class:`StepPlan` hands the usual case to ``altlora_kernels.native_step_plan``: it keeps the
tensors, checks that nothing of the above happened, runs the NaN/Inf check and the phases in one
call, and says so; otherwise it writes nothing and the general step runs, exactly as without a
plan. Both paths give the same bits (``tests/test_step_plan.py``).

A plan applies when every LoRA pair group runs on the native backend with 2-D factors, the
coordinator is the local one (one process, or DDP), and the schedule neither keeps snapshots
(``switch_every`` > 1) nor reads start-of-step values (``joint``). It is built after a general
step (the first step always is one), checked against the optimizer's groups after each general
step, and dropped by ``add_param_group`` and ``load_state_dict``. ``ALTLORA_STEP_PLAN=0`` in the
environment turns it off (every step takes the general path).

Who records what: the plan records the factors' versions after its writes; before a general step
runs, :meth:`StepPlan.hand_back` gives them to the pair groups, and after it
:meth:`StepPlan.take_over` takes theirs, so whichever path wrote last is the one compared with.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

import altlora_kernels as K
from altlora_kernels.native_phase_update import NativeUnavailable
from altlora_kernels.native_step_plan import FALL_BACK, SKIPPED, NativeStepPlan

from .coordinator import Coordinator
from .lora_groups import LoRAGroups
from .param_groups import ADAMW, KIND
from .schedule import Schedule
from .state import FACTORS, SNAPSHOT, PairGroup

__all__ = ["ENV_SWITCH", "StepPlan", "FALL_BACK", "SKIPPED"]

#: The environment variable that turns plans off when set to "0".
ENV_SWITCH = "ALTLORA_STEP_PLAN"


def _plannable(pg: PairGroup) -> bool:
    return (pg.backend == "native" and pg.initialized and pg.matrix_shaped
            and SNAPSHOT not in pg.buffers["A"] and SNAPSHOT not in pg.buffers["B"])


class StepPlan:
    """A native step plan over an optimizer's LoRA groups, and what it was built from."""

    def __init__(self, native: NativeStepPlan, units: List[int], groups: List[PairGroup], adamw: List[int],
                 n_param_groups: int):
        self.native = native
        self.units = units  # LoRA param-group indices, in the order of the plan's units
        self.adamw = adamw  # AdamW param-group indices
        self._groups = groups
        self._built_from = self._fingerprint(groups)
        self._n_param_groups = n_param_groups

    @staticmethod
    def _fingerprint(groups: Sequence[PairGroup]) -> List[tuple]:
        # The objects the native plan holds tensors of: a rebuilt group or freshly initialized or
        # loaded state comes with new ones.
        return [(pg, pg.buffers["A"], pg.buffers["B"]) for pg in groups]

    @classmethod
    def build(cls, lora: LoRAGroups, schedule: Schedule, adaptive: bool, param_groups: List[dict]) -> Optional["StepPlan"]:
        """A plan for the optimizer's current groups, or None where one does not apply."""
        if os.environ.get(ENV_SWITCH, "1").strip() == "0":
            return None
        if type(lora.coordinator) is not Coordinator or schedule.has_runs or schedule.reads_start_values:
            return None
        units = sorted(lora.by_index)
        groups = [pg for index in units for pg in lora.by_index[index]]
        if not groups or not all(map(_plannable, groups)):
            return None
        tracked, identity, seen, per_unit = [], [], [], []
        for index in units:
            entries = []
            for pg in lora.by_index[index]:
                known = pg.tracked()
                if known is None:
                    return None
                base, n = len(tracked), len(pg)
                tracked += known[0]
                identity += known[1]
                seen += known[2]
                positions = {"A": range(base, base + n), "B": range(base + n, base + 2 * n)}
                entries.append((positions, {f: pg.phase_input(f, pg.matrices[f]) for f in FACTORS}))
            per_unit.append(entries)
        try:
            native = NativeStepPlan(tracked, identity, seen, per_unit, adaptive)
        except NativeUnavailable:
            return None
        adamw = [i for i, group in enumerate(param_groups) if group[KIND] == ADAMW]
        return cls(native, units, groups, adamw, len(param_groups))

    def still_fits(self, lora: LoRAGroups, param_groups: List[dict]) -> bool:
        """Whether the optimizer still has the groups and state buffers this plan was built on."""
        if len(param_groups) != self._n_param_groups or sorted(lora.by_index) != self.units:
            return False
        now = self._fingerprint([pg for index in self.units for pg in lora.by_index[index]])
        return len(now) == len(self._built_from) and all(
            a is b for old, new in zip(self._built_from, now) for a, b in zip(old, new)
        )

    def step(self, phases: Sequence[str], hparams: Sequence[K.PhaseHyperParams], skip_nonfinite: bool,
             extra: Sequence[torch.Tensor]) -> int:
        return self.native.step(phases, hparams, skip_nonfinite, extra)

    @property
    def found(self) -> torch.Tensor:
        return self.native.found

    def hand_back(self) -> None:
        """Give the pair groups the versions of the plan's last write (a general step runs next)."""
        seen, start = self.native.seen, 0
        for pg in self._groups:
            pg.adopt_seen(seen[start:start + 2 * len(pg)])
            start += 2 * len(pg)

    def take_over(self) -> bool:
        """After a general step on the same groups: take the versions it recorded. False (the plan
        must be rebuilt) when a group does not know them."""
        seen = []
        for pg in self._groups:
            known = pg.tracked()
            if known is None:
                return False
            seen += known[2]
        self.native.seen = seen
        return True

    @classmethod
    def after_general_step(cls, plan: Optional["StepPlan"], lora: LoRAGroups, schedule: Schedule, adaptive: bool,
                           param_groups: List[dict]) -> Optional["StepPlan"]:
        """The plan for the next step: ``plan`` if it still fits (and takes over the tracking), else a new one."""
        if plan is not None and plan.still_fits(lora, param_groups) and plan.take_over():
            return plan
        return cls.build(lora, schedule, adaptive, param_groups)
