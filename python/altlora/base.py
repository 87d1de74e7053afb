"""Machinery shared by :class:`~altlora.AltLoRA` and :class:`~altlora.AltLoRAPlus`.

The math lives in ``altlora_kernels/phase_update.py`` (and in the optimizers' docstrings); this
file turns a ``torch.optim.Optimizer`` call into phases: it validates input, keeps the param
groups, decides which factor each ``step()`` updates, checks gradients, and hands groups of
same-shaped layers to the compute layer.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

import altlora_kernels as K

from . import distributed as D
from .deepspeed_guard import check_lora_params_in_place, check_no_zero3_parameters
from .pairs import LoRAPair
from .param_groups import ADAMW, KIND, LORA, collect_param_groups
from .schedule import Schedule
from .state import CROSS_GRAM, FACTORS, GRAM, MOMENTUM, SNAPSHOT, STEP, VARIANCE, PairGroup, group_pairs

__all__ = ["AltLoRAOptimizerBase", "NONFINITE_MODES"]

NONFINITE_MODES = ("raise", "skip")

# AdamW state of the other parameters: torch.optim.AdamW's key names.
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"

_STATE_DICT_KEY = "altlora"

# Group keys that describe the structure, not hyper-parameters: never taken from a state_dict.
# (The schedule position is also stored in every group under _STATE_DICT_KEY: the state_dict
# helpers of torch.distributed.checkpoint keep only "state" and "param_groups".)
_STRUCTURE_KEYS = ("params", KIND, "lora_names", "lora_scalings", _STATE_DICT_KEY)


def _check_real(name: str, value: Any, low: float = 0.0, high: Optional[float] = None, high_open: bool = True) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    if value < low:
        raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
    return float(value)


def _check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (expected a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        _check_real(f"{name}[{i}]", b, 0.0, 1.0)


class AltLoRAOptimizerBase(Optimizer):
    """Common base; subclasses set the variant and the LoRA hyper-parameter keys."""

    _variant: str = ""
    _adaptive: bool = False

    def __init__(
        self,
        params,
        defaults: Dict[str, Any],
        *,
        other_lr: float,
        other_betas,
        other_eps: float,
        schedule: str,
        order: str,
        switch_every: int,
        backend: str,
        nonfinite: str,
        freeze_inactive: bool,
    ):
        self._check_lora_hparams(defaults, "")
        self.schedule = Schedule(schedule, order, switch_every)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (expected 'raise' or 'skip')")
        if not isinstance(freeze_inactive, bool):
            raise ValueError(f"Invalid freeze_inactive: {freeze_inactive!r} (expected True or False)")
        if freeze_inactive and self.schedule.kind != "alternate":
            raise ValueError(
                f"freeze_inactive=True needs schedule='alternate': schedule={schedule!r} uses both gradients every step"
            )
        self._other_defaults = {
            "lr": _check_real("other_lr", other_lr),
            "betas": tuple(other_betas),
            "eps": _check_real("other_eps", other_eps),
        }
        _check_betas("other_betas", self._other_defaults["betas"])
        if backend not in K.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(K.BACKENDS)})")
        self.backend_name = backend
        self.nonfinite = nonfinite
        self.freeze_inactive = freeze_inactive
        self._names: Dict[int, str] = {}
        self._pair_groups: Dict[int, List[PairGroup]] = {}
        # id()s of each LoRA group's factors, fixed at construction: step() checks that the group
        # still holds them (engines such as DeepSpeed ZeRO swap parameters under the optimizer).
        self._factor_ids: Dict[int, List[int]] = {}
        self._step_index = 0
        self._skipped: Optional[torch.Tensor] = None
        self._check_freeze_inactive_allowed()
        if isinstance(params, nn.Module):
            check_no_zero3_parameters(params.named_parameters())
        super().__init__(collect_param_groups(params, self._names), defaults)
        if not self._pair_groups:
            # E.g. transformers.Trainer's optimizer_cls_and_kwargs=(AltLoRA, {...}): plain groups.
            raise ValueError(
                "params: no LoRA pairs among the param groups, only plain parameters, so AltLoRA cannot tell "
                "which tensors form (A, B) pairs. Pass the model, altlora.find_lora_pairs(model) or groups with "
                "'pairs'; with transformers.Trainer use optimizer_cls_and_kwargs=altlora.trainer.altlora_optimizer(lr=...)."
            )
        devices = {pg.device for groups in self._pair_groups.values() for pg in groups}
        self._backend = K.resolve_backend(backend, next(iter(devices)) if len(devices) == 1 else None)
        self._apply_freeze()

    def _check_freeze_inactive_allowed(self) -> None:
        # Measured (tests/test_ddp.py): with DDP built first, a frozen factor makes DDP fail with
        # "Expected to have finished reduction"; with the optimizer built first, DDP's buckets
        # miss the factor frozen at that time and the ranks silently drift apart.
        if self.freeze_inactive and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"freeze_inactive=True cannot be used with {dist.get_world_size()} processes: "
                f"DistributedDataParallel (and FSDP) expect the set of parameters with gradients to stay the "
                f"same from step to step. Use freeze_inactive=False (the default)."
            )

    # ------------------------------------------------------------------ hyper-parameters
    def _check_lora_hparams(self, group: Dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _phase_hparams(self, group: Dict[str, Any]) -> K.PhaseHyperParams:
        raise NotImplementedError

    def _check_group(self, group: Dict[str, Any], index: int) -> None:
        where = f" (param_groups[{index}])"
        if group[KIND] == LORA:
            self._check_lora_hparams(group, where)
        else:
            _check_real("lr" + where, group["lr"])
            _check_betas("betas" + where, group["betas"])
            _check_real("eps" + where, group["eps"])
            _check_real("weight_decay" + where, group["weight_decay"])

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group: ``{"pairs": [...], **hparams}`` and/or ``{"params": [...], ...}``.

        A dict with both becomes two groups: the LoRA pairs, then an AdamW group for ``params``
        with ``other_lr`` / ``other_betas`` / ``other_eps`` (keys of the dict or the optimizer's).
        A dict with only ``params`` is an AdamW group whose own ``lr``, ``betas``, ``eps`` apply.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        pairs = group.pop("pairs", None)
        params = group.pop("params", None)
        other = {key: group.pop("other_" + key) for key in ("lr", "betas", "eps") if "other_" + key in group}
        if pairs is None and params is None:
            raise ValueError("a param group needs 'pairs' (LoRA pairs) and/or 'params' (other parameters)")
        if pairs is not None:
            self._add_lora_group(pairs, group)
        if params is not None:
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if pairs is None:
                hp = {**self._other_defaults, "weight_decay": self.defaults["weight_decay"]}
                hp.update({k: v for k, v in group.items() if k in ("lr", "betas", "eps", "weight_decay")})
                if not params:
                    raise ValueError("a param group with only 'params' must not be empty")
            else:
                hp = {**self._other_defaults, "weight_decay": group.get("weight_decay", self.defaults["weight_decay"])}
            hp.update(other)
            if params:
                self._add_adamw_group(params, hp)

    def _known_ids(self) -> Dict[int, str]:
        return {id(p): self._display(p) for g in self.param_groups for p in g["params"]}

    def _display(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), "an unnamed parameter")

    def _add_lora_group(self, pairs, hp: Dict[str, Any]) -> None:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("'pairs' is empty: a LoRA param group needs at least one LoRAPair")
        known = self._known_ids()
        for i, pair in enumerate(pairs):
            if not isinstance(pair, LoRAPair):
                raise ValueError(f"pairs[{i}] is a {type(pair).__name__}, expected altlora.LoRAPair")
            for factor, t in (("A", pair.A), ("B", pair.B)):
                self._names.setdefault(id(t), pair.factor_name(factor))
                check_no_zero3_parameters([(self._display(t), t)])
                if not t.is_leaf:
                    raise ValueError(f"{self._display(t)} is not a leaf tensor; an optimizer can only step leaves")
                if id(t) in known:
                    raise ValueError(
                        f"{self._display(t)} appears in two places ({known[id(t)]} and pair {pair.name or i}); "
                        f"each parameter may belong to one pair or group only"
                    )
                known[id(t)] = f"pair {pair.name or i}"
        for key, default in self.defaults.items():
            hp.setdefault(key, default)
        group = {
            "params": [t for pair in pairs for t in (pair.A, pair.B)],
            KIND: LORA,
            "lora_names": [pair.name for pair in pairs],
            "lora_scalings": [pair.scaling for pair in pairs],
            **hp,
        }
        self._check_group(group, len(self.param_groups))
        # DTensor factors (FSDP2) take the collective path of altlora.distributed.
        if D.has_dtensor(pairs):
            groups = D.group_sharded_pairs(pairs, snapshot_slots=self.schedule.switch_every > 1)
        else:
            groups = group_pairs(pairs)
        self._pair_groups[len(self.param_groups)] = groups
        self._factor_ids[len(self.param_groups)] = [id(t) for t in group["params"]]
        self.param_groups.append(group)

    def _add_adamw_group(self, params: List[torch.Tensor], hp: Dict[str, Any]) -> None:
        known = self._known_ids()
        index = len(self.param_groups)
        for j, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"param_groups[{index}]['params'][{j}] is a {type(p).__name__}, expected a tensor")
            self._names.setdefault(id(p), f"param_groups[{index}]['params'][{j}]")
            check_no_zero3_parameters([(self._display(p), p)])
            if not p.is_leaf:
                raise ValueError(f"{self._display(p)} is not a leaf tensor; an optimizer can only step leaves")
            if not p.is_floating_point():
                raise ValueError(f"{self._display(p)} has dtype {p.dtype}; only floating point parameters can be trained")
            if id(p) in known:
                raise ValueError(f"{self._display(p)} appears in two places ({known[id(p)]} and an AdamW group)")
            known[id(p)] = f"param_groups[{index}]"
        group = {"params": params, KIND: ADAMW, **hp}
        group["betas"] = tuple(group["betas"])
        self._check_group(group, index)
        self.param_groups.append(group)

    def pairs(self) -> List[LoRAPair]:
        """Every LoRA pair this optimizer trains, in param-group order."""
        return [pair for i in sorted(self._pair_groups) for pg in self._pair_groups[i] for pair in pg.pairs]

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
        if not self.freeze_inactive:
            return
        active = self.active_factor
        for pair in self.pairs():
            pair.A.requires_grad_("A" in active)
            pair.B.requires_grad_("B" in active)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One step: the phase(s) of the schedule for the LoRA pairs, AdamW for the rest.

        Returns the closure's loss if a closure is given. A step where no parameter has a gradient
        does nothing (and does not advance the schedule).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_freeze_inactive_allowed()
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)
            if index in self._pair_groups:
                # DeepSpeed ZeRO-1/2 (or accelerate's FSDP2 preparation) swap in other tensors.
                check_lora_params_in_place(index, group["params"], self._factor_ids[index])
        phases = self.schedule.phases(self._step_index)
        lora_work, adamw_work = self._gather_gradients(set(phases))
        if lora_work is None:
            return loss

        consumed = [(p, g) for _, pg, grads in lora_work for f in grads for p, g in zip(pg.params[f], grads[f])]
        consumed += [(p, D.local_tensor(p.grad)) for _, ps in adamw_work for p in ps]
        found_inf = K.nonfinite_flag([g for _, g in consumed])
        sharded = D.sharded_groups(lora_work)
        if sharded:  # every rank must take the same branches below
            found_inf, modified = D.agree(sharded, found_inf)
        if self.nonfinite == "raise":
            if found_inf is not None and bool(found_inf.item()):
                bad = next((p for p, g in consumed if not bool(torch.isfinite(g).all())), None)
                where = "a shard held by another rank" if bad is None else self._display(bad)
                raise FloatingPointError(
                    f"non-finite gradient in {where}; nothing was updated. "
                    f"Pass nonfinite='skip' to skip such steps (e.g. with fp16 loss scaling)."
                )
            found_inf = None

        for _, pg, _ in lora_work:
            if isinstance(pg, D.ShardedPairGroup):
                continue
            if pg.initialized:
                pg.refresh_modified()
            else:
                pg.initialize(self._adaptive, self.state)
        if sharded:
            D.refresh_and_initialize(sharded, modified, self._adaptive, self.state)

        joint_start = {}
        if self.schedule.kind == "joint":
            # Both phases read the values at the start of the step; the first one rewrites its
            # factor's Gram and cross-Gram, so the second one gets copies.
            first = phases[0]
            joint_start = {id(pg): (pg.buffers[first][GRAM].clone(), pg.buffers[first][CROSS_GRAM].clone()) for _, pg, _ in lora_work}
        starts = self.schedule.starts_run(self._step_index)
        ends = self.schedule.ends_run(self._step_index)
        for position, factor in enumerate(phases):
            other = "A" if factor == "B" else "B"
            by_group = defaultdict(list)
            for index, pg, grads in lora_work:
                if starts:
                    pg.take_snapshot(factor, self.state)
                own, theirs = pg.buffers[factor], pg.buffers[other]
                other_gram, other_cross = theirs[GRAM], theirs[CROSS_GRAM]
                if position == 1 and id(pg) in joint_start:
                    other_gram, other_cross = joint_start[id(pg)]
                by_group[index].append(
                    K.FactorGroup(
                        params=pg.matrices[factor],
                        grads=grads[factor],
                        transposed=factor == "B",
                        momentum=own[MOMENTUM],
                        variance=own.get(VARIANCE),
                        step=own[STEP],
                        gram=own[GRAM],
                        cross=own[CROSS_GRAM],
                        other_gram=other_gram,
                        other_cross=other_cross,
                        inv_scale_sq=pg.inv_scale_sq,
                        snapshot=own.get(SNAPSHOT),
                    )
                )
            saved = D.before_phase(sharded, factor, found_inf) if sharded else None
            for index, groups in by_group.items():
                K.phase_update(self._backend, groups, self._phase_hparams(self.param_groups[index]), found_inf)
            if sharded:
                D.after_phase(sharded, factor, found_inf, saved)
            if ends:
                for _, pg, _ in lora_work:
                    pg.drop_snapshot(factor, self.state)

        for index, params in adamw_work:
            self._adamw(self.param_groups[index], params, found_inf)

        for _, pg, _ in lora_work:
            pg.record_seen()
        if found_inf is not None:
            self._skipped = found_inf.clone() if self._skipped is None else self._skipped + found_inf.to(self._skipped.device)
        self._step_index += 1
        self._apply_freeze()
        return loss

    def _gather_gradients(self, factors):
        """Gradients each phase consumes, as 2-D views; ``(None, None)`` if nothing has one.

        A LoRA factor without a gradient while others have one (a layer that took no part in the
        forward pass) is stepped with a zero gradient, so every layer keeps the same phase
        bookkeeping; AdamW parameters without a gradient are left alone, as in torch.
        """
        lora_work, adamw_work, missing = [], [], []
        any_grad = False
        for index, group in enumerate(self.param_groups):
            if group[KIND] == ADAMW:
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    if p.grad.is_sparse:
                        raise ValueError(f"{self._display(p)} has a sparse gradient; AltLoRA needs dense gradients")
                if params:
                    any_grad = True
                    adamw_work.append((index, params))
                continue
            for pg in self._pair_groups[index]:
                grads = {}
                for factor in sorted(factors):
                    views = []
                    for i, (p, m) in enumerate(zip(pg.params[factor], pg.matrices[factor])):
                        g = p.grad
                        if g is None:
                            missing.append((views, i, m))
                            views.append(None)
                            continue
                        if g.is_sparse:
                            raise ValueError(f"{self._display(p)} has a sparse gradient; AltLoRA needs dense gradients")
                        any_grad = True
                        views.append(pg.grad_matrix(factor, i, g))
                    grads[factor] = views
                lora_work.append((index, pg, grads))
        if not any_grad:
            return None, None
        D.gather_rows(lora_work)  # FSDP2 factors sharded along r: full factors and gradients
        for views, i, m in missing:
            views[i] = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
        return lora_work, adamw_work

    def _adamw(self, group: Dict[str, Any], params: List[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        local = D.local_tensor  # FSDP2: element-wise, so each rank steps its own shard
        K.adamw_step(
            [local(p) for p in params],
            [local(p.grad) for p in params],
            [local(self.state[p][EXP_AVG]) for p in params],
            [local(self.state[p][EXP_AVG_SQ]) for p in params],
            [self.state[p]["step"] for p in params],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            found_inf=found_inf,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """torch's format (per-parameter state, param groups) plus the schedule position.

        Everything a bit-exact resume needs is in it: moments, per-factor counters, Grams,
        cross-Grams, a mid-run snapshot, the phase counter and the skipped-step count.
        """
        sd = super().state_dict()
        sd[_STATE_DICT_KEY] = self._schedule_position()
        for group in sd["param_groups"]:
            group[_STATE_DICT_KEY] = self._schedule_position()
        return sd

    def _factor_in_run(self) -> Optional[str]:
        """The factor whose run of several phases the next step continues (its snapshot is live)."""
        s = self.schedule
        if s.kind == "alternate" and s.switch_every > 1 and self._step_index % s.switch_every != 0:
            return s.phases(self._step_index)[0]
        return None

    def _schedule_position(self) -> Dict[str, Any]:
        return {
            "variant": self._variant,
            "schedule": self.schedule.kind,
            "order": self.schedule.order,
            "switch_every": self.schedule.switch_every,
            "step_index": self._step_index,
            "skipped_steps": None if self._skipped is None else self._skipped.clone(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()`` of the same optimizer class and model.

        Raises ``ValueError`` (and changes nothing) when it comes from another optimizer, schedule
        or model: group count or sizes, kinds, scalings or state shapes that do not match.
        """
        extra = state_dict.get(_STATE_DICT_KEY)
        if extra is None and state_dict.get("param_groups"):
            # Through torch.distributed.checkpoint.state_dict, only the groups carry it.
            extra = state_dict["param_groups"][0].get(_STATE_DICT_KEY)
        if not isinstance(extra, dict):
            raise ValueError("state_dict was not saved by an altlora optimizer (no 'altlora' entry)")
        if extra.get("variant") != self._variant:
            raise ValueError(f"state_dict was saved by {extra.get('variant')}, not {self._variant}")
        saved = (extra.get("schedule"), extra.get("order"), extra.get("switch_every"))
        mine = (self.schedule.kind, self.schedule.order, self.schedule.switch_every)
        if saved != mine:
            raise ValueError(f"state_dict was saved with (schedule, order, switch_every) = {saved}, this optimizer has {mine}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}: "
                f"it was saved for another model or configuration"
            )
        id_map = {}
        for index, (group, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if sg.get(KIND) != group[KIND] or len(sg["params"]) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{index}] does not match the state_dict ({group[KIND]} group of "
                    f"{len(group['params'])} tensors vs {sg.get(KIND)} group of {len(sg['params'])})"
                )
            if group[KIND] == LORA:
                for name, mine_s, theirs_s in zip(group["lora_names"], group["lora_scalings"], sg["lora_scalings"]):
                    if not math.isclose(mine_s, theirs_s, rel_tol=1e-6):
                        raise ValueError(f"{name}: state_dict was saved with scaling {theirs_s}, this model has {mine_s}")
            id_map.update(zip(sg["params"], group["params"]))

        new_state: Dict[torch.Tensor, Dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict holds state for parameter index {key}, which this optimizer does not have")
            new_state[id_map[key]] = dict(value)
        for group in self.param_groups:
            if group[KIND] != ADAMW:
                continue
            for p in group["params"]:
                st = new_state.get(p)
                if not st:
                    continue
                for key in ("step", EXP_AVG, EXP_AVG_SQ):
                    if key not in st:
                        raise ValueError(f"state_dict has no '{key}' for {self._display(p)}")
                if tuple(st[EXP_AVG].shape) != tuple(p.shape):
                    raise ValueError(
                        f"state_dict does not match the model: state of {self._display(p)} has shape "
                        f"{tuple(st[EXP_AVG].shape)}, the parameter {tuple(p.shape)}"
                    )
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device, copy=True)
                st[EXP_AVG] = st[EXP_AVG].to(device=p.device, dtype=p.dtype, copy=True)
                st[EXP_AVG_SQ] = st[EXP_AVG_SQ].to(device=p.device, dtype=p.dtype, copy=True)

        # Build the LoRA buffers into fresh PairGroups so that a failure leaves us unchanged.
        rebuilt = {}
        for index, groups in self._pair_groups.items():
            rebuilt[index] = []
            for pg in groups:
                if isinstance(pg, D.ShardedPairGroup):
                    fresh = D.ShardedPairGroup(pg.pairs, pg.snapshot_slots)
                else:
                    fresh = PairGroup(pg.pairs)
                with_state = [bool(new_state.get(p)) for f in FACTORS for p in fresh.params[f]]
                if all(with_state):
                    fresh.load(new_state, self._adaptive, self._names)
                elif any(with_state):
                    raise ValueError(f"state_dict has state for only some factors of {pg.pairs[0].name} and its group")
                rebuilt[index].append(fresh)

        for group, sg in zip(self.param_groups, saved_groups):
            for key, value in sg.items():
                if key not in _STRUCTURE_KEYS:
                    group[key] = tuple(value) if key == "betas" else value
        self.state = new_state
        for index, groups in rebuilt.items():
            for pg in groups:
                if pg.initialized:
                    pg.bind(self.state)
        self._pair_groups = rebuilt
        self._step_index = int(extra["step_index"])
        live = self._factor_in_run()
        for groups in self._pair_groups.values():
            for pg in groups:
                if isinstance(pg, D.ShardedPairGroup) and pg.initialized:
                    pg.activate_snapshot(live, self.state)
        skipped = extra.get("skipped_steps")
        self._skipped = None if skipped is None else torch.as_tensor(skipped).clone()
        self._apply_freeze()
