"""The optimizer shared by every variant: a ``torch.optim.Optimizer`` whose ``step()`` is a pipeline.

    gather → agree → refresh / initialize → the schedule's phase(s) → the other parameters → advance

preceded by two checks (hyper-parameters, parameters cast or moved since the last step). The
pieces live where they belong: the math in ``altlora_kernels`` (``torch_phase_update.py`` states
it), the variant's hyper-parameters in ``variants.py``, the schedule in ``schedule.py``, group
admission in ``param_groups.py``, the LoRA state in ``state.py``, AdamW for the other parameters
in ``other_params.py``, the checkpoint format in ``checkpoint.py``, and everything that depends
on how parameters are distributed behind the coordinator (``coordinator.py``).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

import altlora_kernels as K
from altlora_kernels.graph_capture import refuse_capture

from . import checkpoint as C
from .deepspeed_guard import check_no_zero3_parameters
from .lora_groups import LoRAGroups
from .options import NONFINITE_MODES, Options
from .other_params import OtherParams, check_loaded
from .pairs import LoRAPair
from .param_groups import ADAMW, KIND, Admission, collect_param_groups
from .state import CROSS_GRAM, GRAM
from .step_plan import FALL_BACK, SKIPPED, StepPlan
from .variants import Variant

# Readers used through map() in the per-step gathering (C-level loops over every parameter).
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_SECOND = operator.itemgetter(1)

__all__ = ["AltLoRAOptimizerBase", "NONFINITE_MODES"]


class AltLoRAOptimizerBase(Optimizer):
    """Common base: a subclass sets ``variant`` (its declaration, ``variants.py``), whose
    hyper-parameters it passes as ``hparams``; ``options`` are the keyword arguments of
    :class:`~altlora.options.Options`."""

    variant: Variant

    def __init__(self, params, hparams: Dict[str, Any], options: Dict[str, Any]):
        try:
            self.options = Options(**options)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}".replace("Options.__init__() ", "")) from None
        variant = self.variant
        variant.check(hparams, "")
        self.schedule = self.options.plan
        self.nonfinite = self.options.nonfinite
        self.freeze_inactive = self.options.freeze_inactive
        self.backend_name = self.options.backend
        self._admission = Admission(variant, self.options, hparams)
        self._lora = LoRAGroups(self.backend_name, self.schedule, self._admission.names)
        self._others = OtherParams()
        self._step_index = 0
        self._skipped: Optional[torch.Tensor] = None
        # The fast path of the usual step (step_plan.py); None until a general step builds one.
        self._plan: Optional[StepPlan] = None
        self._lora.coordinator.check_step(self.freeze_inactive)
        if isinstance(params, nn.Module):
            check_no_zero3_parameters(params.named_parameters())
        super().__init__(collect_param_groups(params, self._admission.names), hparams)
        if not self._lora.by_index:
            # E.g. transformers.Trainer's optimizer_cls_and_kwargs=(AltLoRA, {...}): plain groups.
            raise ValueError(
                "params: no LoRA pairs among the param groups, only plain parameters, so AltLoRA cannot tell "
                "which tensors form (A, B) pairs. Pass the model, altlora.find_lora_pairs(model) or groups with "
                "'pairs'; with transformers.Trainer use optimizer_cls_and_kwargs=altlora.trainer.altlora_optimizer(lr=...)."
            )
        self._apply_freeze()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add ``{"pairs": [...], **hparams}`` and/or ``{"params": [...], ...}`` (see ``param_groups.py``)."""
        self._drop_plan()  # built on the old groups
        for group, pairs in self._admission.admit(param_group, self.param_groups):
            index = len(self.param_groups)
            if pairs is not None:
                self._lora.add(index, pairs, group["params"])
            self.param_groups.append(group)

    def pairs(self) -> List[LoRAPair]:
        """Every LoRA pair this optimizer trains, in param-group order."""
        return self._lora.pairs()

    @property
    def backends(self) -> Dict[str, str]:
        """The concrete backend of every LoRA layer, by layer name."""
        return {pair.name: pg.backend for pg in self._lora for pair in pg.pairs}

    @property
    def _backend(self) -> str:
        """The one backend every layer uses (or ``"mixed"``)."""
        names = {pg.backend for pg in self._lora}
        return names.pop() if len(names) == 1 else "mixed"

    # ------------------------------------------------------------------ schedule
    @property
    def active_factor(self) -> str:
        """What the next ``step()`` updates: ``"A"``, ``"B"`` or ``"AB"`` (both)."""
        return self.schedule.active_factor(self._step_index)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients under ``nonfinite="skip"`` (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def _apply_freeze(self) -> None:
        if self.freeze_inactive:
            active = self.active_factor
            for pair in self.pairs():
                pair.A.requires_grad_("A" in active)
                pair.B.requires_grad_("B" in active)

    # ------------------------------------------------------------------ step
    # NOTE: traced by torch.compile, the step's Python bookkeeping (the schedule position) is lost
    # and every step repeats the first phase; run eagerly, a graph break inside a compiled region.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step: the phase(s) of the schedule for the LoRA pairs, AdamW for the rest.

        Returns the closure's loss if a closure is given. A step where no parameter has a gradient
        does nothing (and does not advance the schedule).
        """
        # Not capturable (graph_capture.py says why): a clear error before anything changes.
        refuse_capture(f"{type(self).__name__}.step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        plan = self._plan
        if plan is not None:
            if self._planned_step(plan):
                return loss
            self._drop_plan()  # until this general step completes
        self._lora.follow_moved(self.state, self.variant.state_keys)
        self._others.follow([p for g in self.param_groups if g[KIND] == ADAMW for p in g["params"]], self.state)
        work, others, given = self._gather()
        if work is None:
            return loss
        found_inf, modified = self._agree(work, given)
        self._lora.coordinator.refresh(work, modified, self.variant.state_keys, self.state)
        phases = self.schedule.phases(self._step_index)
        start = self._start_values(work, phases[0]) if self.schedule.reads_start_values else {}
        for position, factor in enumerate(phases):
            if self.schedule.starts_run(self._step_index):
                for _, pg, _ in work:
                    pg.take_snapshot(factor, self.state)
            readings = start if position == 1 else {}
            self._lora.coordinator.phase(work, factor, found_inf, lambda: self._phase(work, factor, found_inf, readings))
            if self.schedule.ends_run(self._step_index):
                for _, pg, _ in work:
                    pg.drop_snapshot(factor, self.state)
        for index, params in others:
            self._others.step(self.param_groups[index], params, self.state, found_inf, self._lora.coordinator.local_all)
        self._advance(work, found_inf)
        self._plan = StepPlan.after_general_step(plan, self._lora, self.schedule, self.variant.adaptive, self.param_groups)
        return loss

    def _drop_plan(self) -> None:
        if self._plan is not None:
            self._plan.hand_back()  # what comes next compares with the plan's last write
            self._plan = None

    def _planned_step(self, plan: StepPlan) -> bool:
        """The step through ``plan`` (``step_plan.py``); False when the general step must run
        instead (then nothing was written)."""
        others, extra = [], []
        for index in plan.adamw:
            params = self.param_groups[index]["params"]
            with_grad = [(p, g) for p, g in zip(params, map(_GRAD, params)) if g is not None]
            if with_grad:
                others.append((index, [p for p, _ in with_grad]))
                extra += map(_SECOND, with_grad)
        if plan.adamw:
            self._others.follow([p for i in plan.adamw for p in self.param_groups[i]["params"]], self.state)
        skip = self.nonfinite == "skip"
        hparams = [self.variant.phase_inputs(self.param_groups[index]) for index in plan.units]
        status = plan.step(self.schedule.phases(self._step_index), hparams, skip, extra)
        if status in FALL_BACK:
            return False
        found_inf = plan.found if skip else None
        for index, params in others:
            self._others.step(self.param_groups[index], params, self.state, found_inf, self._lora.coordinator.local_all)
        self._finish_step(found_inf, skipped=status == SKIPPED)
        return True

    def _check_groups(self) -> None:
        """Hyper-parameters (schedulers write them), and engines that swapped the factors out."""
        self._lora.coordinator.check_step(self.freeze_inactive)
        for index, group in enumerate(self.param_groups):
            self._admission.check(group, index)
        self._lora.check_in_place(self.param_groups)

    def _gather(self):
        """``(work, others, given)``: the LoRA work (``coordinator.py``) of this step's phases; per
        AdamW group, its parameters with a gradient; every ``(parameter, gradient)`` the step was
        given. ``(None, None, None)`` if nothing has a gradient.

        A LoRA factor without a gradient while others have one (a layer that took no part in the
        forward pass) is stepped with a zero gradient, so every layer keeps the same phase
        bookkeeping; AdamW parameters without a gradient are left alone, as in torch.
        """
        factors = sorted(set(self.schedule.phases(self._step_index)))
        work, others, given = [], [], []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            with_grad = [(p, g) for p, g in zip(params, map(_GRAD, params)) if g is not None]
            given += with_grad
            if group[KIND] == ADAMW:
                others += [(index, [p for p, _ in with_grad])] if with_grad else []
            else:
                work += [(index, pg, {f: pg.grad_matrices(f) for f in factors}) for pg in self._lora.by_index[index]]
        missing = [(views, i, pg.matrices[f][i]) for _, pg, grads in work for f, views in grads.items()
                   for i, g in enumerate(views) if g is None]
        if not others and len(missing) == sum(len(pg) for _, pg, _ in work) * len(factors):
            return None, None, None
        if any(map(_IS_SPARSE, map(_SECOND, given))):
            sparse = next(p for p, g in given if g.is_sparse)
            raise ValueError(f"{self._admission.display(sparse)} has a sparse gradient; AltLoRA needs dense gradients")
        self._lora.coordinator.gather(work)  # e.g. FSDP2 factors sharded along r: full factors and gradients
        for views, i, m in missing:
            views[i] = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        return work, others, given

    def _agree(self, work, given):
        """The non-finite flag over every gradient the step was given (both factors of every pair
        and the AdamW groups, as ``GradScaler`` checks), agreed between processes; raises under
        ``nonfinite="raise"``. Also which factors changed outside the optimizer."""
        grads = self._lora.coordinator.local_all(list(map(_SECOND, given)))
        found_inf, modified = self._lora.coordinator.agree(work, K.nonfinite_flag(grads))
        if self.nonfinite == "raise":
            if found_inf is not None and bool(found_inf.item()):
                bad = next((p for (p, _), g in zip(given, grads) if not bool(torch.isfinite(g).all())), None)
                where = "a shard held by another rank" if bad is None else self._admission.display(bad)
                raise FloatingPointError(
                    f"non-finite gradient in {where}; nothing was updated. "
                    f"Pass nonfinite='skip' to skip such steps (e.g. with fp16 loss scaling)."
                )
            found_inf = None
        return found_inf, modified

    @staticmethod
    def _start_values(work, first: str) -> Dict[int, tuple]:
        # The first phase rewrites its factor's Gram and cross-Gram; the second one reads copies.
        return {id(pg): (pg.buffers[first][GRAM].clone(), pg.buffers[first][CROSS_GRAM].clone()) for _, pg, _ in work}

    def _phase(self, work, factor: str, found_inf: Optional[torch.Tensor], start: Dict[int, tuple]) -> None:
        calls = defaultdict(list)
        for index, pg, grads in work:
            calls[(index, pg.backend)].append(pg.phase_input(factor, grads[factor], start.get(id(pg))))
        for (index, backend), groups in calls.items():
            K.phase_update(backend, groups, self.variant.phase_inputs(self.param_groups[index]), found_inf)

    def _advance(self, work, found_inf: Optional[torch.Tensor]) -> None:
        for _, pg, _ in work:
            pg.record_seen()
        self._finish_step(found_inf)

    def _finish_step(self, found_inf: Optional[torch.Tensor], skipped: Optional[bool] = None) -> None:
        """Count a skipped step (``found_inf`` set: skip mode; ``skipped`` False, known on the host:
        nothing to add) and move the schedule on."""
        if found_inf is not None:
            if self._skipped is None:
                self._skipped = found_inf.clone()
            elif skipped is not False:
                self._skipped = self._skipped + found_inf.to(self._skipped.device)
        self._step_index += 1
        self._apply_freeze()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """torch's format (per-parameter state, param groups) plus the schedule position.

        Everything a bit-exact resume needs is in it: moments, per-factor counters, Grams,
        cross-Grams, a mid-run snapshot, the phase counter and the skipped-step count.
        """
        sd = super().state_dict()
        sd[C.STATE_DICT_KEY] = C.position(self.variant, self.schedule, self._step_index, self._skipped)
        for group in sd["param_groups"]:
            group[C.STATE_DICT_KEY] = C.position(self.variant, self.schedule, self._step_index, self._skipped)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same optimizer class and model.

        Raises ``ValueError`` (and changes nothing) when it comes from another optimizer, schedule
        or model (group count or sizes, kinds, scalings or state shapes that do not match) or
        holds a NaN or Inf.
        """
        extra = C.read_position(state_dict, self.variant, self.schedule)
        new_state = C.remap_state(state_dict, self.param_groups)
        for group in self.param_groups:
            for p in group["params"] if group[KIND] == ADAMW else ():
                if new_state.get(p):
                    check_loaded(p, new_state[p], self._admission.display(p))
        rebuilt = self._lora.loaded(new_state, self.variant.state_keys)
        self._drop_plan()  # built on the old groups and state
        C.restore_hparams(state_dict, self.param_groups)
        self.state = new_state
        self._lora.by_index = rebuilt
        self._step_index = int(extra["step_index"])
        live = self.schedule.factor_in_run(self._step_index)
        for pg in (pg for groups in rebuilt.values() for pg in groups if pg.initialized):
            pg.bind(self.state)
            pg.activate_snapshot(live, self.state)
        skipped = extra.get("skipped_steps")
        self._skipped = None if skipped is None else torch.as_tensor(skipped).clone()
        self._apply_freeze()
